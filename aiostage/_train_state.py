"""A training run's state (model, optimizer, LR scheduler) as one checkpointable object.

Built on ``torch.distributed.checkpoint.state_dict`` (``get_state_dict`` / ``set_state_dict``),
which gives one shape to plain modules, DDP, FSDP2 and DTensor models: parameters keyed by their
fully qualified names (sharded models hold DTensors) and optimizer state keyed the same way, so
a checkpoint can be loaded into another layout. The front doors (``save``, ``load``,
``async_save``, ``Checkpointer``) take a ``TrainState`` wherever they take a state dict: they
build its state dict in a worker thread and, on load, put the result back into the objects.
The DCP module is imported on first use (it adds seconds to ``import aiostage``).
"""

from __future__ import annotations

from typing import Any

import anyio.to_thread
import torch

from ._core.buffers import run_whole

__all__ = ["TrainState", "as_state_dict", "train_state"]


class TrainState:
    """A model with its optimizer and LR scheduler, saved and restored as one state.

    Pass it to ``save``/``Checkpointer.save`` like a state dict and as ``into=`` to
    ``load``/``Checkpointer.load``: loading restores the model, the optimizer (its state and
    hyper-parameters, e.g. the learning rate) and the scheduler in place, so training resumes
    bit-identically. Checkpointing never changes training: the optimizer state DCP creates to
    describe a fresh optimizer (a step with zero gradients) is dropped again, so a run with
    aiostage produces the numbers the same run produces without it.
    """

    __slots__ = ("model", "optimizer", "scheduler")

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    ) -> None:
        if scheduler is not None and optimizer is None:
            raise TypeError("train_state: a scheduler needs its optimizer (optimizer=...)")
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler

    def __repr__(self) -> str:
        parts = [type(self.model).__name__]
        parts += [type(x).__name__ for x in (self.optimizer, self.scheduler) if x is not None]
        return f"TrainState({', '.join(parts)})"

    async def state_dict(self) -> dict[str, Any]:
        """``{"model": ..., "optim": ..., "sched": ...}`` (the parts given), built in a worker
        thread. The tensors are the model's and optimizer's own (no copy): save or stage it
        before the next step changes them. With FSDP2 or DTensor models it takes part in the
        collectives ``get_state_dict`` issues: call it on every rank, in the same order."""
        return await anyio.to_thread.run_sync(self.state_dict_sync)

    def state_dict_sync(self) -> dict[str, Any]:
        """``state_dict`` on the calling thread (it blocks: synchronous CPU work)."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

        if self.optimizer is None:
            return {"model": get_model_state_dict(self.model)}
        with _untouched(self.optimizer):
            model_sd, optim_sd = get_state_dict(self.model, optimizers=self.optimizer)
        state: dict[str, Any] = {"model": model_sd, "optim": optim_sd}
        if self.scheduler is not None:
            state["sched"] = self.scheduler.state_dict()
        return state

    async def load_state_dict(self, state: dict[str, Any]) -> None:
        """Put ``state`` (as ``state_dict`` made it, e.g. what ``load`` returned) back into the
        model, optimizer and scheduler, in a worker thread. Strict: a missing or unexpected key
        raises ``KeyError`` (``"model"``, ``"optim"``, ``"sched"``) or what ``set_state_dict``
        raises; like ``state_dict``, call it on every rank with sharded models. Cancelled, it
        either never started or finishes first: the objects are never left half loaded."""
        await run_whole(self.load_state_dict_sync, state)

    def load_state_dict_sync(self, state: dict[str, Any]) -> None:
        """``load_state_dict`` on the calling thread (it blocks: synchronous CPU copies)."""
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

        if self.optimizer is None:
            set_model_state_dict(self.model, state["model"])
            return
        sched: dict[str, Any] = state["sched"] if self.scheduler is not None else {}
        with _untouched(self.optimizer, keep_state=True):
            set_state_dict(
                self.model,
                optimizers=self.optimizer,
                model_state_dict=state["model"],
                optim_state_dict=state["optim"],
            )
        if self.scheduler is not None:
            self.scheduler.load_state_dict(sched)


def train_state(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> TrainState:
    """``TrainState(model, optimizer, scheduler)``: what a training run checkpoints.

    Cheap (nothing is read until a save or load); raises ``TypeError`` for a scheduler without
    its optimizer.
    """
    return TrainState(model, optimizer, scheduler)


async def as_state_dict(state: Any) -> Any:
    """``state`` itself, or a ``TrainState``'s state dict (built in a worker thread)."""
    if isinstance(state, TrainState):
        return await state.state_dict()
    return state


class _untouched:
    """Undo what DCP's ``get_state_dict`` does to an optimizer that has not stepped yet.

    DCP creates the state of such an optimizer with a step of zero gradients at learning rate
    zero; the state it leaves (Adam's step counter at 1, momentum buffers holding the weight
    decay term) would change every later step. The state dict keeps those tensors (their
    shapes are what ``reserve`` and ``load(into=...)`` need); the optimizer gets its empty
    state back, and the flag LR schedulers use to warn about a missing ``optimizer.step()``.
    The optimizer's own step hooks are held back meanwhile: that step is not the user's.
    ``keep_state``: for ``set_state_dict``, which then loads the saved state over it.
    """

    _HOOKS = ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks")

    def __init__(self, optimizer: torch.optim.Optimizer, *, keep_state: bool = False) -> None:
        self.optimizer = optimizer
        self.keep_state = keep_state
        self.fresh = not optimizer.state
        self.saved: dict[str, Any] = {}

    def __enter__(self) -> None:
        if not self.fresh:
            return
        attrs = self.optimizer.__dict__
        self.saved = {k: attrs[k] for k in (*self._HOOKS, "_opt_called") if k in attrs}
        for k in self._HOOKS:
            if k in attrs:
                attrs[k] = type(attrs[k])()

    def __exit__(self, *exc: object) -> None:
        if not self.fresh:
            return
        if not self.keep_state:
            self.optimizer.state.clear()
        attrs = self.optimizer.__dict__
        attrs.pop("_opt_called", None)
        attrs.update(self.saved)
