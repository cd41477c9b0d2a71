"""Checkpointer and async_save on one rank: retention, latest, resume, failures, busy policies."""

from __future__ import annotations

import gc
import logging
import os
import pathlib

import anyio
import pytest
import torch

import aiostage
from aiostage.errors import AiostageWarning, CheckpointNotFound, ClosedError, UnsupportedValueError
from aiostage.testing import assert_state_dict_equal


def state(seed: int, n: int = 1 << 12) -> dict[str, object]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, generator=g)
    return {"model": {"w": w, "view": w[:16], "b": torch.randn(7, generator=g)}, "step": seed}


def clone(sd: dict[str, object]) -> dict[str, object]:
    m = sd["model"]
    assert isinstance(m, dict)
    w = m["w"].clone()
    return {"model": {"w": w, "view": w[:16], "b": m["b"].clone()}, "step": sd["step"]}


async def test_retention_keeps_the_newest_committed_and_load_returns_them(
    tmp_path: pathlib.Path,
) -> None:
    async with aiostage.Checkpointer(tmp_path, keep_last=2) as ckpt:
        assert await ckpt.latest() is None
        for step in (10, 20, 30):
            handle = await ckpt.save(step, state(step), metadata={"loss": 0.5})
            assert await handle.committed is not None
        assert ckpt.steps() == [20, 30]
        assert await ckpt.latest() == 30
        assert_state_dict_equal(await ckpt.load(), state(30))
        assert_state_dict_equal(await ckpt.load(20), state(20))
        with pytest.raises(CheckpointNotFound):
            await ckpt.load(10)
    assert sorted(os.listdir(tmp_path)) == ["step_000000020", "step_000000030"]
    meta = await aiostage.load_metadata(tmp_path / "step_000000030")
    assert meta == {"loss": 0.5, "step": 30}


async def test_the_state_may_change_once_save_returns(tmp_path: pathlib.Path) -> None:
    sd = state(1)
    expected = clone(sd)
    async with aiostage.Checkpointer(tmp_path) as ckpt:
        handle = await ckpt.save(1, sd)
        await handle.staged
        sd["model"]["w"].add_(1.0)  # type: ignore[index]
        report = await handle.report
        assert_state_dict_equal(await ckpt.load(1), expected)
    assert report.step == 1
    assert not report.skipped
    assert report.stage_bytes == (4096 + 7) * 4
    assert 0 < report.stall_seconds <= report.total_seconds
    assert report.save is not None
    assert report.persist_gb_per_second > 0


async def test_aclose_waits_for_saves_in_flight(tmp_path: pathlib.Path) -> None:
    async with aiostage.Checkpointer(tmp_path, max_in_flight=2) as ckpt:
        handles = [await ckpt.save(s, state(s)) for s in (1, 2)]
    assert all(h.done() for h in handles)
    assert sorted(os.listdir(tmp_path)) == ["step_000000001", "step_000000002"]


async def test_skip_when_busy_says_so_and_wait_waits(tmp_path: pathlib.Path) -> None:
    async with aiostage.Checkpointer(tmp_path / "skip", on_busy="skip") as ckpt:
        first = await ckpt.save(1, state(1))
        second = await ckpt.save(2, state(2))  # no await in between: step 1 is still persisting
        assert second.skipped
        assert not first.skipped
        assert await second.committed is None
        assert (await second.report).skipped
        await first.committed
        third = await ckpt.save(3, state(3))
        assert not third.skipped
    async with aiostage.Checkpointer(tmp_path / "wait", on_busy="wait") as ckpt:
        await ckpt.save(1, state(1))
        second = await ckpt.save(2, state(2))
        assert not second.skipped
        report = await second.report
        assert report.wait_seconds > 0
    assert ckpt.steps() == [1, 2]


