"""State-dict shapes the benches measure at: ``flat`` (~200 large tensors), ``small`` (8192 x 2
KiB), ``transformer`` (the train state of a ~1 GiB decoder-only transformer), ``moe`` (the same
with 64 experts per layer) or ``--tensors N --tensor-kib K``; built as real nested state dicts."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

GB = 1e9
GIB = 1 << 30
SHAPES = ("flat", "small", "transformer", "moe")
VOCAB, LAYERS, EXPERTS, FLAT_NORMS = 32000, 24, 64, 7
SMALL_COUNT, SMALL_KIB = 8192, 2
ADAMW_GROUP: dict[str, Any] = {
    "lr": 3e-4, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01, "amsgrad": False,
    "foreach": None, "maximize": False, "capturable": False, "differentiable": False,
    "fused": None, "decoupled_weight_decay": True,
}  # fmt: skip
Params = tuple[tuple[str, tuple[int, ...]], ...]


@dataclass(frozen=True)
class Shape:
    """A shape: the model's parameters (fully qualified name, size) and how they become the
    state dict. ``train_state``: model + AdamW state (exp_avg, exp_avg_sq, step scalars), as
    ``get_state_dict`` makes it; otherwise the tensors themselves. ``kind`` picks the forward
    pass ``bench/train_stall.py`` trains (``_lib.model``)."""

    name: str
    kind: str  # "flat", "bag", "decoder", "moe"
    params: Params
    train_state: bool
    detail: str
    copy_target: float  # issue 18: staging, warm, vs the raw per-tensor copy_ loop

    def state_dict(
        self, seed: int = 0, fill: Callable[[tuple[int, ...]], torch.Tensor] | None = None
    ) -> dict[str, Any]:
        """The seeded state dict (same seed, same bytes); ``fill(size)`` makes each tensor
        instead (e.g. on the meta device, for the layout alone)."""
        gen = torch.Generator().manual_seed(seed)
        make = fill or (lambda size: torch.randn(size, generator=gen))
        model = {name: make(size) for name, size in self.params}
        if self.kind == "flat":
            return _flat_extras(model)
        if not self.train_state:
            return model
        return {"model": model, "optim": _adamw_state(model, make)}

    def describe(self) -> dict[str, Any]:
        """The figures a report names the shape by, worked out from the parameter list (what
        ``layout(self.state_dict())`` counts): tensor entries and unique bytes."""
        count, nbytes = len(self.params), sum(4 * math.prod(s) for _, s in self.params)
        if self.kind == "flat":
            count += 2  # the tied pair's second name and the slice view: no new bytes
        elif self.train_state:
            count, nbytes = 4 * count, 3 * nbytes + 4 * count  # + exp_avg, exp_avg_sq, step
        return {"shape": self.name, "detail": self.detail, "params": len(self.params)} | {
            "tensors": count,
            "unique_bytes": nbytes,
        }


def layout(sd: Any) -> dict[str, int]:
    """Tensor entries and unique bytes of a real state dict."""
    return {"tensors": sum(1 for _ in tensors(sd)), "unique_bytes": unique_bytes(sd)}


def _flat_extras(sd: dict[str, Any]) -> dict[str, Any]:
    """The flat shape's aliases and values: a tied pair, a slice view and 4 plain values."""
    sd["lm_head.weight"] = sd["embed.weight"]  # tied: the same object
    sd["layers.0.attn.q_view"] = sd["layers.0.attn.qkv.weight"][: sd["norms.0.weight"].numel()]
    sd.update(step=1234, lr=3e-4, tag="bench", sched={"last_epoch": 7, "milestones": [10, 20]})
    return sd


def _adamw_state(
    model: dict[str, torch.Tensor], make: Callable[[tuple[int, ...]], torch.Tensor]
) -> dict[str, Any]:
    """AdamW's state for ``model`` keyed by parameter name, with one parameter group."""
    state = {
        name: {
            "step": torch.tensor(10.0, device=p.device),
            "exp_avg": make(tuple(p.shape)),
            "exp_avg_sq": make(tuple(p.shape)).abs_(),
        }
        for name, p in model.items()
    }
    return {"state": state, "param_groups": [{**ADAMW_GROUP, "params": list(model)}]}


# ---------------------------------------------------------------- sizes


def _round16(x: float) -> int:
    return max(16, math.ceil(x / 16) * 16)


