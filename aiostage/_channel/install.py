"""Installing a received weight version: match its tensors to the target's by key path."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .._core.tree import KeyPath, flatten, key_str
from .._format.codec import Header
from ..errors import StateDictMismatch

__all__ = ["Received", "copy_targets", "install", "match", "swap_targets"]


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
    """The tensors ``apply`` copies into, by key path: those of ``target``'s state dict."""
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


def install(pairs: list[tuple[torch.Tensor, torch.Tensor]], swap: bool) -> None:
    """Copy each received tensor into its target, or re-point the target at it (``swap``)."""
    with torch.no_grad():
        for dst, src in pairs:
            if swap:
                dst.data = src
            else:
                dst.copy_(src)


def match(
    target: list[tuple[KeyPath, torch.Tensor]], received: Received
) -> list[tuple[torch.Tensor, torch.Tensor]]:
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
