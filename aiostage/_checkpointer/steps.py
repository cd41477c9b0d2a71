"""The durable root's committed steps: opening the root (creating it, clearing what crashed
saves left), scanning it, and retention (``keep_last``), which deletes a step only after a newer
one is committed."""

from __future__ import annotations

import logging
import uuid
import warnings
from pathlib import Path, PurePath

from .._format.codec import STEP_NAME, step_name
from .._storage.backend import Storage
from ..errors import AiostageWarning, UsageError

__all__ = ["RootSteps"]

_log = logging.getLogger("aiostage")


class RootSteps:
    """The committed steps of ``root`` this Checkpointer knows of (``committed``); group rank
    ``rank`` 0 creates, sweeps and prunes the root."""

    def __init__(self, storage: Storage, root: Path, keep_last: int | None, rank: int) -> None:
        self.storage, self.root, self.keep_last, self.rank = storage, root, keep_last, rank
        self.committed: list[int] = []

    async def prepare(self) -> None:
        """Create the root and sweep it (rank 0), then read its steps; warn (at the caller of
        the Checkpointer's ``__aenter__``) about leftovers that stay and entries that are not
        checkpoints. Raises ``UsageError`` when the root cannot be a directory."""
        if self.rank == 0:
            stuck: list[tuple[PurePath, OSError]] = []
            try:
                await self.storage.make_root(self.root)
                await self.storage.sweep(self.root, lambda path, e: stuck.append((path, e)))
            except OSError as exc:
                raise UsageError(
                    f"{self.root} cannot be a checkpoint root (a directory): {exc}"
                ) from exc
            for path, error in stuck:
                warnings.warn(
                    f"{path}: a leftover of an interrupted save or deletion could not be "
                    f"removed ({error}); it is hidden and ignored, remove it by hand",
                    AiostageWarning,
                    stacklevel=3,
                )
        self.committed = await self.scan(warn=True)

    def add(self, step: int | None) -> None:
        """``step`` was committed."""
        if step is not None and step not in self.committed:
            self.committed = sorted([*self.committed, step])

    async def retain(self) -> None:
        """Delete the oldest committed steps beyond ``keep_last`` (group rank 0 only). A step
        that cannot be deleted is logged, never raised: the newer save is committed."""
        keep = self.keep_last
        if keep is None or len(self.committed) <= keep:
            return
        old, self.committed = self.committed[:-keep], self.committed[-keep:]
        if self.rank == 0:
            for step in old:
                path = self.root / step_name(step)
                try:
                    await self.storage.delete(path, uuid.uuid4().hex)
                except OSError as exc:
                    _log.warning(
                        "retention could not delete %s (%s); the newer checkpoints are "
                        "committed; remove it by hand (`aiostage ls %s` shows what is left)",
                        path, exc, self.root,
                    )  # fmt: skip

    async def scan(self, *, warn: bool = False) -> list[int]:
        """The committed steps in ``root``; with ``warn``, warn about what is not a checkpoint
        (from ``prepare``: at the caller of ``__aenter__``)."""
        steps = []
        for name, kind in await self.storage.scan(self.root):
            m = STEP_NAME.match(name)
            if m and kind == "checkpoint":
                steps.append(int(m["step"]))
            elif warn:
                what = "an incomplete checkpoint" if m and kind in ("other", "empty") else kind
                warnings.warn(
                    f"{self.root / name}: ignored by the Checkpointer ({what}, not a committed "
                    "step_NNNNNNNNN checkpoint)",
                    AiostageWarning,
                    stacklevel=4,
                )
        return sorted(steps)