async def test_a_background_failure_surfaces_once_and_the_next_save_works(
    tmp_path: pathlib.Path,
) -> None:
    bad = {"w": torch.ones(3), "opaque": object()}  # stages, but the format cannot store it
    async with aiostage.Checkpointer(tmp_path) as ckpt:
        handle = await ckpt.save(1, bad)
        with pytest.raises(UnsupportedValueError, match="opaque"):
            await handle.committed
        await (await ckpt.save(2, state(2))).committed  # already delivered: not raised again
        lost = await ckpt.save(3, bad)
        await lost.wait()  # finished (failed) in the background; nobody received the error
        with pytest.raises(UnsupportedValueError):
            await ckpt.save(4, state(4))  # not delivered yet: raised here, once
        await (await ckpt.save(5, state(5))).committed
        assert ckpt.steps() == [2, 5]
    assert sorted(os.listdir(tmp_path)) == ["step_000000002", "step_000000005"]


async def test_a_failure_nobody_received_is_raised_by_aclose(tmp_path: pathlib.Path) -> None:
    with pytest.raises(UnsupportedValueError):
        async with aiostage.Checkpointer(tmp_path) as ckpt:
            await ckpt.save(1, {"x": object()})
    assert os.listdir(tmp_path) == []


async def test_cancelling_a_save_leaves_no_checkpoint_and_frees_its_slot(
    tmp_path: pathlib.Path,
) -> None:
    big = {"w": torch.ones(16 << 20)}
    async with aiostage.Checkpointer(tmp_path) as ckpt:
        with anyio.move_on_after(0):
            await ckpt.save(1, big)
        await (await ckpt.save(2, state(2))).committed
    assert os.listdir(tmp_path) == ["step_000000002"]


async def test_garbage_in_root_is_ignored_with_a_warning(tmp_path: pathlib.Path) -> None:
    await aiostage.save(state(5), tmp_path / "step_000000005")
    (tmp_path / "step_000000007").mkdir()  # a half-written step
    (tmp_path / "step_000000007" / "rank_00000.safetensors").write_bytes(b"x")
    (tmp_path / "step_000000009").write_text("not a directory")
    leftover = tmp_path / ".step_000000011.aiostage-tmp-0123456789abcdef0123456789abcdef"
    leftover.mkdir()
    ckpt = aiostage.Checkpointer(tmp_path)
    with pytest.warns(AiostageWarning) as seen:
        await ckpt.__aenter__()
    try:
        assert ckpt.steps() == [5]
        assert_state_dict_equal(await ckpt.load(), state(5))
    finally:
        await ckpt.aclose()
    messages = " ".join(str(w.message) for w in seen)
    assert "step_000000007" in messages
    assert "step_000000009" in messages
    assert not leftover.exists()


async def test_misuse_gets_clear_errors(tmp_path: pathlib.Path) -> None:
    ckpt = aiostage.Checkpointer(tmp_path / "root")
    with pytest.raises(ClosedError):
        await ckpt.save(1, state(1))
    with pytest.raises(ValueError, match="keep_last"):
        aiostage.Checkpointer(tmp_path, keep_last=0)
    with pytest.raises(ValueError, match="on_busy"):
        aiostage.Checkpointer(tmp_path, on_busy="drop")  # type: ignore[arg-type]
    (tmp_path / "file").write_text("x")
    with pytest.raises(aiostage.errors.UsageError, match="file cannot be a checkpoint root"):
        await aiostage.Checkpointer(tmp_path / "file").__aenter__()
    async with ckpt:
        with pytest.raises(aiostage.errors.UsageError, match="replicate=True"):
            await ckpt.recover(lost=True)
        with pytest.raises(ValueError, match="step"):
            await ckpt.save(-1, state(1))


async def test_async_save_returns_after_staging(tmp_path: pathlib.Path) -> None:
    sd = state(3)
    expected = clone(sd)
    async with anyio.create_task_group() as tg:
        handle = await aiostage.async_save(sd, tmp_path / "one", task_group=tg, metadata={"k": 1})
        assert handle.staged.done()
        sd["model"]["w"].zero_()  # type: ignore[index]
        report = await handle.committed
        assert report is not None
        assert report.bytes_written > 0
        assert (await handle.report).stage_bytes > 0
    assert_state_dict_equal(await aiostage.load(tmp_path / "one"), expected)
    async with aiostage.DefaultStager() as stager, anyio.create_task_group() as tg:
        handle = await aiostage.async_save(sd, tmp_path / "two", task_group=tg, stager=stager)
        await handle.committed
        assert stager.statistics().leased == 0


