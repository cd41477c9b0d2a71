"""Filling staging buffers from a state dict: one plan per structure, and batched copies.

The first stage of a structure flattens and plans it (``tree``, ``storages``) into a ``Recipe``:
its skeleton, spans and views, which spans are exactly one contiguous tensor, and a stamp of what
the plan depends on (types, object identities, ``requires_grad``, storage addresses, offsets,
shapes, strides, dtypes, devices). A later state dict is walked along the skeleton and stamped by
C-level maps; an equal stamp reuses the recipe. Buffers keep the staged tensors built over them,
so refilling them is a few ``torch._foreach_copy_`` calls (one per chunk of small tensors) and a
rebuild of the containers, not Python per tensor. Where torch's copy threads would fill every
CPU, large spans are copied in the worker thread alone (``buffers.move_chunks``), leaving the
event loop a CPU. All of it runs in worker threads: the loop only hands small objects along.
"""

from __future__ import annotations

import array
import functools
import operator
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio.from_thread
import torch

from . import cuda, gc_pause
from .breath import breathe, rested
from .buffers import ONE_THREAD_BYTES, Buffers, copy_chunks, move_chunks, one_thread, source_bytes
from .skeleton import Skeleton, rebuild, regather, skeleton
from .storages import (
    SLICE,
    Layout,
    Reader,
    Span,
    StoragePlan,
    View,
    fits,
    matches,
    plan_storages,
    read_all,
    stamp,
    storage_address,
    view_tensor,
)
from .tree import NO_DATA, TensorLeaf, Tree, flatten, unflatten, wrap_leaf

__all__ = []

#: the most tensors one ``_foreach_copy_`` call copies (a cancellation check between two). The
#: call reads its lists holding the GIL: a thread waiting for it (the event loop) was up to
#: 0.34 ms late at 2048 tensors per call, 0.17 ms (its floor) at 512, for 5% more copy time
_BATCH = 512
#: staged tensors built between two looks at the clock (``breathe``)
_STEP = 32
_ATTRS = operator.attrgetter("__dict__")
_TYPES: Reader = functools.partial(map, type)
_REQUIRES_GRAD: Reader = functools.partial(map, operator.attrgetter("requires_grad"))
_HAS_ATTRS: Reader = lambda part: map(bool, map(_ATTRS, part))  # noqa: E731
_GRADS: Reader = functools.partial(map, operator.attrgetter("grad"))
_ADDRESS: Reader = functools.partial(map, torch.Tensor.data_ptr)
_VERSIONS: Reader = functools.partial(map, operator.attrgetter("_version"))
_IDS: Reader = functools.partial(map, id)
Pick = Callable[[Sequence[Any]], Any]
_R = TypeVar("_R")


@dataclass(frozen=True, eq=False)
class Recipe:
    """How to stage the state dicts of one structure (see the module docstring).

    ``skeleton`` is ``None`` where the structure is planned again on every stage (a
    ShardedTensor, or tensors with Python attributes). ``batches`` pick the leaves whose host
    tensors are copied together; ``bytewise`` lists the (span, leaf holding it) copied as bytes:
    aliased, strided, larger than a chunk, on a device, or (where host copies run in one thread,
    ``buffers.one_thread``) large enough for torch to split its copy over threads.
    """

    leaves: tuple[TensorLeaf, ...]  # without their data: the wrapper each staged tensor gets
    views: tuple[View, ...]
    spans: tuple[Span, ...]
    layout: Layout
    skeleton: Skeleton | None
    stamp: tuple[Any, ...]
    local: tuple[int, ...]  # DTensor leaves: their local tensor holds the data
    batches: tuple[tuple[Pick, int], ...]
    bytewise: tuple[tuple[int, int], ...]
    devices: tuple[torch.device, ...]  # the CUDA devices among the spans


@dataclass(eq=False)
class Prepared:
    """A state dict ready to be copied: its recipe, each leaf's tensor data, fresh copies of its
    other values, and (where the recipe keeps no skeleton) the tree to rebuild it from."""

    recipe: Recipe
    datas: list[torch.Tensor]
    values: list[Any]
    tree: Tree | None = None


