"""Checkpointer and async_save on one rank: retention, latest, resume, failures, busy policies."""

from __future__ import annotations

import collections
import dataclasses
import gc
import logging
import os
import pathlib
from collections.abc import Awaitable, Callable

import anyio
import pytest
import torch

import aiostage
from aiostage.errors import (
    AiostageWarning,
    CheckpointNotFound,
    CheckpointWriteError,
    ClosedError,
    UnsupportedValueError,
    UsageError,
)
from aiostage.testing import FaultyWrites, assert_state_dict_equal


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
    with FaultyWrites() as faults:
        async with aiostage.Checkpointer(tmp_path) as ckpt:
            faults.fail(1, match="*.safetensors")  # ENOSPC: step 1 stages, then fails to write
            handle = await ckpt.save(1, state(1))
            with pytest.raises(CheckpointWriteError, match="No space left"):
                await handle.committed
            await (await ckpt.save(1, state(1))).committed  # delivered, not raised; 1 is retried
            faults.fail(1, match="*.safetensors")  # the next save's data file
            lost = await ckpt.save(3, state(3))
            await lost.wait()  # finished (failed) in the background; nobody received the error
            with pytest.raises(CheckpointWriteError):
                await ckpt.save(4, state(4))  # not delivered yet: raised here, once
            await (await ckpt.save(5, state(5))).committed
            assert ckpt.steps() == [1, 5]
    assert sorted(os.listdir(tmp_path)) == ["step_000000001", "step_000000005"]


async def test_a_failure_nobody_received_is_raised_by_aclose(tmp_path: pathlib.Path) -> None:
    async def save_and_leave() -> None:
        async with aiostage.Checkpointer(tmp_path) as ckpt:
            await ckpt.save(1, state(1))

    with FaultyWrites() as faults:
        faults.fail(1)
        with pytest.raises(CheckpointWriteError):
            await save_and_leave()
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
    with FaultyWrites() as faults:
        faults.fail(1, match="*.safetensors")  # ENOSPC: staged, then fails to write
        async with anyio.create_task_group() as tg:  # a failed save does not fail the group
            handle = await aiostage.async_save(state(1), tmp_path / "bad", task_group=tg)
    with pytest.raises(CheckpointWriteError, match="No space left"):
        await handle.committed
    with pytest.raises(CheckpointWriteError):
        await handle.report
    assert not (tmp_path / "bad").exists()


async def test_an_async_save_error_nobody_awaits_is_logged(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="aiostage"), FaultyWrites() as faults:
        faults.fail(1, match="*.safetensors", times=None)
        async with anyio.create_task_group() as tg:
            await aiostage.async_save(state(1), tmp_path / "lost", task_group=tg)
        gc.collect()
        assert "nobody awaited it" in caplog.text
        assert "CheckpointWriteError" in caplog.text
        caplog.clear()
        async with anyio.create_task_group() as tg:
            handle = await aiostage.async_save(state(1), tmp_path / "seen", task_group=tg)
        with pytest.raises(CheckpointWriteError):
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
            handles.append(await ckpt.save(1, state(1)))
            await handles[0].wait()
            raise KeyError("body")

    with FaultyWrites() as faults:
        faults.fail(1)
        with pytest.raises(KeyError, match="body"):
            await run()
    with pytest.raises(CheckpointWriteError):
        await handles[0].committed  # still delivered through the handle


async def test_retention_never_deletes_the_newest_committed_checkpoint(
    tmp_path: pathlib.Path,
) -> None:
    async with aiostage.Checkpointer(tmp_path, keep_last=1) as ckpt:
        await (await ckpt.save(1, state(1))).committed
        with FaultyWrites() as faults:
            faults.fail(1)
            failed = await ckpt.save(2, state(2))
            await failed.wait()
        assert await ckpt.latest() == 1
        with pytest.raises(CheckpointWriteError):
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


# ---------------------------------------------------------------- failing fast (issue 17)


@dataclasses.dataclass
class _Config:
    name: str
    extra: object


_Pair = collections.namedtuple("_Pair", ["a", "b"])


def _with_attribute() -> torch.Tensor:
    t = torch.ones(2)
    t.origin = object()  # type: ignore[attr-defined]
    return t


@pytest.mark.parametrize(
    ("bad", "metadata"),
    [
        ({"w": torch.ones(3), "opaque": object()}, None),
        ({"optim": {"param_groups": [{"lr": 0.1, "fn": len}]}}, None),
        ({(1, 2): torch.ones(1)}, None),
        ({"cfg": _Config("x", object())}, None),
        ({"pair": _Pair(1, {2, 3})}, None),
        ({"t": _with_attribute()}, None),
        ({"w": torch.ones(1)}, {"when": object()}),
    ],
    ids=["value", "nested", "key", "dataclass", "namedtuple", "tensor-attr", "metadata"],
)
async def test_save_refuses_what_the_format_cannot_store_at_once(
    tmp_path: pathlib.Path, bad: dict[object, object], metadata: dict[str, object] | None
) -> None:
    with pytest.raises(UnsupportedValueError) as direct:
        await aiostage.save(bad, tmp_path / "direct", metadata=metadata)
    stager = aiostage.DefaultStager(pool_size=1)
    async with aiostage.Checkpointer(tmp_path / "root", stager=stager) as ckpt:
        with pytest.raises(UnsupportedValueError) as refused:
            await ckpt.save(1, bad, metadata=metadata)
        assert str(refused.value) == str(direct.value)  # aiostage.save's words, and its key
        assert refused.value.key == direct.value.key
        assert stager.statistics().stages == 0  # refused before anything was staged
        await (await ckpt.save(1, state(1))).committed  # step 1 was never taken
    await stager.aclose()
    assert os.listdir(tmp_path / "root") == ["step_000000001"]
    async with anyio.create_task_group() as tg:  # async_save too: at once, not when written
        with pytest.raises(UnsupportedValueError) as late:
            await aiostage.async_save(bad, tmp_path / "async", task_group=tg, metadata=metadata)
    assert str(late.value) == str(direct.value)
    assert not (tmp_path / "async").exists()


