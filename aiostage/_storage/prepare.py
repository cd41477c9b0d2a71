"""Preparing a save: flatten, check, stage what is not on the CPU, and plan the data file."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import anyio.lowlevel
import anyio.to_thread
import torch

from .._core import gc_pause
from .._core.tree import Tree, flatten
from .._format.codec import Header, Source
from .._format.plan import plan_file
from .._format.structure import encode_skeleton
from .._staging import AsyncStager, DefaultStager, StagingOptions
from ..errors import StagingError, UnsupportedValueError

__all__ = ["Prepared", "prepare"]


@dataclass
class Prepared:
    """A state dict ready to write: its header, the bytes per entry (contiguous CPU tensors, a
    tensor stored as itself being its own source: ``plan_file(flat=False)``), how to release
    staging."""

    header: Header
    sources: list[Source]
    release: Callable[[], None]
    stage_seconds: float

    async def free(self) -> None:
        """Drop the header, the sources and the staged copies (call ``release`` first) in a
        worker thread: thousands of tensors and records take milliseconds to free, which the
        loop thread must not spend."""
        doomed: list[Any] = [self.header, self.sources, self.release]
        self.header, self.sources, self.release = _NO_HEADER, [], _nothing
        await anyio.to_thread.run_sync(doomed.clear)


_NO_HEADER = Header((), (), None, ())


def _nothing() -> None:
    """Nothing to release."""


async def prepare(
    state_dict: Any, stager: AsyncStager | None, rank: int = 0, world_size: int = 1
) -> Prepared:
    """Flatten, check that everything can be stored, stage, and lay out the data file of
    ``rank`` of ``world_size``.

    Everything that scales with the number of tensors (the walk, picking what to stage, the
    layout) runs in worker threads, with automatic garbage collection paused; the loop thread
    only hands the picked tensors to staging. Raises ``UnsupportedValueError`` naming a key.
    """
    began = time.perf_counter()
    walked = await anyio.to_thread.run_sync(_walk, state_dict, stager is not None)
    walked.copies, release = await _stage(walked.picked, stager)
    try:
        header, sources = await anyio.to_thread.run_sync(_plan, walked, rank, world_size)
    except BaseException:
        release()
        raise
    return Prepared(header, sources, release, time.perf_counter() - began)


@dataclass(slots=True)
class _Walked:
    """A state dict walked: its tree, its encoded skeleton, the leaves to stage (``picks``,
    ``picked``) and, once staged, their ``copies``.

    ``_plan`` takes the tensors out, so that they are freed in its worker thread, not on the
    loop.
    """

    tree: Tree | None
    skeleton: Any
    picks: list[int]
    picked: Sequence[torch.Tensor]
    copies: Sequence[torch.Tensor] = ()


def _walk(state_dict: Any, stage_all: bool) -> _Walked:
    """``flatten``, failing on anything the format cannot store before any copy or I/O; the
    leaves to stage: every one with a stager, else those not on the CPU (worker thread)."""
    with gc_pause.paused():
        try:
            tree = flatten(state_dict)
        except StagingError as exc:
            message = str(exc).removeprefix(f"{exc.key}: ")
            raise UnsupportedValueError(message, key=exc.key) from exc
        skeleton = encode_skeleton(tree.root)
        picks = [i for i, t in enumerate(tree.leaves) if stage_all or not t.data.is_cpu]
        return _Walked(tree, skeleton, picks, [tree.leaves[i].data for i in picks])


def _plan(walked: _Walked, rank: int, world_size: int) -> tuple[Header, list[Source]]:
    """The layout of the walked tree, staged leaves replaced by their copies (worker thread)."""
    tree, copies = walked.tree, walked.copies
    walked.tree, walked.picked, walked.copies = None, (), ()
    assert tree is not None, "a walked tree is planned once"
    with gc_pause.paused():
        leaves = list(tree.leaves)
        for i, copy in zip(walked.picks, copies, strict=True):
            leaves[i] = dataclasses.replace(leaves[i], data=copy)
        header, sources = plan_file(
            Tree(tree.root, tuple(leaves)), skeleton=walked.skeleton, flat=False
        )
        return dataclasses.replace(header, rank=rank, world_size=world_size), sources


async def _stage(
    tensors: Sequence[torch.Tensor], stager: AsyncStager | None
) -> tuple[Sequence[torch.Tensor], Callable[[], None]]:
    """Stage ``tensors`` (through ``stager`` when given); the copies and how to release them."""
    if not tensors:
        await anyio.lowlevel.checkpoint()
        return [], _nothing
    own = stager is None
    active = stager or DefaultStager(StagingOptions(reuse_buffers=False))
    try:
        copies = await active.stage(tensors)
    finally:
        if own:
            await active.aclose()
    return copies, _nothing if own else (lambda: active.release(copies))