class Planner:
    """The latest recipe of one stager; ``prepare`` reuses it or plans a new one."""

    def __init__(self, chunk: int) -> None:
        self.chunk = chunk
        self.last: Recipe | None = None

    def prepare(self, state_dict: Any) -> Prepared:
        """Reuse the last recipe if ``state_dict`` still fits it, else flatten and plan (a worker
        thread: a replaced recipe's thousands of objects are freed here, not on the loop).

        Raises ``StagingError`` naming the key of a leaf that cannot be staged.
        """
        rested()
        with gc_pause.paused():
            last = self.last
            if last is not None and last.skeleton is not None:
                again = _again(last, state_dict)
                if again is not None:
                    return again
            prepared = _first(state_dict, self.chunk)
            self.last = prepared.recipe
            return prepared


def _again(recipe: Recipe, state_dict: Any) -> Prepared | None:
    """``state_dict`` prepared with ``recipe`` if its structure and tensors still fit it."""
    assert recipe.skeleton is not None
    found = regather(recipe.skeleton, state_dict)
    if found is None:
        return None
    objs, values = found
    try:
        datas = _data_of(recipe.local, objs)
        if not _still(recipe, objs, datas):
            return None
    except Exception:  # a leaf is no longer a plain tensor: planning it again names it
        return None
    return Prepared(recipe, datas, values)


def _first(state_dict: Any, chunk: int) -> Prepared:
    """Flatten and plan ``state_dict`` into a new recipe."""
    tree = flatten(state_dict)
    datas = [leaf.data for leaf in tree.leaves]
    plan = plan_storages(datas)
    local = tuple(i for i, leaf in enumerate(tree.leaves) if leaf.wrap == "dtensor")
    sk = None if any(leaf.attrs for leaf in tree.leaves) else skeleton(tree)
    found = regather(sk, state_dict) if sk is not None else None
    signed: tuple[Any, ...] = ()
    if found is not None:
        signed = _stamp(found[0], _data_of(local, found[0]), local)
    recipe = Recipe(
        tuple(each(_without_data, tree.leaves)),
        plan.views,
        plan.spans,
        plan.layout,
        sk if found is not None else None,
        signed,
        local,
        *_program(plan, datas, chunk),
    )
    if found is None:
        return Prepared(recipe, datas, [], tree)
    return Prepared(recipe, datas, found[1])


def _without_data(leaf: TensorLeaf) -> TensorLeaf:
    """``leaf`` not holding on to the caller's tensor (a recipe outlives the stage)."""
    return TensorLeaf(
        leaf.path, NO_DATA, leaf.wrap, leaf.requires_grad, leaf.attrs, leaf.spec, leaf.param,
        leaf.same_as,
    )  # fmt: skip


def _data_of(local: tuple[int, ...], objs: list[Any]) -> list[torch.Tensor]:
    datas = list(objs)
    for i in local:
        datas[i] = objs[i]._local_tensor
    return datas


_KINDS = (_TYPES, _REQUIRES_GRAD, _HAS_ATTRS)


def _stamp(objs: list[Any], datas: list[torch.Tensor], local: tuple[int, ...]) -> tuple[Any, ...]:
    """What a recipe depends on besides the skeleton; C-level maps, no Python per tensor (but
    per DTensor: its placements and whether it is a parameter)."""
    return (*read_all(_KINDS, objs), _ties(objs), _specs(objs, local), *stamp(datas))


def _specs(objs: list[Any], local: tuple[int, ...]) -> list[tuple[Any, bool]]:
    return [(objs[i]._spec, isinstance(objs[i], torch.nn.Parameter)) for i in local]


def _still(recipe: Recipe, objs: list[Any], datas: list[torch.Tensor]) -> bool:
    """Whether ``_stamp(objs, datas, recipe.local) == recipe.stamp``, compared a slice at a time
    as it is read (``matches``): no stamp of the whole is built or freed."""
    kinds, (ties, specs), metadata = recipe.stamp[:3], recipe.stamp[3:5], recipe.stamp[5:]
    return (
        matches(_KINDS, objs, kinds)
        and _ties(objs) == ties
        and _specs(objs, recipe.local) == specs
        and fits(datas, metadata)
    )


def _ties(objs: list[Any]) -> list[int] | None:
    """For each leaf, the first leaf that is the same object (tied weights); ``None``: none is.
    Read and checked a slice at a time (``breathe``); only a state dict with ties maps them."""
    (ids,) = read_all((_IDS,), objs)
    seen: set[int] = set()
    for at in range(0, len(ids), SLICE):
        breathe()
        seen.update(ids[at : at + SLICE])
    if len(seen) == len(ids):
        return None
    first = dict(zip(reversed(ids), range(len(ids) - 1, -1, -1), strict=True))
    return list(map(first.__getitem__, ids))