def flat_hidden(gib: float) -> int:
    """Hidden size whose flat state dict holds about ``gib`` GiB: 912 for 1 (x16)."""
    a, b = 4 * LAYERS * 12, 4 * VOCAB  # bytes = a*h^2 + b*h (biases and norms are negligible)
    return _round16((-b + math.sqrt(b * b + 4 * a * gib * GIB)) / (2 * a))


def flat(gib: float) -> Shape:
    """~200 large float32 tensors (embedding, 24 layers of qkv, o, up, down), a tied pair, a
    slice view and 4 values: the shape every bench used before issue 18."""
    h = flat_hidden(gib)
    params: list[tuple[str, tuple[int, ...]]] = [("embed.weight", (VOCAB, h))]
    for i in range(LAYERS):
        for name, rows, cols in (("attn.qkv", 3 * h, h), ("attn.o", h, h)):
            params += [
                (f"layers.{i}.{name}.weight", (rows, cols)),
                (f"layers.{i}.{name}.bias", (rows,)),
            ]
        for name, rows, cols in (("mlp.up", 4 * h, h), ("mlp.down", h, 4 * h)):
            params += [
                (f"layers.{i}.{name}.weight", (rows, cols)),
                (f"layers.{i}.{name}.bias", (rows,)),
            ]
    params += [(f"norms.{j}.weight", (h,)) for j in range(FLAT_NORMS)]
    return Shape("flat", "flat", tuple(params), False, f"h={h}, vocab={VOCAB}", 0.9)


def many(count: int, kib: float, name: str) -> Shape:
    """``count`` float32 tensors of ``kib`` KiB each, in a flat dict."""
    numel = max(1, round(kib * 1024 / 4))
    params = tuple((f"t.{i}", (numel,)) for i in range(count))
    target = 0.9 if kib >= 256 else 0.5  # the small-tensor target below 256 KiB
    return Shape(name, "bag", params, False, f"{count} x {numel * 4 / 1024:g} KiB", target)


def decoder(gib: float, experts: int = 0) -> Shape:
    """The train state of a decoder-only transformer sized to ``gib`` GiB (parameters and the two
    AdamW moments; step scalars aside). ``experts``: each layer's MLP becomes that many SwiGLU
    experts of width ``8h / (3 experts)`` behind a router (the dense MLP's parameter count)."""
    vocab = min(VOCAB, max(256, round(VOCAB * math.sqrt(gib) / 64) * 64))
    n = gib * GIB / 12  # parameters: 4 bytes each, three copies
    a, b = 12 * LAYERS, 2 * vocab  # parameters = a*h^2 + b*h (biases and norms are negligible)
    h = _round16((-b + math.sqrt(b * b + 4 * a * n)) / (2 * a))
    params: list[tuple[str, tuple[int, ...]]] = [("embed.weight", (vocab, h))]
    for i in range(LAYERS):
        params += _block(f"layers.{i}", h, experts)
    params += [("norm.weight", (h,)), ("norm.bias", (h,)), ("lm_head.weight", (vocab, h))]
    name, kind = ("moe", "moe") if experts else ("transformer", "decoder")
    detail = f"h={h}, vocab={vocab}, {LAYERS} layers" + (
        f", {experts} experts of width {max(1, round(8 * h / (3 * experts)))}" if experts else ""
    )
    return Shape(name, kind, tuple(params), True, detail, 0.5 if experts else 0.9)


def _block(prefix: str, h: int, experts: int) -> list[tuple[str, tuple[int, ...]]]:
    """One layer: norms, attention q/k/v/o with biases, then a dense MLP or the experts."""
    out: list[tuple[str, tuple[int, ...]]] = []
    for norm in ("attn_norm", "mlp_norm"):
        out += [(f"{prefix}.{norm}.weight", (h,)), (f"{prefix}.{norm}.bias", (h,))]
    for proj in "qkvo":
        out += [(f"{prefix}.attn.{proj}.weight", (h, h)), (f"{prefix}.attn.{proj}.bias", (h,))]
    if not experts:
        return [
            *out,
            (f"{prefix}.mlp.up.weight", (4 * h, h)), (f"{prefix}.mlp.up.bias", (4 * h,)),
            (f"{prefix}.mlp.down.weight", (h, 4 * h)), (f"{prefix}.mlp.down.bias", (h,)),
        ]  # fmt: skip
    width = max(1, round(8 * h / (3 * experts)))
    out.append((f"{prefix}.moe.router.weight", (experts, h)))
    for e in range(experts):
        at = f"{prefix}.moe.experts.{e}"
        out += [(f"{at}.gate.weight", (width, h)), (f"{at}.up.weight", (width, h))]
        out.append((f"{at}.down.weight", (h, width)))
    return out


