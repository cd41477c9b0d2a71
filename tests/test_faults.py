"""aiostage.testing.FaultyWrites: faults injected into the writes made inside ``aiostage.save``."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import aiostage
from aiostage._storage import localfs
from aiostage.errors import CheckpointCorrupt, CheckpointWriteError
from aiostage.testing import FaultyWrites, LoopLag, assert_state_dict_equal


def make_sd(seed: int = 0) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(64 * 1024, generator=gen)  # 256 KiB: writes of many blocks
    return {"w": w, "tied": w, "b": torch.randn(1000, generator=gen), "step": seed}


def root_cause(exc: BaseException) -> BaseException:
    """The ``OSError`` under a ``CheckpointWriteError`` (task groups keep their group)."""
    cause = exc.__cause__
    while not isinstance(cause, OSError) and cause is not None:
        (cause,) = cause.exceptions  # type: ignore[attr-defined]
    assert cause is not None
    return cause


async def test_enospc_on_the_second_write_commits_nothing(
    tmp_path: Path, aiostage_faults: FaultyWrites
) -> None:
    aiostage_faults.fail(2, errno.ENOSPC)
    with pytest.raises(CheckpointWriteError, match="No space left on device") as info:
        await aiostage.save(make_sd(), tmp_path / "ckpt")
    cause = root_cause(info.value)
    assert isinstance(cause, OSError)
    assert cause.errno == errno.ENOSPC
    assert info.value.path == tmp_path / "ckpt"
    assert os.listdir(tmp_path) == []  # neither the checkpoint nor its temporary directory
    (injected,) = aiostage_faults.injected
    assert injected.startswith("ENOSPC on write 2 of rank_00000.safetensors")
    await aiostage.save(make_sd(), tmp_path / "ckpt")  # the rule is used up
    assert_state_dict_equal(await aiostage.load(tmp_path / "ckpt"), make_sd())


async def test_eio_on_the_manifest_leaves_the_old_checkpoint(
    tmp_path: Path, aiostage_faults: FaultyWrites
) -> None:
    await aiostage.save(make_sd(1), tmp_path / "ckpt")
    aiostage_faults.fail(1, errno.EIO, match="manifest.json")
    with pytest.raises(CheckpointWriteError, match="Input/output error") as info:
        await aiostage.save(make_sd(2), tmp_path / "ckpt", overwrite=True)
    assert getattr(root_cause(info.value), "errno", None) == errno.EIO
    assert os.listdir(tmp_path) == ["ckpt"]
    assert_state_dict_equal(await aiostage.load(tmp_path / "ckpt"), make_sd(1))
    assert [Path(f).name for f, _, _ in aiostage_faults.writes][-1] == "manifest.json"


async def test_every_write_from_the_nth_fails_with_times_none(tmp_path: Path) -> None:
    with FaultyWrites() as faults:
        faults.fail(1, errno.EIO, times=None)
        for name in ("a", "b"):
            with pytest.raises(CheckpointWriteError):
                await aiostage.save(make_sd(), tmp_path / name)
    assert len(faults.injected) == 2
    assert localfs.write_hooks == []
    await aiostage.save(make_sd(), tmp_path / "c")  # inactive after the block


async def test_a_short_write_is_completed_by_the_writer(
    tmp_path: Path, aiostage_faults: FaultyWrites
) -> None:
    aiostage_faults.short(1, match="*.safetensors", times=None)
    await aiostage.save(make_sd(), tmp_path / "ckpt")
    assert aiostage_faults.injected[0].startswith("short write 1 of rank_00000.safetensors")
    assert_state_dict_equal(await aiostage.load(tmp_path / "ckpt"), make_sd())


async def test_a_torn_write_is_detected_when_loading(
    tmp_path: Path, aiostage_faults: FaultyWrites
) -> None:
    aiostage_faults.torn(1, match="*.safetensors")
    await aiostage.save(make_sd(), tmp_path / "ckpt")  # the lost write goes unnoticed here
    with pytest.raises(CheckpointCorrupt, match="checksum mismatch") as info:
        await aiostage.load(tmp_path / "ckpt")
    assert info.value.path == tmp_path / "ckpt" / "rank_00000.safetensors"
    assert info.value.key in {"w", "tied", "b"}


async def test_a_slow_write_does_not_block_the_event_loop(
    tmp_path: Path, aiostage_faults: FaultyWrites
) -> None:
    aiostage_faults.slow(1, 1.0)
    began = time.perf_counter()
    async with LoopLag() as lag:
        await aiostage.save(make_sd(), tmp_path / "ckpt")
    assert time.perf_counter() - began >= 1.0
    assert lag.max_ms < 900, lag.max_ms  # on the loop, the stall would make it >= 1000
    assert lag.beats > 100, lag.beats  # the heartbeat kept ticking through the stall
    assert aiostage_faults.injected[0].startswith("1.0 s delay before write 1")


def test_rules_count_from_one() -> None:
    with pytest.raises(ValueError, match="count from 1"):
        FaultyWrites().fail(0)
    with pytest.raises(ValueError, match="count from 1"):
        FaultyWrites().slow(1, 0.1, times=0)