def _program(
    plan: StoragePlan, datas: list[torch.Tensor], chunk: int
) -> tuple[tuple[tuple[Pick, int], ...], tuple[tuple[int, int], ...], tuple[torch.device, ...]]:
    """Which leaves are copied in batches, which spans as bytes, and the CUDA devices."""
    owner: dict[int, int] = {}  # span -> its first leaf
    exact: dict[int, bool] = {}  # span -> one contiguous tensor is exactly its bytes
    for i, view in enumerate(plan.views):
        if not i % _STEP:
            breathe()
        if view.span >= 0:
            first = owner.setdefault(view.span, i)
            t = datas[i]
            whole = view.offset == 0 and t.nbytes == plan.spans[view.span].nbytes
            same = first == i or plan.views[first] == view
            exact[view.span] = exact.get(view.span, True) and same and whole and t.is_contiguous()
    batches: list[list[int]] = [[]]
    bytewise: list[tuple[int, int]] = []
    size = 0
    most = ONE_THREAD_BYTES - 1 if one_thread() else chunk  # larger: copied as bytes
    for k, span in enumerate(plan.spans):
        if not k % _STEP:
            breathe()
        if not (exact[k] and span.device.type == "cpu" and span.nbytes <= most):
            bytewise.append((k, owner[k]))
            continue
        if size + span.nbytes > chunk or len(batches[-1]) >= _BATCH:
            batches.append([])
            size = 0
        batches[-1].append(owner[k])
        size += span.nbytes
    picks = tuple((operator.itemgetter(*b), len(b)) for b in batches if b)
    devices = tuple({s.device for s in plan.spans if s.device.type == "cuda"})
    return picks, tuple(bytewise), devices


# ---------------------------------------------------------------- filling buffers


@dataclass(eq=False)
class _Made:
    """The staged tensors built over one set of buffers for one recipe, kept for its next fill:
    a plain view per leaf (the copy targets), what the caller gets per leaf (wrapped; tied leaves
    share one object), and the targets of each batch. ``seal`` records the handed-out tensors'
    state after the last fill, so one a caller changed (metadata, ``requires_grad``, ``grad``,
    attributes, an in-place op) is built afresh."""

    recipe: Recipe
    plains: list[torch.Tensor]
    outs: list[Any]
    targets: list[list[torch.Tensor]]
    seal: tuple[Any, ...] = ()


def _made(recipe: Recipe, buffers: Buffers) -> _Made:
    """The staged tensors over ``buffers`` for ``recipe``: those of the last fill if intact."""
    made = buffers.made
    if isinstance(made, _Made) and made.recipe is recipe and _intact(made):
        return made
    plains = _plains(recipe, buffers)
    outs: list[Any] = []
    for leaf, plain in zip(recipe.leaves, plains, strict=True):
        if not len(outs) % _STEP:
            breathe()
        outs.append(wrap_leaf(leaf, plain) if leaf.same_as is None else outs[leaf.same_as])
    targets = [_listed(pick(plains), n) for pick, n in recipe.batches]
    buffers.made = made = _Made(recipe, plains, outs, targets)
    made.seal = _seal(made)
    return made


_SEALED = (_TYPES, _REQUIRES_GRAD, _HAS_ATTRS, _GRADS)
_SEALED_DATA = (_ADDRESS, _VERSIONS)


def _plains(recipe: Recipe, buffers: Buffers) -> list[torch.Tensor]:
    """A plain tensor over ``buffers`` per view of ``recipe`` (``breathe`` between a few)."""
    flats = buffers.flats  # not their storages: a storage object made per span would live on
    return each(lambda v: view_tensor(v, flats), recipe.views)


def each(func: Callable[[Any], _R], items: Iterable[Any]) -> list[_R]:
    """``[func(x) for x in items]`` for a ``func`` of microseconds, with ``breathe`` between
    a few items: a worker's per-leaf Python never holds the GIL for long."""
    out: list[_R] = []
    for i, x in enumerate(items):
        if not i % _STEP:
            breathe()
        out.append(func(x))
    return out


def _seal(made: _Made) -> tuple[Any, ...]:
    """The handed-out tensors' type, ``requires_grad``, attributes, grad, address and version
    (in-place metadata changes like ``t_()`` or ``resize_`` bump it; so do our copies)."""
    kinds = read_all(_SEALED, made.outs)
    return (*kinds, *read_all(_SEALED_DATA, _data_of(made.recipe.local, made.outs)))


