"""The weight channel's control notes without a world: a loopback stands in for the group."""

from __future__ import annotations

import struct
from datetime import timedelta
from typing import Any

import anyio
import pytest
import torch

from aiostage._channel import notes
from aiostage._channel.notes import (
    BYE,
    BYE_ACK,
    CLOSED,
    DONE,
    FRAME_TAG,
    LIMIT,
    MARK,
    NO_SHM,
    OFFER,
    OFFER_SHM,
    OFFER_TAG,
    READY,
    READY_TAG,
    TOO_BIG,
    Mailbox,
    Note,
    cpu_group,
    send_note,
    transfer,
)
from aiostage._core import dist
from aiostage._replication.transport import TAG
from aiostage.errors import ReplicationError, UsageError


class _Work:
    """A posted operation; ``wait`` fails like gloo's when its peer is gone."""

    def __init__(self, error: str | None = None) -> None:
        self.error = error
        self.waited: list[timedelta] = []

    def wait(self, timeout: timedelta) -> bool:
        self.waited.append(timeout)
        if self.error is not None:
            raise RuntimeError(self.error)
        return True


class _Loopback:
    """Sends land in receives posted on the same tag, in order (gloo keeps per-pair FIFO order);
    a send before its receive is posted waits in ``pending``."""

    def __init__(self, error: str | None = None) -> None:
        self.error = error
        self.receives: dict[int, list[torch.Tensor]] = {}
        self.pending: dict[int, list[torch.Tensor]] = {}
        self.sent: list[tuple[int, int, list[int]]] = []
        self.works: list[_Work] = []

    def post_send(self, t: torch.Tensor, peer: int, pg: Any, tag: int) -> _Work:
        self.sent.append((peer, tag, t.tolist()))
        waiting = self.receives.get(tag)
        if waiting:
            waiting.pop(0).copy_(t)
        else:
            self.pending.setdefault(tag, []).append(t.clone())
        return self._work()

    def post_recv(self, t: torch.Tensor, peer: int, pg: Any, tag: int) -> _Work:
        queued = self.pending.get(tag)
        if queued:
            t.copy_(queued.pop(0))
        else:
            self.receives.setdefault(tag, []).append(t)
        return self._work()

    def _work(self) -> _Work:
        self.works.append(_Work(self.error))
        return self.works[-1]


@pytest.fixture
def wire(monkeypatch: pytest.MonkeyPatch) -> _Loopback:
    loop = _Loopback()
    monkeypatch.setattr(dist, "post_send", loop.post_send)
    monkeypatch.setattr(dist, "post_recv", loop.post_recv)
    return loop


def test_kinds_and_tags_are_distinct_and_the_mark_spells_its_name() -> None:
    kinds = [READY, BYE, OFFER, BYE_ACK, CLOSED, OFFER_SHM, DONE, NO_SHM, LIMIT, TOO_BIG]
    assert len(set(kinds)) == len(kinds)
    assert 0 not in kinds  # a zeroed landing tensor is never mistaken for a note
    # the frames have a tag of their own: a ReplicationStager (transport.TAG) never takes one
    assert len({READY_TAG, OFFER_TAG, FRAME_TAG, TAG}) == 4
    assert struct.pack(">q", MARK) == b"AIOCHNL1"


def test_a_note_is_a_small_frozen_value() -> None:
    assert Note(READY, 3) == Note(READY, 3, 0)
    with pytest.raises(AttributeError):
        Note(BYE, 1).a = 2  # type: ignore[misc]


@pytest.mark.parametrize(
    "note",
    [
        Note(READY, 0, 0),
        Note(READY, 17, 0xDEAD_BEEF),
        Note(OFFER, 2**62, 2**63 - 1),
        Note(BYE_ACK, -1, -(2**63)),
        Note(NO_SHM, 5),
    ],
)
async def test_a_note_round_trips_as_four_int64(wire: _Loopback, note: Note) -> None:
    box = Mailbox(None, 1, READY_TAG)
    box.post()
    await send_note(None, 0, READY_TAG, note)
    assert wire.sent == [(0, READY_TAG, [note.kind, note.a, note.b, MARK])]
    assert box.landed()
    assert await box.take() == note
    assert not box.posted


