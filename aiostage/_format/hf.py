"""The Hugging Face layout of exported weights: safetensors headers, shard names, the index.

Pure bytes out: the header of a safetensors file holding given tensors back to back (so a writer
can stream their data after it), how ``save_pretrained`` cuts tensors into shards no larger than a
size (``5GB``, ``500MB``, ``2GiB``), the shards' names (``model-00001-of-00003.safetensors``) and
``model.safetensors.index.json``.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .._core.dtypes import ST_DTYPES

__all__ = [
    "INDEX_NAME",
    "SINGLE_NAME",
    "TensorSpec",
    "index_json",
    "parse_size",
    "safetensors_header",
    "shard_names",
    "split_shards",
]

#: the file ``from_pretrained`` reads when the weights are not sharded
SINGLE_NAME = "model.safetensors"
#: the index ``from_pretrained`` reads when they are
INDEX_NAME = "model.safetensors.index.json"
_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "tib": 1 << 40,
}
_SIZE = re.compile(r"^\s*(?P<n>\d+(?:\.\d+)?)\s*(?P<unit>[a-z]*)\s*$", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One tensor of a safetensors file: its name, dtype and shape (its data comes later)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        """Bytes of its data."""
        return math.prod(self.shape) * self.dtype.itemsize


def parse_size(text: str) -> int:
    """``"5GB"`` -> 5_000_000_000, ``"2GiB"`` -> 2 << 30, ``"1000"`` -> 1000 (bytes).

    Units as Hugging Face reads them: KB, MB, GB, TB are powers of 1000, KiB ... TiB of 1024.
    Raises ``ValueError`` for anything else or a size below one byte.
    """
    m = _SIZE.match(text)
    unit = m["unit"].lower() if m else None
    if m is None or unit not in _UNITS:
        raise ValueError(f"{text!r} is not a size: write e.g. 5GB, 500MB, 2GiB or a byte count")
    n = int(float(m["n"]) * _UNITS[unit])
    if n < 1:
        raise ValueError(f"{text!r} is less than one byte")
    return n


def safetensors_header(specs: Sequence[TensorSpec], metadata: Mapping[str, str]) -> bytes:
    """The first bytes of a safetensors file holding ``specs``' data back to back, in order.

    Length, JSON (``__metadata__`` first) and spaces up to a multiple of 8 bytes, as the
    safetensors library writes it. The caller has checked the names (unique) and the dtypes
    (``ST_DTYPES``); raises ``KeyError`` for a dtype safetensors lacks.
    """
    top: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    at = 0
    for s in specs:
        top[s.name] = {
            "dtype": ST_DTYPES[s.dtype],
            "shape": list(s.shape),
            "data_offsets": [at, at + s.nbytes],
        }
        at += s.nbytes
    body = json.dumps(top, separators=(",", ":"), ensure_ascii=False).encode()
    body = body.ljust(-(-len(body) // 8) * 8, b" ")
    return struct.pack("<Q", len(body)) + body


def split_shards(sizes: Sequence[int], max_size: int) -> list[list[int]]:
    """Indices of ``sizes`` cut into consecutive shards of at most ``max_size`` bytes each.

    As ``save_pretrained`` does: a tensor goes into the current shard while it fits, else starts
    the next one; a tensor larger than ``max_size`` gets a shard of its own. No tensors: one
    empty shard.
    """
    shards: list[list[int]] = [[]]
    used = 0
    for i, n in enumerate(sizes):
        if shards[-1] and used + n > max_size:
            shards.append([])
            used = 0
        shards[-1].append(i)
        used += n
    return shards


def shard_names(count: int) -> list[str]:
    """The file names of ``count`` shards: ``model.safetensors`` alone, else
    ``model-00001-of-00003.safetensors`` ... (the names ``from_pretrained`` looks for)."""
    if count == 1:
        return [SINGLE_NAME]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def index_json(total_size: int, weight_map: Mapping[str, str]) -> bytes:
    """``model.safetensors.index.json``: the tensors' total bytes and the file of each tensor."""
    doc = {"metadata": {"total_size": total_size}, "weight_map": dict(weight_map)}
    return json.dumps(doc, indent=2, ensure_ascii=False).encode() + b"\n"
