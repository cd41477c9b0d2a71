"""train_state / apply_train_state: a plain model and AdamW save, resume, and train on identically."""

from __future__ import annotations

from pathlib import Path

import anyio.to_thread
import pytest
import torch

import aiostage
from aiostage.testing import assert_state_dict_equal


def _model(seed: int, lr: float = 0.05) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    return model, torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)


def _steps(model: torch.nn.Module, opt: torch.optim.Optimizer, first: int, n: int) -> list[float]:
    losses = []
    for step in range(first, first + n):
        gen = torch.Generator().manual_seed(step)
        x, y = torch.randn(5, 6, generator=gen), torch.randn(5, 3, generator=gen)
        loss = (model(x) - y).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


async def test_a_resumed_model_and_optimizer_train_on_with_identical_losses(
    tmp_path: Path,
) -> None:
    model, opt = _model(0)  # the helpers are synchronous CPU work: worker threads
    await anyio.to_thread.run_sync(_steps, model, opt, 0, 3)
    state = await anyio.to_thread.run_sync(aiostage.train_state, model, opt)
    assert sorted(state) == ["model", "optim"]
    await aiostage.save(state, tmp_path / "ckpt")
    expected = await anyio.to_thread.run_sync(_steps, model, opt, 3, 4)

    fresh, fresh_opt = _model(1, lr=0.5)  # other weights and lr, an optimizer never stepped
    into = await anyio.to_thread.run_sync(aiostage.train_state, fresh, fresh_opt)
    loaded = await aiostage.load(tmp_path / "ckpt", into=into)
    await anyio.to_thread.run_sync(aiostage.apply_train_state, fresh, loaded, fresh_opt)
    assert fresh_opt.param_groups[0]["lr"] == 0.05
    assert await anyio.to_thread.run_sync(_steps, fresh, fresh_opt, 3, 4) == expected
    assert_state_dict_equal(fresh.state_dict(), model.state_dict())


async def test_a_model_alone(tmp_path: Path) -> None:
    model, _ = _model(0)
    state = await anyio.to_thread.run_sync(aiostage.train_state, model)
    assert list(state) == ["model"]
    await aiostage.save(state, tmp_path / "ckpt")
    fresh, _ = _model(1)
    into = await anyio.to_thread.run_sync(aiostage.train_state, fresh)
    loaded = await aiostage.load(tmp_path / "ckpt", into=into)
    await anyio.to_thread.run_sync(aiostage.apply_train_state, fresh, loaded)
    assert_state_dict_equal(fresh.state_dict(), model.state_dict())


def test_a_state_without_the_optimizer_part_raises() -> None:
    model, opt = _model(0)
    with pytest.raises(KeyError, match="optim"):
        aiostage.apply_train_state(model, {"model": model.state_dict()}, opt)
