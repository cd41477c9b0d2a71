"""A module no reader may import: importing it records the fact in ``_sentinel.TRIPPED``."""

from __future__ import annotations

import _sentinel

_sentinel.TRIPPED.append("imported _tripwire")


class Trip(_sentinel.Sentinel):
    """A class named by hostile files (``_tripwire.Trip``)."""
