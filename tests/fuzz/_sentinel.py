"""Tripwires for the fuzzer: a class and a module that record it if a reader ever uses them.

A reader must never resolve a name from a file to code. The fuzzer plants ``_sentinel.Sentinel``
(importable: this module is loaded) and ``_tripwire`` (importable, never loaded by anyone
honest) in namedtuple names, dtype strings and the like, then checks ``TRIPPED`` is empty.
"""

from __future__ import annotations

from typing import Any

#: what ran: one line per instantiation or import
TRIPPED: list[str] = []


class Sentinel:
    """Records every instantiation (and every subclassing) in ``TRIPPED``."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Sentinel:
        TRIPPED.append(f"Sentinel({args!r:.40}, {kwargs!r:.40})")
        return super().__new__(cls)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        TRIPPED.append(f"subclassed by {cls.__name__}")
        super().__init_subclass__(**kwargs)

    def __reduce__(self) -> Any:
        TRIPPED.append("Sentinel.__reduce__")
        return (Sentinel, ())
