"""A roll call: every rank's small JSON row gathered at group rank 0 and sent back to all, under
a timeout that names the rank which did not answer (an all-gather could not say which)."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread
import torch

from .._core import dist
from ..errors import ReplicationError, ReplicationTimeout

__all__ = ["roll_call"]

TAG = 0x5A5E
_OK, _SILENT = 0, 1


async def roll_call(pg: Any, row: Any, *, pg_timeout: float, what: str) -> list[Any]:
    """Every rank's ``row`` (JSON), indexed by group rank; a collective over ``pg``.

    Raises ``ReplicationTimeout`` naming the first rank that did not answer within ``pg_timeout``
    (on every rank that did), ``ReplicationError`` naming a rank whose row does not decode or
    that could not be reached.
    """
    if pg is None:  # a world of one
        await anyio.lowlevel.checkpoint()
        return [row]
    rank, world = dist.rank_and_size(pg)
    # gloo's own timeout never expires first: a gloo wait that times out closes every pair of
    # the group, and rank 0 must still tell the others which rank was silent
    backstop = 2 * pg_timeout + 5
    if rank != 0:
        with anyio.move_on_after(2 * pg_timeout + 1) as scope:
            await _send(pg, 0, _OK, json.dumps(row).encode(), backstop)
            status, body = await _recv(pg, 0, backstop)
        if scope.cancelled_caught:
            raise ReplicationTimeout(f"{what}: no answer within {pg_timeout} s", peer=0, phase=what)
        return _answer(status, body, what)
    rows: list[Any] = [row, *([None] * (world - 1))]
    with anyio.move_on_after(pg_timeout):
        async with anyio.create_task_group() as tg:
            for peer in range(1, world):
                tg.start_soon(_collect, pg, peer, rows, backstop, what)
    silent = [r for r, got in enumerate(rows) if got is None]
    status = _SILENT if silent else _OK
    raw = json.dumps(silent if silent else rows).encode()
    await _tell(pg, [p for p in range(1, world) if p not in silent], status, raw, backstop)
    return _answer(status, raw, what)


async def _collect(pg: Any, peer: int, rows: list[Any], backstop: float, what: str) -> None:
    """Rank ``peer``'s row into ``rows``; left ``None`` (named) when it cannot be had."""
    try:
        _, body = await _recv(pg, peer, backstop)
    except ReplicationError:
        return  # gone: named with the ranks that did not answer
    rows[peer] = _decode(body, peer, what)


async def _tell(pg: Any, peers: list[int], status: int, raw: bytes, backstop: float) -> None:
    """Rank 0's answer to each of ``peers`` (they wait for it); raises the first
    ``ReplicationError`` of a peer that could not be told."""
    failed: list[ReplicationError] = []

    async def tell(peer: int) -> None:
        try:
            await _send(pg, peer, status, raw, backstop)
        except ReplicationError as exc:
            failed.append(exc)

    async with anyio.create_task_group() as tg:
        for peer in peers:
            tg.start_soon(tell, peer)
    if failed:
        raise failed[0]


def _answer(status: int, body: bytes, what: str) -> list[Any]:
    """Rank 0's answer: every row, or the ranks that did not answer (raised)."""
    got = _decode(body, 0, what)
    if status == _SILENT:
        raise ReplicationTimeout(
            f"{what}: rank(s) {got} did not answer; is every rank restoring?",
            peer=got[0], phase=what,
        )  # fmt: skip
    if not isinstance(got, list):
        raise ReplicationError(f"{what}: a malformed answer", peer=0, phase=what)
    return got


def _decode(body: bytes, peer: int, what: str) -> Any:
    try:
        return json.loads(body)
    except ValueError as exc:
        raise ReplicationError(f"{what}: a malformed row ({exc})", peer=peer, phase=what) from exc


async def _send(pg: Any, peer: int, status: int, body: bytes, backstop: float) -> None:
    head = torch.tensor([status, len(body)], dtype=torch.int64)
    data = torch.frombuffer(bytearray(body), dtype=torch.uint8)
    for t in (head, data):
        await _wait(functools.partial(dist.post_send, t, peer, pg, TAG), peer, backstop, "send")


async def _recv(pg: Any, peer: int, backstop: float) -> tuple[int, bytes]:
    head = torch.zeros(2, dtype=torch.int64)
    await _wait(lambda: dist.post_recv(head, peer, pg, TAG), peer, backstop, "receive")
    status, n = (int(v) for v in head.tolist())
    if not 0 <= n <= 1 << 24:
        raise ReplicationError(f"a row of {n} bytes", peer=peer, phase="restore")
    data = torch.zeros(n, dtype=torch.uint8)
    await _wait(lambda: dist.post_recv(data, peer, pg, TAG), peer, backstop, "receive")
    return status, data.numpy().tobytes()


async def _wait(post: Callable[[], Any], peer: int, backstop: float, how: str) -> None:
    """Post a point-to-point operation and wait for it (``backstop``: gloo's own limit);
    what the backend raises becomes a ``ReplicationError`` naming ``peer``."""
    try:
        work = post()
        await anyio.to_thread.run_sync(dist.wait_work, work, backstop, abandon_on_cancel=True)
    except RuntimeError as exc:
        raise ReplicationError(f"{how} failed: {exc}", peer=peer, phase="restore") from exc