async def test_leaving_the_task_group_waits_for_the_save(tmp_path: pathlib.Path) -> None:
    async with anyio.create_task_group() as tg:
        handle = await aiostage.async_save(state(4), tmp_path / "one", task_group=tg)
    assert handle.done()
    assert (await handle.committed) is not None
    assert_state_dict_equal(await aiostage.load(tmp_path / "one"), state(4))


async def test_async_save_failure_is_raised_by_committed(tmp_path: pathlib.Path) -> None:
    async with anyio.create_task_group() as tg:  # a failed save does not fail the group
        handle = await aiostage.async_save({"x": object()}, tmp_path / "bad", task_group=tg)
    with pytest.raises(UnsupportedValueError):
        await handle.committed
    with pytest.raises(UnsupportedValueError):
        await handle.report
    assert not (tmp_path / "bad").exists()


async def test_an_async_save_error_nobody_awaits_is_logged(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="aiostage"):
        async with anyio.create_task_group() as tg:
            await aiostage.async_save({"x": object()}, tmp_path / "lost", task_group=tg)
        gc.collect()
        assert "nobody awaited it" in caplog.text
        assert "UnsupportedValueError" in caplog.text
        caplog.clear()
        async with anyio.create_task_group() as tg:
            handle = await aiostage.async_save({"x": object()}, tmp_path / "seen", task_group=tg)
        with pytest.raises(UnsupportedValueError):
            await handle.committed
        del handle
        gc.collect()
        assert "nobody awaited" not in caplog.text


async def test_a_cancelled_async_save_settles_its_handle(tmp_path: pathlib.Path) -> None:
    async with anyio.create_task_group() as tg:
        handle = await aiostage.async_save(state(5), tmp_path / "gone", task_group=tg)
        tg.cancel_scope.cancel()
    assert handle.done()
    with pytest.raises(aiostage.errors.PersistenceError, match="cancelled"):
        await handle.committed
    assert not (tmp_path / "gone").exists()
    with pytest.raises(RuntimeError, match="not active"):
        await aiostage.async_save(state(5), tmp_path / "late", task_group=tg)


async def test_a_handle_cannot_be_settled_by_its_caller(tmp_path: pathlib.Path) -> None:
    async with aiostage.Checkpointer(tmp_path) as ckpt:
        handle = await ckpt.save(1, state(1))
        for name in ("staged", "committed", "report"):
            outcome = getattr(handle, name)
            assert isinstance(outcome, aiostage.Outcome)
            assert not {"set", "fail", "unseen_error"} & set(dir(outcome))
        with pytest.raises(AttributeError):
            handle.step = 2  # type: ignore[misc]
        await handle.committed
        assert handle.done()
        assert "done" in repr(handle.committed)


async def test_the_body_error_is_not_masked_by_a_background_failure(
    tmp_path: pathlib.Path,
) -> None:
    handles = []

    async def run() -> None:
        async with aiostage.Checkpointer(tmp_path) as ckpt:
            handles.append(await ckpt.save(1, {"x": object()}))
            await handles[0].wait()
            raise KeyError("body")

    with pytest.raises(KeyError, match="body"):
        await run()
    with pytest.raises(UnsupportedValueError):
        await handles[0].committed  # still delivered through the handle


async def test_retention_never_deletes_the_newest_committed_checkpoint(
    tmp_path: pathlib.Path,
) -> None:
    async with aiostage.Checkpointer(tmp_path, keep_last=1) as ckpt:
        await (await ckpt.save(1, state(1))).committed
        failed = await ckpt.save(2, {"x": object()})
        await failed.wait()
        assert await ckpt.latest() == 1
        with pytest.raises(UnsupportedValueError):
            await ckpt.save(3, state(3))
        assert_state_dict_equal(await ckpt.load(), state(1))
    assert os.listdir(tmp_path) == ["step_000000001"]


