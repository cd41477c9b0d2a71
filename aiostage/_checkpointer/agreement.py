"""The agreement before each save: every rank's row gathered (one small all-gather), and the
reason no rank saves the step, the same on every rank, so none is left in a collective alone."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .._async_save import CheckpointReport, SaveHandle, settled_handle
from .._core import dist
from .._format.codec import step_name
from ..errors import PersistenceError, UnsupportedValueError, UsageError

__all__ = ["agree", "skipped"]


async def agree(
    fg: Any,
    mine: list[int],
    *,
    failure: BaseException | None,
    unstorable: Exception | None,
    root: Path,
    keep_last: int | None,
    pg_timeout: float,
) -> bool:
    """Raise what stops this save, the same on every rank (``mine``: this rank's ``[step,
    newest, overwrite, busy, unstorable, failed, durable]``, gathered over ``fg`` when there is
    one); return whether every rank skips it (a rank busy with ``on_busy="skip"``)."""
    rows = [mine]
    if fg is not None:
        rows = await dist.all_gather_ints(
            fg, mine, pg_timeout=pg_timeout, what="Checkpointer save agreement"
        )
    for error in (failure, unstorable, _refusal(rows, root, keep_last)):
        if error is not None:
            raise error
    return any(row[3] for row in rows)


def skipped(step: int, path: Path, began: float) -> SaveHandle:
    """The settled handle of a save every rank skipped."""
    stall = time.perf_counter() - began
    return settled_handle(CheckpointReport(step, path, True, stall, 0, 0, 0, 0, stall, 0, None))


def _refusal(rows: list[list[int]], root: Path, keep_last: int | None) -> Exception | None:
    """Why no rank saves the step, from each rank's ``[step, newest, overwrite, busy,
    unstorable, failed, durable]`` (a rank raises its own failure or unstorable value itself)."""
    step, newest = rows[0][0], max(row[1] for row in rows)
    if failed := [r for r, row in enumerate(rows) if row[5]]:
        return PersistenceError(
            f"step {step} is not saved: an earlier save failed, and rank(s) {failed} raise its "
            "error at this save; every rank skips the step", path=root,
        )  # fmt: skip
    if bad := [r for r, row in enumerate(rows) if row[4]]:
        return UnsupportedValueError(
            f"rank(s) {bad} hold a value the checkpoint format cannot store (their error names "
            f"the key); no rank saves step {step}"
        )
    if len({row[6] for row in rows}) > 1:
        return UsageError(f"the ranks disagree on durable= for step {step}; pass the same")
    if len({row[0] for row in rows}) > 1:
        saves = ", ".join(f"rank {r}: {row[0]}" for r, row in enumerate(rows))
        return UsageError(f"the ranks save different steps ({saves}); save the same on all")
    if step < newest:
        deleted = (
            f" and retention (keep_last={keep_last}) may delete it at once" if keep_last else ""
        )
        return UsageError(
            f"step {step} is older than step {newest}, the newest committed or being saved in "
            f"{root}: latest() would never return it{deleted}; save steps in increasing order "
            "(to go back, delete the newer steps first, or use another root)"
        )
    if step == newest and not all(row[2] for row in rows):
        return UsageError(
            f"{root / step_name(step)} exists (step {step} is committed or being saved); save "
            "a newer step, or pass overwrite=True to replace it"
        )
    return None
