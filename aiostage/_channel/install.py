"""Installing a received weight version into the caller's target, double-buffered or by copy,
and the reading sections a swap waits for.

Double-buffered (``swap``, the default): the target's tensors are re-pointed (``tensor.data =``)
at the version's tensors: on the CPU, views of the buffer it landed in (no copy); on a GPU, a
second device tensor per target tensor, filled first while requests keep reading the first, then
exchanged with it. By copy: the version is copied into the target's own memory. Either way the
change itself runs while no reading section is open and none can open, so every reading section
sees one version; CUDA copies are ordered after the caller's current streams.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.to_thread
import torch

from .._core.cuda import SideStreams
from .._core.tree import KeyPath, flatten, key_str
from .._format.codec import Header
from ..errors import StateDictMismatch

__all__ = ["Installer", "Received", "copy_targets", "match", "swap_targets"]

Pairs = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass(eq=False)
class Received:
    """A version that landed: its frame header, the buffer holding its data, and its tensors by
    key path (views into that buffer, decoded and checked as it landed: ``frame_views``)."""

    version: int
    seq: int
    header: Header
    data: torch.Tensor
    seconds: float
    views: list[tuple[KeyPath, torch.Tensor]]


def copy_targets(target: Any) -> list[tuple[KeyPath, torch.Tensor]]:
    """The tensors a copy-install writes into, by key path: those of ``target``'s state dict."""
    state = target.state_dict() if isinstance(target, torch.nn.Module) else target
    return [(leaf.path, leaf.data) for leaf in flatten(state).leaves]


def swap_targets(target: Any) -> list[tuple[KeyPath, torch.Tensor]]:
    """The tensor objects themselves (parameters, buffers, dict values), by state-dict key
    path, so that re-pointing them is seen by everyone who holds them."""
    if not isinstance(target, torch.nn.Module):
        return list(_walk(target, ()))
    keys = set(target.state_dict())
    named = [
        *target.named_parameters(remove_duplicate=False),
        *target.named_buffers(remove_duplicate=False),
    ]
    return [((name,), t) for name, t in named if name in keys]


def _walk(obj: Any, path: KeyPath) -> Iterator[tuple[KeyPath, torch.Tensor]]:
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _walk(v, (*path, k))
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            yield from _walk(v, (*path, i))


def match(target: list[tuple[KeyPath, torch.Tensor]], received: Received) -> Pairs:
    """``(target tensor, received tensor)`` for every tensor of the target, matched by key path.

    Raises ``StateDictMismatch`` listing every key, shape or dtype that differs.
    """
    sent = dict(received.views)
    problems, pairs = [], []
    for path, dst in target:
        src = sent.pop(path, None)
        if src is None:
            problems.append(f"{key_str(path)}: not in the published state")
        elif src.shape != dst.shape or src.dtype != dst.dtype:
            problems.append(
                f"{key_str(path)}: published {src.dtype} {tuple(src.shape)}, target "
                f"{dst.dtype} {tuple(dst.shape)}"
            )
        else:
            pairs.append((dst, src))
    problems += [f"{key_str(p)}: published but not in the target" for p in sent]
    if problems:
        raise StateDictMismatch(
            f"version {received.version} does not fit the target: " + "; ".join(problems[:5]),
            problems=problems,
        )
    return pairs


@dataclass(eq=False)
class _Plan:
    """How one received buffer goes into the target: the matched pairs, split by where the
    target tensor lives (swap: CPU ones are re-pointed at the buffer, others through a spare)."""

    header: Header
    here: Pairs  # CPU target tensors (swap) or every pair (copy)
    devices: Pairs  # swap only: target tensors on a GPU


