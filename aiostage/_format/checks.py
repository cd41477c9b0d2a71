"""Checks of decoded JSON: each returns the value it checked or raises ``ValueError`` naming what
it is, which the decoders turn into ``CheckpointCorrupt`` naming the file."""

from __future__ import annotations

from typing import Any

__all__ = ["Json", "json_int", "json_list", "json_object"]

Json = Any


def json_object(x: Json, what: str) -> dict[str, Json]:
    """``x`` if it is a JSON object."""
    if not isinstance(x, dict):
        raise ValueError(f"{what} is not a JSON object")
    return x


def json_list(x: Json, what: str) -> list[Json]:
    """``x`` if it is a JSON list."""
    if not isinstance(x, list):
        raise ValueError(f"{what} is not a JSON list")
    return x


def json_int(x: Json, lo: int, hi: int, what: str) -> int:
    """``x`` if it is an integer (not a bool) in ``[lo, hi]``."""
    if type(x) is not int or not lo <= x <= hi:
        raise ValueError(f"{what} {x!r:.40} is not an integer in [{lo}, {hi}]")
    return x
