"""The weight channel's control messages: small int64 notes whose arrival is polled, never waited.

A note is ``int64[4] = [kind, a, b, MARK]``. Subscribers send ``LIMIT`` once (``a``: the most
data bytes they take in one version), ``READY`` (``a``: the publish sequence number they hold,
``b``: their host token), ``BYE``, and ``DONE`` / ``NO_SHM`` after a shared-memory offer, on
``READY_TAG``; the publisher answers with ``OFFER`` (``a``: version, ``b``: sequence number; a
frame follows on the transport's tag), ``OFFER_SHM`` (a shared-memory description follows,
``shm``), ``TOO_BIG`` (``a``: version, ``b``: its bytes, over the subscriber's ``LIMIT``: nothing
follows), ``BYE_ACK`` or ``CLOSED`` on ``OFFER_TAG``.

Waiting for a note may take hours (a publisher between versions, a subscriber that has not
started), and a gloo wait that times out closes every pair of the process group. So a receive
is posted and left alone: the loop polls the last element of its landing tensor (``MARK``,
written last) and calls ``wait`` only once the note is there. No idle wait has a timeout, and
none needs a thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import anyio.to_thread
import torch

from .._core import dist
from .._core.completion import Backoff, wait_until
from ..errors import ReplicationError, UsageError

__all__ = [
    "BACKSTOP",
    "BYE",
    "BYE_ACK",
    "CLOSED",
    "DONE",
    "FRAME_TAG",
    "LIMIT",
    "MARK",
    "NO_SHM",
    "OFFER",
    "OFFER_SHM",
    "OFFER_TAG",
    "READY",
    "READY_TAG",
    "TOO_BIG",
    "Mailbox",
    "Note",
    "cpu_group",
    "send_note",
    "transfer",
]

READY, BYE, OFFER, BYE_ACK, CLOSED, OFFER_SHM, DONE, NO_SHM = 1, 2, 3, 4, 5, 6, 7, 8
LIMIT, TOO_BIG = 9, 10
READY_TAG = 0x5A61
OFFER_TAG = 0x5A62
#: the frames themselves: not the transport's default tag, so a ReplicationStager between the
#: same two ranks of the same group never takes a frame of this channel (or the reverse)
FRAME_TAG = 0x5A63
MARK = 0x4149_4F43_484E_4C31  # "AIOCHNL1"
#: the longest a worker thread waits for one gloo operation of a transfer both sides have begun.
#: gloo closes every pair of the group when a wait times out, so this is a last resort (a frozen
#: peer), far beyond any ``timeout=``: the anyio scope gives up first and abandons the thread.
BACKSTOP = 24 * 3600.0
_POLL = Backoff(0.0005, 0.005)


@dataclass(frozen=True, slots=True)
class Note:
    """A control message: its kind and two integers."""

    kind: int
    a: int
    b: int = 0


class Mailbox:
    """One posted receive of a note from group rank ``peer`` on ``tag``, reposted after each note."""

    def __init__(self, pg: Any, peer: int, tag: int) -> None:
        self.pg, self.peer, self.tag = pg, peer, tag
        self._landing = torch.zeros(4, dtype=torch.int64)
        self._work: Any = None

    @property
    def posted(self) -> bool:
        """Whether a receive is posted and its note not yet taken."""
        return self._work is not None

    def post(self) -> None:
        """Post the receive (a no-op while one is posted). Blocks on nothing."""
        if self._work is None:
            self._landing = torch.zeros(4, dtype=torch.int64)
            self._work = dist.post_recv(self._landing, self.peer, self.pg, self.tag)

    def landed(self) -> bool:
        """Whether the posted receive's note has arrived."""
        return self._work is not None and int(self._landing[3]) == MARK

    async def take(self, *, active: bool = False) -> Note:
        """Wait for the note, then complete the receive; bound it with a scope.

        Posts the receive first if none is. Idle (default): polls for the note, no thread, no
        timeout. ``active``: the peer is about to send (a transfer is under way), so a worker
        thread waits, which notices at once when the peer dies; if cancelled, the receive stays
        with the abandoned thread (it takes the next note) and a fresh one is posted later.
        Raises ``ReplicationError(peer, "control")`` when the backend fails.
        """
        self.post()
        if not active:
            await wait_until(self.landed, _POLL)
        work, self._work = self._work, None
        try:
            if active:
                await anyio.to_thread.run_sync(
                    dist.wait_work, work, BACKSTOP, abandon_on_cancel=True
                )
            else:  # the note is here, completing it is instant: a cancellation must not lose it
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(dist.wait_work, work, BACKSTOP)
        except RuntimeError as exc:
            raise ReplicationError(
                f"control message: {exc}", peer=self.peer, phase="control"
            ) from exc
        kind, a, b, _ = (int(v) for v in self._landing.tolist())
        return Note(kind, a, b)


async def send_note(pg: Any, peer: int, tag: int, note: Note) -> None:
    """Send ``note`` to group rank ``peer`` and wait until it left (a worker thread).

    The peer always has a receive posted for notes, so this returns promptly unless the peer is
    frozen: bound it with a scope. Raises ``ReplicationError(peer, "control")`` when the peer is
    gone.
    """
    t = torch.tensor([note.kind, note.a, note.b, MARK], dtype=torch.int64)
    await transfer(pg, peer, tag, t, send=True, phase="control")


async def transfer(
    pg: Any, peer: int, tag: int, t: torch.Tensor, *, send: bool, phase: str
) -> None:
    """Send ``t`` to (or receive it from) group rank ``peer`` and wait in a worker thread,
    abandoned on cancellation. Raises ``ReplicationError(peer, phase)`` when the backend fails."""
    post = dist.post_send if send else dist.post_recv

    def run() -> None:
        dist.wait_work(post(t, peer, pg, tag), BACKSTOP)

    try:
        await anyio.to_thread.run_sync(run, abandon_on_cancel=True)
    except RuntimeError as exc:
        what = "sending" if send else "receiving"
        raise ReplicationError(f"{what} failed: {exc}", peer=peer, phase=phase) from exc


def cpu_group(pg: Any) -> tuple[Any, int, int]:
    """``(pg, rank, size)`` for ``pg`` or the default group; ``UsageError`` if there is none or
    it does not move CPU tensors (the channel needs gloo)."""
    pg = pg if pg is not None else dist.default_group()
    if pg is None:
        raise UsageError("the weight channel needs an initialised process group (gloo)")
    if dist.backend_device(pg).type != "cpu":
        raise UsageError("the weight channel needs a group that moves CPU tensors (gloo)")
    rank, size = dist.rank_and_size(pg)
    return pg, rank, size