class Installer:
    """Install versions into ``target`` (an ``nn.Module`` or a nested state dict of tensors)
    by swap (double-buffered) or by copy, and keep the reading sections a change waits for.

    A change (``install``) waits until no reading section is open, lets none open meanwhile,
    then re-points or copies every target tensor in a worker thread: so no reading section ever
    sees two versions, and a buffer a target stops viewing is read by no open section.
    """

    def __init__(self, target: Any, *, swap: bool) -> None:
        self.target = target
        self.swap = swap
        self.readers = 0
        self._changing = False
        self._changed = anyio.Event()
        self._plans: dict[int, _Plan] = {}
        self._spares: dict[int, torch.Tensor] = {}  # id(target tensor) -> its second device tensor
        self._streams = SideStreams()
        self._swapped = False  # the target's own memory was replaced once: it views versions now

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    @contextlib.asynccontextmanager
    async def reading(self) -> AsyncIterator[None]:
        """A section in which the target does not change (waits while a change is due)."""
        while self._changing:
            await self._changed.wait()
        self.readers += 1
        try:
            yield
        finally:
            self.readers -= 1
            if not self.readers:
                self._notify()

    async def install(self, received: Received, streams: Mapping[torch.device, list[Any]]) -> bool:
        """Put ``received`` into the target; ``streams``: the caller's current CUDA streams
        (taken on its thread), which every copy into a tensor a request may read follows.

        Blocks on the copies to the spares (no reader waits for them), then on the open reading
        sections, then on the change, shielded from cancellation. Returns whether the target now
        views ``received.data`` (keep that buffer until the next version is installed). Raises
        ``StateDictMismatch`` when the version does not fit the target.
        """
        plan = await anyio.to_thread.run_sync(self._plan, received)
        if plan.devices:  # filled while requests read the installed version
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self._fill_spares, plan.devices, streams)
        self._changing = True
        replaced: list[torch.Tensor] = []
        try:
            while self.readers:
                await self._changed.wait()
            with anyio.CancelScope(shield=True):
                replaced = await anyio.to_thread.run_sync(self._change, plan, streams)
        finally:
            self._changing = False
            self._notify()
        if replaced:  # once readers are back, and off the loop
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(_let_go, replaced)
        return self.swap and bool(plan.here)

    def _plan(self, received: Received) -> _Plan:
        """The matched pairs for ``received``'s buffer, reused while its header is the same
        (worker thread)."""
        cached = self._plans.get(received.data.data_ptr())
        if cached is not None and cached.header is received.header and not self.swap:
            return cached
        found = swap_targets(self.target) if self.swap else copy_targets(self.target)
        pairs, seen = [], set()
        for dst, src in match(found, received):
            if id(dst) not in seen:  # a tied parameter is changed once
                seen.add(id(dst))
                pairs.append((dst, src))
        if not self.swap:
            plan = _Plan(received.header, pairs, [])
        else:
            cpu = [(d, s) for d, s in pairs if d.device.type == "cpu"]
            plan = _Plan(received.header, cpu, [(d, s) for d, s in pairs if d.device.type != "cpu"])
        if len(self._plans) >= 4:
            self._plans.clear()
        self._plans[received.data.data_ptr()] = plan
        return plan

    def _fill_spares(self, pairs: Pairs, streams: Mapping[torch.device, list[Any]]) -> None:
        """Copy each version tensor into its target's spare (allocated on first use), after the
        caller's queued work, which may still read a spare as the version before (worker)."""

        def fill() -> None:
            for dst, src in pairs:
                spare = self._spares.get(id(dst))
                if spare is None:
                    spare = self._spares[id(dst)] = torch.empty_like(dst)
                spare.copy_(src)

        self._streams.ordered({d.device for d, _ in pairs}, streams, fill)

    def _change(self, plan: _Plan, streams: Mapping[torch.device, list[Any]]) -> list[torch.Tensor]:
        """Re-point (swap) or copy every target tensor (worker thread, no reader open); at the
        first swap, the aliases of the target's own memory, for ``_let_go`` (later swaps replace
        views of received buffers, which their pool keeps: nothing to let go of, and at 8192
        tensors aliasing them would add ~5 ms to every change)."""
        with torch.no_grad():
            if not self.swap:
                devices = {d.device for d, _ in plan.here if d.device.type != "cpu"}
                self._streams.ordered(devices, streams, lambda: _copy(plan.here))
                return []
            # keeps the target's own memory until _let_go
            replaced = [] if self._swapped else [dst.data for dst, _ in plan.here]
            for dst, src in plan.here:
                dst.data = src
            self._swapped = True
            for dst, _ in plan.devices:
                spare = self._spares[id(dst)]
                self._spares[id(dst)] = dst.data
                dst.data = spare
            return replaced


def _let_go(replaced: list[torch.Tensor]) -> None:
    """Drop our aliases of the memory a swap replaced (worker thread). Where they are its last
    references (the target's own tensors, at the first install), torch frees it inside ``set_``,
    which releases the GIL: dropped by ``tensor.data =`` instead, a 1 GiB target was freed with
    the GIL held, stalling the loop and the requests of that first update. A tensor the caller
    kept of that memory is another alias: it keeps its memory and its values."""
    for t in replaced:
        t.set_(torch.empty(0, dtype=torch.uint8, device=t.device).untyped_storage())


def _copy(pairs: Pairs) -> None:
    for dst, src in pairs:
        dst.copy_(src)
