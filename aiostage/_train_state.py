"""Training state in two calls: a model's (and optimizer's) state dict to save, and back.

Built on ``torch.distributed.checkpoint.state_dict`` (``get_state_dict`` / ``set_state_dict``),
which gives one shape to plain modules, DDP, FSDP2 and DTensor models: parameters keyed by their
fully qualified names (sharded models hold DTensors) and optimizer state keyed the same way, so
``aiostage.load(path, into=train_state(...))`` can reshard it into another layout. The DCP module
is imported on first use (it adds seconds to ``import aiostage``).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["apply_train_state", "train_state"]


def train_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> dict[str, Any]:
    """The state of ``model`` (``"model"``) and ``optimizer`` (``"optim"``) as one state dict.

    Save it with ``aiostage.save``; to resume, pass a fresh one as ``into=`` to ``aiostage.load``
    and hand the result to ``apply_train_state``. The tensors are the model's and optimizer's
    own (no copy): save or stage before the next step changes them. An optimizer that has not
    stepped yet gets its state created (a step with zero gradients and no change to the
    parameters), so a fresh optimizer can be loaded into.

    Blocks the calling thread on synchronous CPU work (run it with ``anyio.to_thread`` on a big
    model); with FSDP2 or DTensor models it takes part in the collectives
    ``get_state_dict`` issues, so call it on every rank, in the same order. Raises what
    ``get_state_dict`` raises for a model or optimizer it does not support.
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer is None:
        return {"model": get_model_state_dict(model)}
    model_sd, optim_sd = get_state_dict(model, optimizers=optimizer)
    return {"model": model_sd, "optim": optim_sd}


def apply_train_state(
    model: torch.nn.Module,
    state: dict[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
) -> None:
    """Load ``state`` (as ``train_state`` made it, e.g. returned by ``aiostage.load``) into
    ``model`` and, when given, ``optimizer``.

    Strict: a missing or unexpected key raises. Blocks the calling thread on synchronous CPU
    copies, and like ``train_state`` takes part in ``set_state_dict``'s collectives with
    FSDP2/DTensor models (call it on every rank). Raises ``KeyError`` when ``state`` lacks
    ``"model"`` (or ``"optim"`` with an optimizer) and what ``set_state_dict`` raises.
    """
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    if optimizer is None:
        set_model_state_dict(model, state["model"])
        return
    set_state_dict(
        model,
        optimizers=optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optim"],
    )
