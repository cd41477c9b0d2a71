"""TrainState: a model, optimizer and scheduler save, resume, and train on identically."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch

import aiostage
from aiostage.testing import assert_state_dict_equal


def _model(seed: int, lr: float = 0.05) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    return model, torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)


def _steps(
    model: torch.nn.Module, opt: torch.optim.Optimizer, first: int, n: int, sched: Any = None
) -> list[float]:
    losses = []
    for step in range(first, first + n):
        gen = torch.Generator().manual_seed(step)
        x, y = torch.randn(5, 6, generator=gen), torch.randn(5, 3, generator=gen)
        loss = (model(x) - y).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        if sched is not None:
            sched.step()
        losses.append(loss.item())
    return losses


async def test_a_resumed_model_optimizer_and_scheduler_train_on_with_identical_losses(
    tmp_path: Path,
) -> None:
    model, opt = _model(0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    _steps(model, opt, 0, 3, sched)
    at_3 = dict(sched.state_dict())
    state = aiostage.train_state(model, opt, sched)
    assert sorted(await state.state_dict()) == ["model", "optim", "sched"]
    await aiostage.save(state, tmp_path / "ckpt")
    expected = _steps(model, opt, 3, 4, sched)
    lr = opt.param_groups[0]["lr"]

    fresh, fresh_opt = _model(1, lr=0.5)  # other weights and lr, an optimizer never stepped
    fresh_sched = torch.optim.lr_scheduler.StepLR(fresh_opt, step_size=7, gamma=0.9)
    into = aiostage.train_state(fresh, fresh_opt, fresh_sched)
    loaded = await aiostage.load(tmp_path / "ckpt", into=into)
    assert sorted(loaded) == ["model", "optim", "sched"]
    assert fresh_opt.param_groups[0]["lr"] == 0.05 * 0.5  # the scheduler's, at step 3
    assert fresh_sched.state_dict() == at_3
    assert _steps(fresh, fresh_opt, 3, 4, fresh_sched) == expected
    assert fresh_opt.param_groups[0]["lr"] == lr
    assert_state_dict_equal(fresh.state_dict(), model.state_dict())


async def test_a_model_alone(tmp_path: Path) -> None:
    model, _ = _model(0)
    state = aiostage.train_state(model)
    assert list(await state.state_dict()) == ["model"]
    await aiostage.save(state, tmp_path / "ckpt")
    fresh, _ = _model(1)
    await aiostage.load(tmp_path / "ckpt", into=aiostage.train_state(fresh))
    assert_state_dict_equal(fresh.state_dict(), model.state_dict())


@pytest.mark.parametrize(
    "make",
    [
        lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.01),
        lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01),
    ],
    ids=["adam", "adamw", "sgd"],
)
async def test_building_the_state_of_a_fresh_optimizer_changes_nothing(
    tmp_path: Path, make: Any
) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = make(model.parameters())
    calls: list[str] = []
    opt.register_step_pre_hook(lambda *_: calls.append("pre"))
    opt.register_step_post_hook(lambda *_: calls.append("post"))
    params = [p.detach().clone() for p in model.parameters()]
    async with aiostage.Checkpointer(tmp_path) as ckpt:
        await ckpt.reserve(aiostage.train_state(model, opt))  # DCP initialises the state
    assert opt.state == {}  # ... and it is dropped again: the first real step starts afresh
    assert calls == []  # that step was not the user's: their hooks never saw it
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters(), strict=True))
    assert all(p.grad is None for p in model.parameters())


async def test_the_state_dict_is_built_and_applied_off_the_loop_thread(tmp_path: Path) -> None:
    model, opt = _model(0)
    threads: list[int] = []
    model.register_state_dict_post_hook(lambda *_: threads.append(threading.get_ident()))  # type: ignore[no-untyped-call]
    model.register_load_state_dict_post_hook(lambda *_: threads.append(threading.get_ident()))  # type: ignore[no-untyped-call]
    await aiostage.save(aiostage.train_state(model, opt), tmp_path / "ckpt")
    await aiostage.load(tmp_path / "ckpt", into=aiostage.train_state(model, opt))
    assert threads
    assert threading.get_ident() not in threads


async def test_a_state_without_the_optimizer_part_raises(tmp_path: Path) -> None:
    model, opt = _model(0)
    await aiostage.save(aiostage.train_state(model), tmp_path / "ckpt")
    with pytest.raises(aiostage.errors.StateDictMismatch, match="optim"):
        await aiostage.load(tmp_path / "ckpt", into=aiostage.train_state(model, opt))


def test_a_scheduler_needs_its_optimizer() -> None:
    model, opt = _model(0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2)
    with pytest.raises(TypeError, match="optimizer"):
        aiostage.train_state(model, scheduler=sched)
