"""One seeded training run for tests/test_exact_resume.py, in its own process.

``python tests/_exact_training.py OPTIM MODE ROOT OUT``: ``MODE`` is ``plain`` (the same loop
with no aiostage at all), ``readme`` (the README's ``train`` as written, checkpointing every 100
steps), ``killed`` (the README's ``train``, SIGKILLed by itself at the first write of step 200's
checkpoint) or ``resumed`` (the README's ``train`` again, on the same root). Each step appends
one JSON line to ``OUT``: the step, its loss, the learning rate it used and a digest of the
parameters after it, recorded by hooks, so the README's code runs unchanged.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

README = Path(__file__).resolve().parent.parent / "README.md"
STEPS = 300
KILL_AT = 200

Batches = list[tuple[torch.Tensor, torch.Tensor]]


def readme_train() -> Callable[..., Any]:
    """The ``train`` coroutine function of the README's first code block, as written."""
    block = re.search(r"```python\n(import aiostage\n.*?)^```", README.read_text(), re.S | re.M)
    assert block is not None, "README.md: no python block starting with `import aiostage`"
    scope: dict[str, Any] = {}
    exec(block[1], scope)
    train: Callable[..., Any] = scope["train"]
    return train


def build(optim: str) -> tuple[torch.nn.Module, torch.optim.Optimizer, Any]:
    """The seeded model, optimizer and LR scheduler of one configuration."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    params = model.parameters()
    opt: torch.optim.Optimizer
    sched: Any
    if optim == "sgd":
        opt = torch.optim.SGD(params, lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=70, gamma=0.5)
    elif optim == "adamw":
        opt = torch.optim.AdamW(params, lr=0.01, weight_decay=0.1)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=50, gamma=0.7)
    else:  # Adam with L2 weight decay: the zero-gradient step puts it into the moments
        opt = torch.optim.Adam(params, lr=0.01, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS)
    return model, opt, sched


def make_batches() -> Batches:
    gen = torch.Generator().manual_seed(1234)
    return [
        (torch.randn(16, 8, generator=gen), torch.randn(16, 4, generator=gen)) for _ in range(STEPS)
    ]


def record(model: torch.nn.Module, opt: torch.optim.Optimizer, batches: Batches, out: Path) -> None:
    """Hooks that append each step's loss, learning rate and parameter digest to ``out``."""
    step_of = {id(x): (i + 1, y) for i, (x, y) in enumerate(batches)}
    seen: dict[str, Any] = {}
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def forward(module: torch.nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
        step, targets = step_of[id(args[0])]
        loss = torch.nn.functional.mse_loss(output, targets)
        seen.update(step=step, loss=loss.item())

    def stepped(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        digest = hashlib.sha256()
        for p in model.parameters():
            digest.update(p.detach().numpy().tobytes())
        step = {"step": 0} if not seen else {}  # a step no forward came before: not the user's
        line = {**step, **seen, "lr": float(optimizer.param_groups[0]["lr"])}
        line["params"] = digest.hexdigest()
        seen.clear()
        os.write(fd, (json.dumps(line) + "\n").encode())  # one write: survives the SIGKILL

    model.register_forward_hook(forward)
    opt.register_step_post_hook(stepped)


def plain(model: torch.nn.Module, opt: torch.optim.Optimizer, sched: Any, batches: Batches) -> None:
    """The README's loop without aiostage."""
    for step in range(1, len(batches) + 1):
        inputs, targets = batches[step - 1]
        loss = torch.nn.functional.mse_loss(model(inputs), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def kill_at_first_write(step: int) -> None:
    """SIGKILL this process at the first write into step ``step``'s checkpoint."""
    from aiostage._storage import localfs

    name = f"step_{step:09d}"

    def hook(file: str, offset: int, n: int) -> None:
        if name in file:
            os.kill(os.getpid(), signal.SIGKILL)

    localfs.write_hooks.append(hook)


def main() -> None:
    optim, mode, root, out = sys.argv[1], sys.argv[2], sys.argv[3], Path(sys.argv[4])
    torch.set_num_threads(1)
    model, opt, sched = build(optim)
    batches = make_batches()
    record(model, opt, batches, out)
    if mode == "plain":
        plain(model, opt, sched, batches)
        return
    if mode == "killed":
        kill_at_first_write(KILL_AT)
    asyncio.run(readme_train()(model, opt, sched, batches, root))


if __name__ == "__main__":
    main()
