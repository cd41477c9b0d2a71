"""How the publisher offers a version to one subscriber: what it knows of it (``Peer``), and the
offer itself: the frame over the group, a shared-memory description, or ``TOO_BIG``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal, NoReturn

from .._replication.transport import Link, send_frame
from ..errors import ReplicationError
from .notes import (
    BYE,
    BYE_ACK,
    DONE,
    OFFER,
    OFFER_SHM,
    OFFER_TAG,
    TOO_BIG,
    Mailbox,
    Note,
    send_note,
)
from .shm import send_description
from .versions import Snapshot

__all__ = ["Peer", "offer"]


@dataclass(eq=False)
class Peer:
    """The publisher's view of one subscriber."""

    rank: int
    link: Link
    mailbox: Mailbox
    state: Literal["absent", "live", "dropped", "closed"] = "absent"  # absent: has not asked
    have: int = 0  # the publish sequence number it holds (0: none)
    limit: int = 0  # the most data bytes it takes in one version (0: it did not say)
    heard: bool = False  # it has asked at least once
    ended: bool = False  # told that the stream ended
    sending: bool = False
    shm: bool = False  # on this host: sent through shared memory
    unmappable: bool = False  # answered NO_SHM once: it cannot map our regions
    error: ReplicationError | None = field(default=None, repr=False)


async def offer(
    pg: Any,
    peer: Peer,
    snap: Snapshot,
    digests: Callable[[Snapshot], Awaitable[list[int] | None]],
) -> None:
    """Offer ``snap`` to ``peer``: through shared memory where it reads it, else an ``OFFER``
    and the frame (each message once the entries it carries are written; its checksums
    ``digests(snap)``, awaited while the data is sent);
    ``TOO_BIG`` instead when it is larger than the peer takes. Bound it with a scope. Raises
    ``ReplicationError`` naming the peer (phase ``"send"``) when the peer is gone, closed its
    end, or did not take it."""
    if peer.limit and snap.header.data_bytes > peer.limit:
        await _too_big(pg, peer, snap)
    if peer.shm and snap.region is not None and await _offer_shared(pg, peer, snap):
        return
    await send_note(pg, peer.rank, OFFER_TAG, Note(OFFER, snap.version, snap.seq))
    # the digests go last: hashed (once, for every subscriber) while the data is on the wire
    await send_frame(peer.link, peer.rank, snap.header, snap.outgoing, partial(digests, snap))


async def _too_big(pg: Any, peer: Peer, snap: Snapshot) -> NoReturn:
    """Tell ``peer`` that ``snap`` is larger than it takes instead of sending it; raises the
    ``ReplicationError`` it is dropped with."""
    nbytes = snap.header.data_bytes
    await send_note(pg, peer.rank, OFFER_TAG, Note(TOO_BIG, snap.version, nbytes))
    raise ReplicationError(
        f"version {snap.version} is {nbytes} bytes, more than the {peer.limit} it takes "
        "(its target's size, or its max_bytes=): not sent",
        peer=peer.rank,
        phase="send",
    )


async def _offer_shared(pg: Any, peer: Peer, snap: Snapshot) -> bool:
    """Offer ``snap`` through shared memory; ``False`` when the subscriber does not read it
    (then it waits for a plain offer, and gets plain offers from now on)."""
    assert snap.region is not None
    await send_note(pg, peer.rank, OFFER_TAG, Note(OFFER_SHM, snap.version, snap.seq))
    await send_description(pg, peer.rank, snap.region, snap.header)
    note = await peer.mailbox.take(active=True)  # DONE: it copied the data out
    peer.mailbox.post()
    if note.kind == DONE:
        return True
    if note.kind == BYE:  # it closed instead of copying
        await send_note(pg, peer.rank, OFFER_TAG, Note(BYE_ACK, 0))
        raise ReplicationError("closed its end during the transfer", peer=peer.rank, phase="send")
    peer.shm, peer.unmappable = False, True  # plain offers from now on
    return False