def _versions(made: _Made) -> array.array[int]:
    """``versions`` of the handed-out tensors, kept in the seal as an array: no collection
    ever walks it (a list of them is new at every stage, walked by the young pass after)."""
    return array.array("q", versions(_data_of(made.recipe.local, made.outs)))


def versions(datas: list[torch.Tensor]) -> list[int]:
    """Each tensor's in-place change counter (shared by its views), read in bulk."""
    return read_all((_VERSIONS,), datas)[0]


def _intact(made: _Made) -> bool:
    n = len(_SEALED)
    try:
        return matches(_SEALED, made.outs, made.seal[:n]) and matches(
            _SEALED_DATA, _data_of(made.recipe.local, made.outs), made.seal[n:]
        )
    except Exception:  # a handed-out tensor was changed beyond reading it: build afresh
        return False


def _listed(picked: Any, n: int) -> list[Any]:
    """What an ``itemgetter`` of ``n`` indices returned, as a list (one index: the item)."""
    return list(picked) if n > 1 else [picked]


@dataclass(eq=False)
class Fill:
    """One stage's copies into ``buffers`` and the staged state dict over them, run in a worker
    thread; ``events`` collects the CUDA copies it queued (``cuda``: side streams and the
    caller's current stream per device), for the loop to await."""

    prepared: Prepared
    buffers: Buffers
    chunk: int
    cuda: tuple[cuda.SideStreams, dict[torch.device, Any]] | None = None
    events: list[Any] = field(default_factory=list)

    def run(self) -> Any:
        """Copy, then return the staged state dict; cancellation lands between chunks."""
        p = self.prepared
        recipe, datas, values, tree = p.recipe, p.datas, p.values, p.tree
        p.datas, p.values, p.tree = [], [], None  # freed in this thread, never on the loop
        rested()
        with gc_pause.paused():
            if tree is not None:  # planned afresh each time: fresh views, wrapped by unflatten
                plains = _plains(recipe, self.buffers)
                targets = [_listed(pick(plains), n) for pick, n in recipe.batches]
                self._copy(recipe, datas, targets)
                staged = unflatten(tree, plains)
            else:
                assert recipe.skeleton is not None
                made = _made(recipe, self.buffers)
                self._copy(recipe, datas, made.targets)
                made.seal = (*made.seal[:-1], _versions(made))  # the copy bumped them
                staged = rebuild(recipe.skeleton, made.outs, values)
            # this stage's per-tensor lists die inside the pause, unwalked: the young collection
            # that follows it (the GIL held) walks only the staged copy's containers
            del datas, values, tree
            return staged

    def _copy(
        self, recipe: Recipe, datas: list[torch.Tensor], targets: list[list[torch.Tensor]]
    ) -> None:
        """Queue the CUDA copies, copy the batches, then the spans copied as bytes."""
        host: list[tuple[torch.Tensor, torch.Tensor]] = []
        moves: list[tuple[int, int, int]] = []  # (to, from, bytes): CPU bytes, one thread
        by_device: dict[torch.device, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        single = one_thread()
        for k, j in recipe.bytewise:
            span, flat = recipe.spans[k], self.buffers.flats[k]
            if single and span.device.type == "cpu":  # by address: no storage object made
                at = storage_address(datas[j]) + span.start
                moves.append((flat.data_ptr(), at, span.nbytes))
                continue
            pair = (source_bytes(datas[j].untyped_storage(), span), flat)
            if self.cuda is not None and span.device.type == "cuda":
                by_device.setdefault(span.device, []).append(pair)
            else:
                host.append(pair)
        if self.cuda is not None:
            streams, current = self.cuda
            for device, pairs in by_device.items():
                self.events.append(streams.issue_copies(device, pairs, after=current[device]))
        with torch.no_grad():  # staged tensors may require grad; copying into them is no step
            for (pick, n), dst in zip(recipe.batches, targets, strict=True):
                anyio.from_thread.check_cancelled()
                torch._foreach_copy_(dst, _listed(pick(datas), n))
        copy_chunks(host, self.chunk)
        move_chunks(moves, self.chunk)


def prime(recipe: Recipe, buffers: Buffers) -> None:
    """Build the staged tensors of ``recipe`` over ``buffers`` ahead of their first fill (a
    worker thread; ``reserve``)."""
    if recipe.skeleton is not None:
        _made(recipe, buffers)
