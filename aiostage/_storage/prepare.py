"""Preparing a save: flatten, check, stage what is not on the CPU, and plan the data file."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio.lowlevel
import anyio.to_thread

from .._core.storages import plan_storages
from .._core.tree import TensorLeaf, Tree, flatten
from .._format.codec import Header, Source
from .._format.plan import plan_file
from .._format.structure import encode_skeleton
from .._staging import AsyncStager, DefaultStager, StagingOptions
from ..errors import StagingError, UnsupportedValueError

__all__ = ["Prepared", "prepare"]


@dataclass
class Prepared:
    """A state dict ready to write: its header, the bytes per entry, how to release staging."""

    header: Header
    sources: list[Source]
    release: Callable[[], None]
    stage_seconds: float


async def prepare(state_dict: Any, stager: AsyncStager | None) -> Prepared:
    """Flatten, check that everything can be stored, stage, and lay out the data file.

    The walk and the layout run in worker threads (thousands of tensors take milliseconds to
    plan); only staging involves the loop. Raises ``UnsupportedValueError`` naming a key.
    """
    began = time.perf_counter()
    tree = await anyio.to_thread.run_sync(_checked_tree, state_dict)
    leaves, release = await _stage(tree, stager)
    try:
        header, sources = await anyio.to_thread.run_sync(_plan, Tree(tree.root, leaves))
    except BaseException:
        release()
        raise
    return Prepared(header, sources, release, time.perf_counter() - began)


def _checked_tree(state_dict: Any) -> Tree:
    """``flatten``, failing on anything the format cannot store before any copy or I/O."""
    try:
        tree = flatten(state_dict)
    except StagingError as exc:
        message = str(exc).removeprefix(f"{exc.key}: ")
        raise UnsupportedValueError(message, key=exc.key) from exc
    encode_skeleton(tree.root)
    return tree


def _plan(tree: Tree) -> tuple[Header, list[Source]]:
    return plan_file(tree, plan_storages([leaf.data for leaf in tree.leaves]))


async def _stage(
    tree: Tree, stager: AsyncStager | None
) -> tuple[tuple[TensorLeaf, ...], Callable[[], None]]:
    """Stage the non-CPU leaves (every leaf, through ``stager`` when given)."""
    picks = [i for i, t in enumerate(tree.leaves) if stager or t.data.device.type != "cpu"]
    if not picks:
        await anyio.lowlevel.checkpoint()
        return tree.leaves, lambda: None
    own = stager is None
    active = stager or DefaultStager(StagingOptions(reuse_buffers=False))
    try:
        copies = await active.stage([tree.leaves[i].data for i in picks])
    finally:
        if own:
            await active.aclose()
    leaves = list(tree.leaves)
    for i, copy in zip(picks, copies, strict=True):
        leaves[i] = dataclasses.replace(leaves[i], data=copy)
    return tuple(leaves), (lambda: None) if own else (lambda: active.release(copies))
