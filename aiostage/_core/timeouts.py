"""The one ``timeout`` of the public API: its default, its accepted types and its meaning.

``save``, ``async_save``, ``Checkpointer``, ``ReplicationStager``, ``WeightPublisher`` and
``WeightSubscriber`` all take ``timeout: float | timedelta = 600.0`` (seconds): the longest any
one wait for another rank may take (a collective, a send or a receive); past it the operation
fails (``CheckpointWriteError``, ``ReplicationTimeout``). It bounds only waits on work Python
cannot cancel (ProcessGroup operations); everything else is bounded by the caller's own scopes.
"""

from __future__ import annotations

import math
from datetime import timedelta

__all__ = ["DEFAULT_TIMEOUT", "seconds"]

#: ten minutes: peers may be writing or sending hundreds of gigabytes
DEFAULT_TIMEOUT = 600.0


def seconds(timeout: float | timedelta, what: str = "timeout") -> float:
    """``timeout`` in seconds. Blocks on nothing. Raises ``ValueError`` naming ``what`` unless
    it is a positive, finite number of seconds (a ``float``, an ``int`` or a ``timedelta``)."""
    number = isinstance(timeout, int | float) and not isinstance(timeout, bool)
    if isinstance(timeout, timedelta):
        value = timeout.total_seconds()
    else:
        value = float(timeout) if number else math.nan
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(
            f"{what} must be a positive, finite number of seconds (or a timedelta), got {timeout!r}"
        )
    return value
