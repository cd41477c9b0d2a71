"""The real checkpoints the fuzzer mutates, written by ``aiostage.save``, and their templates.

Each base is a small state dict covering one part of the format: nested dicts with tied weights,
views and a non-contiguous tensor, a namedtuple, a Parameter with attributes, non-tensor values
of every tagged kind; a one-tensor file; and a two-rank checkpoint (two saves whose headers and
manifest are rewritten as one world of two, as two ranks would have written them).
"""

from __future__ import annotations

import collections
import functools
import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import torch
import xxhash

import aiostage

Files = dict[str, bytes]

Point = collections.namedtuple("Point", ["x", "y"])


def nested() -> dict[str, Any]:
    """Nested dicts, a tied weight, a row view, a transposed view, a Parameter with attributes,
    a namedtuple, an OrderedDict, int keys and values of every tagged kind."""
    w = torch.arange(48.0).reshape(6, 8)
    p = torch.nn.Parameter(torch.linspace(0, 1, 5))
    p.note = {"lr_scale": 0.5, "tags": ["a", "b"]}  # type: ignore[attr-defined]
    return {
        "model": {"weight": w, "bias": torch.ones(8, dtype=torch.bfloat16), "p": p},
        "head": {"tied": w, "row": w[2], "t": w.t()},
        "mask": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 3),
        "cplx": torch.arange(4.0).to(torch.complex128),
        "point": Point(torch.arange(3, dtype=torch.int64), 2),
        "od": collections.OrderedDict([("a", 1), ("b", torch.tensor(3, dtype=torch.int8))]),
        "optim": {
            "state": {0: {"step": torch.tensor(7.0), "exp_avg": torch.full((6, 8), 0.5)}},
            "groups": [{"lr": 0.001, "betas": (0.9, 0.99), "params": [0]}],
        },
        "values": {
            "none": None,
            "nan": float("nan"),
            "big": 2**62,
            "s": "text",
            "b": b"\x00\xff",
            "dt": torch.float16,
            "size": torch.Size([2, 3]),
        },
    }


def tiny() -> dict[str, Any]:
    """One plain tensor: every mutation of it is close to the core of the format."""
    return {"w": torch.arange(4.0)}


def halves(rank: int) -> dict[str, Any]:
    """What rank ``rank`` of the two-rank base holds: a tensor each, the same keys."""
    return {"w": torch.full((4,), float(rank)), "step": 3}


#: the bases by name, and the state dict each is saved from (also the ``into`` template)
TEMPLATES: dict[str, Callable[[], Any]] = {
    "nested": nested,
    "tiny": tiny,
    "two_rank": lambda: halves(0),
}


def build(root: Path) -> dict[str, Files]:
    """Write every base under ``root`` (once: an existing base is read back) and return each as
    ``{file name: bytes}``."""
    out: dict[str, Files] = {}
    for name in TEMPLATES:
        ckpt = root / name
        if not (ckpt / "manifest.json").exists():
            _write(name, ckpt)
        out[name] = {f.name: f.read_bytes() for f in sorted(ckpt.iterdir())}
    return out


def _write(name: str, ckpt: Path) -> None:
    if name != "two_rank":
        sd = TEMPLATES[name]()
        anyio.run(lambda: aiostage.save(sd, ckpt, metadata={"step": 7, "base": name}))
        return
    parts = [ckpt.with_name(f"{name}.{r}") for r in range(2)]
    for r, part in enumerate(parts):
        anyio.run(functools.partial(aiostage.save, halves(r), part, metadata={"step": 3}))
    ckpt.mkdir(parents=True)
    files = []
    for r, part in enumerate(parts):
        blob = _as_rank((part / "rank_00000.safetensors").read_bytes(), r, 2)
        (ckpt / f"rank_{r:05d}.safetensors").write_bytes(blob)
        (n,) = struct.unpack("<Q", blob[:8])
        digest = xxhash.xxh3_64_hexdigest(blob[: 8 + n])
        files.append(
            {"name": f"rank_{r:05d}.safetensors", "size": len(blob), "header_xxh3": digest}
        )
    manifest = {"format": "aiostage", "version": 1, "world_size": 2, "files": files}
    manifest["metadata"] = {"step": 3}
    (ckpt / "manifest.json").write_text(json.dumps(manifest, indent=1))


def _as_rank(blob: bytes, rank: int, world: int) -> bytes:
    """A one-rank data file rewritten as rank ``rank`` of ``world`` (same length: the header's
    padding absorbs the change)."""
    (n,) = struct.unpack("<Q", blob[:8])
    top = json.loads(blob[8 : 8 + n])
    meta = json.loads(top["__metadata__"]["aiostage"])
    meta["rank"], meta["world_size"] = rank, world
    top["__metadata__"]["aiostage"] = json.dumps(meta, separators=(",", ":"))
    body = json.dumps(top, separators=(",", ":")).encode()
    return blob[:8] + body.ljust(n, b" ") + blob[8 + n :]