async def test_a_step_retention_cannot_delete_leaves_the_newer_save_committed(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "ckpt"
    async with aiostage.Checkpointer(root, keep_last=1) as ckpt:
        await (await ckpt.save(1, state(1))).committed
        stuck = next((root / "step_000000001").glob("*.safetensors"))
        made = await anyio.run_process(["chattr", "+i", str(stuck)], check=False)
        if made.returncode:
            pytest.skip("an immutable file needs root and a file system with chattr +i")
        try:
            with caplog.at_level(logging.WARNING, logger="aiostage"):
                report = await (await ckpt.save(2, state(2))).report
            assert report.step == 2
            assert "retention could not delete" in caplog.text
            assert "step_000000001" in caplog.text
            await (await ckpt.save(3, state(3))).committed  # and saving goes on
            assert await ckpt.latest() == 3
            await ckpt.aclose()
            reopened = aiostage.Checkpointer(root, keep_last=1)  # a restart
            with pytest.warns(AiostageWarning, match="could not be removed"):
                await reopened.__aenter__()  # the hidden leftover does not stop it
            try:
                assert_state_dict_equal(await reopened.load(), state(3))
            finally:
                await reopened.aclose()
        finally:
            await anyio.run_process(["chattr", "-R", "-i", str(root)], check=False)


CHILD = r"""
import os, signal, sys
import anyio, torch
import aiostage
from aiostage._storage import localfs

def state(step):
    return {"w": torch.full((1 << 20,), float(step)), "step": step}

async def main(root):
    async with aiostage.Checkpointer(root, keep_last=2) as ckpt:
        for step in (1, 2):
            await (await ckpt.save(step, state(step))).committed
        writes = []
        def kill_mid_file(name, offset, n):  # the 2nd chunk of step 3's data file
            if name.endswith(".safetensors"):
                writes.append(n)
                if len(writes) == 2:
                    os.kill(os.getpid(), signal.SIGKILL)
        localfs.write_hooks.append(kill_mid_file)
        await (await ckpt.save(3, state(3))).committed

anyio.run(main, sys.argv[1])
"""


def test_sigkill_mid_save_leaves_the_last_committed_checkpoint(tmp_path: pathlib.Path) -> None:
    import signal
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path)], capture_output=True, timeout=60, check=False
    )
    assert done.returncode == -signal.SIGKILL, done.stderr
    hidden = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert len(hidden) == 1, hidden  # the interrupted save's temporary directory

    async def resume() -> None:
        async with aiostage.Checkpointer(tmp_path, keep_last=2) as ckpt:
            assert ckpt.steps() == [1, 2]
            loaded = await ckpt.load()
            assert loaded["step"] == 2
            assert torch.equal(loaded["w"], torch.full((1 << 20,), 2.0))
            await (await ckpt.save(3, {"w": torch.zeros(3), "step": 3})).committed

    anyio.run(resume)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000000002", "step_000000003"]


async def test_an_injected_enospc_surfaces_at_the_handle_and_at_the_next_save(
    tmp_path: pathlib.Path,
) -> None:
    from aiostage.errors import CheckpointWriteError
    from aiostage.testing import FaultyWrites

    async with aiostage.Checkpointer(tmp_path, keep_last=1) as ckpt:
        await (await ckpt.save(1, state(1))).committed
        with FaultyWrites() as faults:
            faults.fail(1, match="*.safetensors")  # ENOSPC on the data file's first write
            handle = await ckpt.save(2, state(2))
            with pytest.raises(CheckpointWriteError, match="No space left"):
                await handle.committed
            faults.fail(1, match="manifest.json")
            unseen = await ckpt.save(3, state(3))
            await unseen.wait()
        with pytest.raises(CheckpointWriteError):
            await ckpt.save(4, state(4))  # the failure of step 3, which nobody received
        assert ckpt.steps() == [1]  # keep_last=1, yet the last committed one survived
        await (await ckpt.save(5, state(5))).committed
    assert os.listdir(tmp_path) == ["step_000000005"]


async def test_reserve_makes_the_first_save_warm(tmp_path: pathlib.Path) -> None:
    stager = aiostage.DefaultStager(aiostage.StagingOptions(pool_size=1))
    async with aiostage.Checkpointer(tmp_path, stager=stager) as ckpt:
        await ckpt.reserve(state(1))
        assert stager.statistics().allocations == 1
        await (await ckpt.save(1, state(1))).committed
        assert stager.statistics().allocations == 1
    await stager.aclose()
    with pytest.raises(ClosedError):
        await ckpt.reserve(state(1))