async def test_nothing_has_landed_until_the_mark_has(wire: _Loopback) -> None:
    box = Mailbox(None, 1, OFFER_TAG)
    assert not box.landed()
    assert wire.receives == {}  # nothing posted until post() or take()
    box.post()
    assert box.posted
    (landing,) = wire.receives[OFFER_TAG]
    box.post()  # a no-op while one is posted
    assert wire.receives[OFFER_TAG] == [landing]
    landing[:3] = torch.tensor([OFFER, 4, 9])  # the body without the mark: not yet
    assert not box.landed()
    landing[3] = MARK
    assert box.landed()
    assert await box.take() == Note(OFFER, 4, 9)


async def test_take_posts_waits_for_a_late_note_and_survives_a_cancellation(
    wire: _Loopback,
) -> None:
    box = Mailbox(None, 1, READY_TAG)
    with pytest.raises(TimeoutError):
        with anyio.fail_after(0.05):
            await box.take()  # posts, polls, gives up: the receive stays posted
    assert box.posted
    got: list[Note] = []

    async def take() -> None:
        got.append(await box.take())

    async with anyio.create_task_group() as tg:
        tg.start_soon(take)
        await anyio.wait_all_tasks_blocked()
        assert not got
        await send_note(None, 0, READY_TAG, Note(DONE, 7))
    assert got == [Note(DONE, 7)]
    assert wire.works[0].waited == [timedelta(seconds=notes.BACKSTOP)]


async def test_an_active_take_waits_in_a_thread(wire: _Loopback) -> None:
    box = Mailbox(None, 2, READY_TAG)
    await send_note(None, 0, READY_TAG, Note(BYE, 1, 2))  # lands as soon as it is posted
    assert await box.take(active=True) == Note(BYE, 1, 2)


@pytest.mark.parametrize("active", [False, True])
async def test_a_failed_receive_is_a_control_error_naming_the_peer(
    wire: _Loopback, active: bool
) -> None:
    wire.error = "Connection closed by peer"
    box = Mailbox(None, 5, READY_TAG)
    await _send_failing(Note(READY, 1))
    with pytest.raises(ReplicationError, match="control message: Connection closed") as caught:
        await box.take(active=active)
    assert (caught.value.peer, caught.value.phase) == (5, "control")
    assert not box.posted  # the failed receive is gone; the next take posts a fresh one


async def _send_failing(note: Note) -> None:
    with pytest.raises(ReplicationError):
        await send_note(None, 5, READY_TAG, note)


@pytest.mark.parametrize(("send", "what"), [(True, "sending"), (False, "receiving")])
async def test_a_failed_transfer_names_the_peer_and_phase(
    wire: _Loopback, send: bool, what: str
) -> None:
    wire.error = "timed out"
    with pytest.raises(ReplicationError, match=f"{what} failed: timed out") as caught:
        await transfer(None, 3, OFFER_TAG, torch.zeros(2, dtype=torch.int64), send=send, phase="x")
    assert (caught.value.peer, caught.value.phase) == (3, "x")


async def test_a_transfer_moves_the_tensor(wire: _Loopback) -> None:
    out = torch.zeros(3, dtype=torch.int64)
    await transfer(None, 1, FRAME_TAG, torch.tensor([1, 2, 3]), send=True, phase="send")
    await transfer(None, 1, FRAME_TAG, out, send=False, phase="data")
    assert out.tolist() == [1, 2, 3]


def test_cpu_group_needs_a_group(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dist, "default_group", lambda: None)
    with pytest.raises(UsageError, match="initialised process group"):
        cpu_group(None)


def test_cpu_group_needs_one_that_moves_cpu_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    group = object()
    monkeypatch.setattr(dist, "default_group", lambda: group)
    monkeypatch.setattr(dist, "rank_and_size", lambda pg: (1, 4))
    monkeypatch.setattr(dist, "backend_device", lambda pg: torch.device("cuda"))
    with pytest.raises(UsageError, match="moves CPU tensors"):
        cpu_group(None)
    monkeypatch.setattr(dist, "backend_device", lambda pg: torch.device("cpu"))
    assert cpu_group(None) == (group, 1, 4)
    mine = object()
    assert cpu_group(mine) == (mine, 1, 4)
