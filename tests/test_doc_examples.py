"""Code blocks of the docs, run exactly as written (the names a block leaves free are given)."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path
from typing import Any

import anyio
import torch

import aiostage

DOCS = Path(__file__).resolve().parent.parent / "docs"


def python_block(page: str, containing: str) -> str:
    """The one ```python block of ``docs/page`` whose text contains ``containing``."""
    blocks = re.findall(r"^```python\n(.*?)^```", (DOCS / page).read_text(), re.S | re.M)
    found = [b for b in blocks if containing in b]
    assert len(found) == 1, f"{page}: {len(found)} python blocks contain {containing!r}"
    return found[0]


async def run_block(code: str, names: dict[str, Any]) -> dict[str, Any]:
    """Run ``code`` as the body of a coroutine with ``names`` in scope; its locals after."""
    body = textwrap.indent(code + "\nreturn locals()", "    ")
    scope: dict[str, Any] = {"aiostage": aiostage, "anyio": anyio, **names}
    exec(f"async def _block({', '.join(names)}):\n{body}", scope)
    result: dict[str, Any] = await scope["_block"](**names)
    return result


async def test_the_async_save_block_of_the_checkpointer_page(tmp_path: Path) -> None:
    code = python_block("checkpointer.md", "aiostage.async_save(")
    state = {"w": torch.arange(8.0), "step": 3}
    seen = await run_block(code, {"state_dict": state, "path": tmp_path / "ckpt"})
    assert seen["handle"].done()
    assert seen["report"].path == tmp_path / "ckpt"
    loaded = await aiostage.load(tmp_path / "ckpt")
    assert torch.equal(loaded["w"], state["w"])
    assert loaded["step"] == 3


def _trainer(seed: int) -> tuple[torch.nn.Linear, torch.optim.Optimizer, Any]:
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 2)
    optim = torch.optim.AdamW(model.parameters(), lr=0.1)
    return model, optim, torch.optim.lr_scheduler.StepLR(optim, step_size=2, gamma=0.5)


async def test_the_train_state_block_of_the_persistence_page(tmp_path: Path) -> None:
    code = python_block("persistence.md", "aiostage.train_state(model, optim, sched)")
    model, optim, sched = _trainer(0)
    model(torch.ones(3, 4)).sum().backward()
    optim.step()
    sched.step()
    names = {"model": model, "optim": optim, "sched": sched, "path": tmp_path / "c", "pg": None}
    await run_block(code, names)  # saves, then loads back into the same objects
    fresh = _trainer(1)
    await run_block(code.split("\n", 1)[1], {**names, **dict(zip(names, fresh, strict=False))})
    assert torch.equal(fresh[0].weight, model.weight)
    assert fresh[1].state_dict()["state"][0]["step"] == 1
    assert fresh[2].state_dict() == sched.state_dict()


async def test_the_training_loop_of_the_checkpointer_page(tmp_path: Path) -> None:
    scope: dict[str, Any] = {}
    exec(python_block("checkpointer.md", "scheduler, batches, root"), scope)
    gen = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(3, 4, generator=gen), torch.randn(3, 2, generator=gen)) for _ in range(6)
    ]
    model, optim, sched = _trainer(0)
    await scope["train"](model, optim, sched, batches, tmp_path, every=2)
    names = sorted([p.name async for p in anyio.Path(tmp_path).iterdir()])
    assert names == [f"step_00000000{i}" for i in (2, 4, 6)]
    fresh = _trainer(1)
    await scope["train"](*fresh, batches, tmp_path, every=2)  # resumes at the end: no step left
    assert torch.equal(fresh[0].weight, model.weight)
    assert fresh[2].state_dict() == sched.state_dict()


async def test_the_options_block_of_the_staging_page() -> None:
    seen = await run_block(python_block("staging.md", "aiostage.StagingOptions(pool_size=1"), {})
    for stager in (seen["stager"], seen["same"]):
        assert stager.options.pool_size == 1
        assert stager.options.lease_timeout == 30.0
        await stager.aclose()


async def test_the_zero_stall_loop_of_the_checkpointer_page(tmp_path: Path) -> None:
    scope: dict[str, Any] = {"torch": torch}
    exec(python_block("checkpointer.md", "overlap=True"), {**scope, "aiostage": aiostage}, scope)
    gen = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(3, 4, generator=gen), torch.randn(3, 2, generator=gen)) for _ in range(6)
    ]
    model, optim, _ = _trainer(0)
    weights = []
    optim.register_step_pre_hook(lambda *_: weights.append(model.weight.detach().clone()))
    await scope["train"](model, optim, batches, tmp_path, every=2)
    for step in (2, 4, 6):  # each checkpoint holds the weights after that step
        loaded = await aiostage.load(tmp_path / f"step_00000000{step}")
        after = weights[step] if step < 6 else model.weight
        assert torch.equal(loaded["model"]["weight"], after)