# ---------------------------------------------------------------- command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``--shape``, ``--gib``, ``--tensors`` and ``--tensor-kib``."""
    p.add_argument(
        "--shape",
        choices=SHAPES,
        help="flat: ~200 large tensors (default); small: 2 KiB tensors, 8192 of them unless "
        "--gib says the total; transformer: model + AdamW state of a decoder-only transformer; "
        "moe: the same with 64 experts per layer (~20k tensors)",
    )
    p.add_argument("--gib", type=float, help="total size in GiB (default 1; small: 16 MiB)")
    p.add_argument("--tensors", type=int, help="N tensors of --tensor-kib each (not with --shape)")
    p.add_argument("--tensor-kib", type=float, help="size of each of --tensors, in KiB")
    p.add_argument("--describe", action="store_true", help="print the shape's figures and exit")


def parse(
    p: argparse.ArgumentParser, argv: Sequence[str] | None = None
) -> tuple[argparse.Namespace, Shape]:
    """The arguments and the shape they name; with ``--describe``, print the shape (JSON: tensors,
    bytes, ...) and exit."""
    args = p.parse_args(argv)
    shape = from_args(p, args)
    if args.describe:
        print(json.dumps(shape.describe()))
        sys.exit(0)
    return args, shape


def from_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> Shape:
    """The shape the arguments name; ``p.error`` for contradictory ones."""
    if (args.tensors is None) != (args.tensor_kib is None):
        p.error("--tensors and --tensor-kib go together")
    if args.tensors is not None:
        if args.shape is not None or args.gib is not None:
            p.error("--tensors/--tensor-kib replace --shape and --gib")
        if args.tensors < 1 or args.tensor_kib <= 0:
            p.error("--tensors must be >= 1 and --tensor-kib > 0")
        return many(args.tensors, args.tensor_kib, f"{args.tensors}x{args.tensor_kib:g}KiB")
    if args.gib is not None and args.gib <= 0:
        p.error("--gib must be > 0")
    return build(args.shape or "flat", args.gib)


def build(name: str, gib: float | None) -> Shape:
    """The named shape at ``gib`` GiB (``None``: the shape's default size)."""
    makers: dict[str, Callable[[float], Shape]] = {
        "flat": flat,
        "transformer": decoder,
        "moe": lambda g: decoder(g, EXPERTS),
    }
    if name == "small":
        count = SMALL_COUNT if gib is None else max(1, round(gib * GIB / (SMALL_KIB * 1024)))
        return many(count, SMALL_KIB, "small")
    return makers[name](1.0 if gib is None else gib)


# ---------------------------------------------------------------- walking state dicts


def tensors(obj: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a nested dict / list / tuple, aliases included, in order."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from tensors(v)
    elif isinstance(obj, list | tuple):
        for v in obj:
            yield from tensors(v)


def tree_map(fn: Callable[[torch.Tensor], Any], obj: Any) -> Any:
    """``obj`` with every tensor replaced by ``fn(tensor)``; containers rebuilt, values kept."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: tree_map(fn, v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(tree_map(fn, v) for v in obj)
    return obj


def named_tensors(obj: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """``(dotted key path, tensor)`` for every tensor, aliases included."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict | list | tuple):
        items = obj.items() if isinstance(obj, dict) else enumerate(obj)
        for k, v in items:
            yield from named_tensors(v, f"{prefix}.{k}" if prefix else str(k))


def unique_storages(obj: Any) -> list[torch.UntypedStorage]:
    """The distinct storages behind ``obj``'s tensors, in first-seen order."""
    seen: dict[int, torch.UntypedStorage] = {}
    for t in tensors(obj):
        seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage())
    return list(seen.values())


def unique_bytes(obj: Any) -> int:
    """Bytes of the distinct storages behind ``obj``'s tensors (aliases counted once)."""
    return sum(s.nbytes() for s in unique_storages(obj))
