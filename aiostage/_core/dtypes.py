"""Dtype names on disk: aiostage's own (``"float32"``) and the safetensors codes (``"F32"``)."""

from __future__ import annotations

import torch

__all__ = [
    "STORABLE_DTYPES",
    "ST_DTYPES",
    "ST_ITEMSIZE",
    "dtype_from_name",
    "dtype_name",
]

#: torch dtypes that safetensors knows, by their safetensors code
ST_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint64: "U64", torch.uint32: "U32", torch.uint16: "U16", torch.uint8: "U8",
    torch.bool: "BOOL", torch.complex64: "C64",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}  # fmt: skip
#: bytes per element, by safetensors code
ST_ITEMSIZE: dict[str, int] = {code: dt.itemsize for dt, code in ST_DTYPES.items()}

#: quantized dtypes: their tensors carry a quantizer besides their bytes, which no file holds
_QUANTIZED = {"qint8", "quint8", "qint32", "quint4x2", "quint2x4"}
#: the dtypes of tensors ``save`` writes and a reader accepts: every torch dtype but the quantized
STORABLE_DTYPES: frozenset[torch.dtype] = frozenset(
    v for k, v in vars(torch).items() if isinstance(v, torch.dtype) and k not in _QUANTIZED
)


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"`` (how aiostage's metadata names a dtype)."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: object) -> torch.dtype:
    """The inverse of ``dtype_name``; raises ``ValueError`` for anything that is not a dtype."""
    found = getattr(torch, name, None) if isinstance(name, str) and name.isidentifier() else None
    if not isinstance(found, torch.dtype):
        raise ValueError(f"unknown dtype {name!r:.40}")
    return found