async def test_saving_needs_async_with_and_reading_does_not(tmp_path: pathlib.Path) -> None:
    await aiostage.save(state(1), tmp_path / "step_000000001")
    ckpt = aiostage.Checkpointer(tmp_path, replicate=True)
    assert await ckpt.latest() == 1  # reading works without `async with`
    assert_state_dict_equal(await ckpt.load(), state(1))
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: ckpt.save(2, state(2)),
        lambda: ckpt.reserve(state(2)),
        lambda: ckpt.recover(lost=True),
    ]
    for call in calls:
        with pytest.raises(UsageError, match=r"not entered.*`async with Checkpointer") as seen:
            await call()
        assert not isinstance(seen.value, ClosedError)  # it was never closed
    async with ckpt:
        await (await ckpt.save(2, state(2))).committed
    for call in calls:
        with pytest.raises(ClosedError, match="closed; create a new one"):
            await call()
    assert await ckpt.latest() == 2  # and reading works after it
    assert_state_dict_equal(await ckpt.load(), state(2))


async def test_a_step_that_exists_is_refused_unless_overwrite(tmp_path: pathlib.Path) -> None:
    async with aiostage.Checkpointer(tmp_path) as ckpt:
        await (await ckpt.save(1, state(1))).committed
        with pytest.raises(UsageError, match=r"step_000000001 exists.*overwrite=True"):
            await ckpt.save(1, state(2))
        assert_state_dict_equal(await ckpt.load(1), state(1))  # untouched
        await (await ckpt.save(1, state(2), overwrite=True)).committed
        assert_state_dict_equal(await ckpt.load(1), state(2))
        handle = await ckpt.save(2, state(2))  # being saved (or committed) when saved again
        with pytest.raises(UsageError, match="step_000000002 exists"):
            await ckpt.save(2, state(3))
        await handle.committed
    async with aiostage.Checkpointer(tmp_path) as again:  # steps found on entry count too
        with pytest.raises(UsageError, match="step_000000002 exists"):
            await again.save(2, state(3))
    assert_state_dict_equal(await again.load(2), state(2))


async def test_a_step_older_than_the_newest_is_refused(tmp_path: pathlib.Path) -> None:
    async with aiostage.Checkpointer(tmp_path, keep_last=2) as ckpt:
        for step in (10, 20):
            await (await ckpt.save(step, state(step))).committed
        with pytest.raises(UsageError, match=r"step 15 is older than step 20.*keep_last=2"):
            await ckpt.save(15, state(15))
        with pytest.raises(UsageError, match="step 10 is older"):
            await ckpt.save(10, state(10), overwrite=True)  # overwrite replaces the newest only
        assert ckpt.steps() == [10, 20]
        await (await ckpt.save(21, state(21))).committed
        assert await ckpt.latest() == 21
    assert sorted(os.listdir(tmp_path)) == ["step_000000020", "step_000000021"]


# ---------------------------------------------------------------- zero-stall saves (overlap=True)


async def test_an_overlapped_save_returns_at_issue_and_saves_the_state_of_that_moment(
    tmp_path: pathlib.Path,
) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    async with aiostage.Checkpointer(tmp_path) as ckpt:
        state = aiostage.train_state(model, opt)
        before = {k: v.clone() for k, v in model.named_parameters()}
        handle = await ckpt.save(1, state, overlap=True)  # the copy runs behind this
        assert not handle.staged.done()
        loss = model(torch.ones(8, 64)).square().mean()  # forward and backward change nothing
        loss.backward()
        await handle.staged  # ... and only now may the step change the weights
        opt.step()
        await handle.committed
    loaded = await aiostage.load(tmp_path / "step_000000001")
    assert_state_dict_equal(dict(loaded["model"]), before)


async def test_a_state_changed_before_staged_fails_that_save_naming_the_key(
    tmp_path: pathlib.Path,
) -> None:
    sd = {"a": torch.zeros(1 << 16), "b": torch.ones(1 << 16)}
    async with aiostage.Checkpointer(tmp_path) as ckpt:
        handle = await ckpt.save(1, sd, overlap=True)
        sd["b"].add_(1)  # too early: the copy may be torn
        with pytest.raises(aiostage.errors.StagingError, match=r"^b: changed in place") as err:
            await handle.staged
        with pytest.raises(aiostage.errors.StagingError) as again:
            await handle.committed
        assert again.value is err.value
        await (await ckpt.save(2, sd, overlap=True)).committed  # the next save works
        assert ckpt.steps() == [2]
    assert sorted(os.listdir(tmp_path)) == ["step_000000002"]  # nothing of step 1 is visible


async def test_an_overlapped_save_refuses_at_once_what_fails_before_the_copy(
    tmp_path: pathlib.Path,
) -> None:
    async with aiostage.Checkpointer(tmp_path) as ckpt:
        with pytest.raises(aiostage.errors.StagingError, match=r"^bad"):
            await ckpt.save(1, {"bad": torch.ones(2).to_sparse()}, overlap=True)
        await (await ckpt.save(1, state(1), overlap=True)).committed  # the slot came back
