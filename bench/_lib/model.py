"""The models ``bench/train_stall.py`` trains, one per shape: a decoder-only transformer (dense or
with experts), a stack of square linear layers (``flat``) or a bag of parameters (``small``,
``--tensors``). Built from the shape's parameter list, not from nn layers, so a 20k-parameter
model builds in a second; the forward passes are small but touch every parameter."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from .shapes import GIB, Shape

BATCH, SEQ, WIDE = 4, 32, 2048


class Toy(torch.nn.Module):
    """Parameters registered under the shape's dotted names; ``loss(step)`` is a seeded forward."""

    def __init__(self, kind: str, params: list[tuple[str, tuple[int, ...]]]) -> None:
        super().__init__()
        self.kind = kind
        gen = torch.Generator().manual_seed(0)
        for name, size in params:
            *path, leaf = name.split(".")
            node: torch.nn.Module = self
            for part in path:
                if part not in node._modules:
                    node.add_module(part, torch.nn.Module())
                node = node._modules[part]  # type: ignore[assignment]
            init = torch.randn(size, generator=gen) / math.sqrt(size[-1])
            node.register_parameter(leaf, torch.nn.Parameter(init))
        layers = self._modules.get("layers")
        self.blocks: list[Any] = [] if layers is None else list(layers.children())

    def loss(self, step: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(step)
        if self.kind == "bag":
            return torch.stack([p.square().mean() for p in self.parameters()]).sum()
        if self.kind == "flat":
            x = torch.randn(16, WIDE, generator=gen)
            for layer in self.blocks:
                x = F.linear(x, layer.weight, layer.bias)
            return x.square().mean()
        return self._decoder_loss(gen)

    def _decoder_loss(self, gen: torch.Generator) -> torch.Tensor:
        embed: Any = self.embed
        vocab = embed.weight.shape[0]
        tokens = torch.randint(vocab, (BATCH, SEQ), generator=gen)
        x = F.embedding(tokens, embed.weight)
        for layer in self.blocks:
            y = _norm(x, layer.attn_norm)
            q, k, v = (_linear(y, getattr(layer.attn, n)) for n in "qkv")
            x = x + _linear(F.scaled_dot_product_attention(q, k, v, is_causal=True), layer.attn.o)
            y = _norm(x, layer.mlp_norm)
            x = x + (_experts(y, layer.moe) if self.kind == "moe" else _mlp(y, layer.mlp))
        logits = F.linear(_norm(x, self.norm), self.lm_head.weight)  # type: ignore[union-attr,arg-type]
        return F.cross_entropy(logits[:, :-1].reshape(-1, vocab), tokens[:, 1:].reshape(-1))


def _linear(x: torch.Tensor, m: Any) -> torch.Tensor:
    return F.linear(x, m.weight, getattr(m, "bias", None))


def _norm(x: torch.Tensor, m: Any) -> torch.Tensor:
    return F.layer_norm(x, m.weight.shape, m.weight, m.bias)


def _mlp(y: torch.Tensor, m: Any) -> torch.Tensor:
    return _linear(F.gelu(_linear(y, m.up)), m.down)


def _experts(y: torch.Tensor, m: Any) -> torch.Tensor:
    """Every expert on every token, weighted by the router (a dense mixture: all get gradients)."""
    experts = list(m.experts.children())
    gate = torch.stack([e.gate.weight for e in experts])  # (E, f, h)
    up = torch.stack([e.up.weight for e in experts])
    down = torch.stack([e.down.weight for e in experts])  # (E, h, f)
    weights = F.softmax(F.linear(y, m.router.weight), dim=-1)  # (B, T, E)
    hidden = F.silu(torch.einsum("bth,efh->ebtf", y, gate)) * torch.einsum("bth,efh->ebtf", y, up)
    out = torch.einsum("ebtf,ehf->ebth", hidden, down)
    return torch.einsum("ebth,bte->bth", out, weights)


def build(shape: Shape) -> tuple[Toy, torch.optim.Optimizer]:
    """The model for ``shape`` and its AdamW optimizer (no state until the first step)."""
    params = list(shape.params)
    if shape.kind == "flat":  # square linear layers: parameters + two AdamW moments ~ the size
        nbytes = sum(4 * math.prod(size) for _, size in params)
        layers = max(1, round(nbytes / (3 * 4 * WIDE * WIDE)))
        params = [
            (f"layers.{i}.{n}", s) for i in range(layers) for n, s in (("weight", (WIDE, WIDE)), ("bias", (WIDE,)))
        ]  # fmt: skip
    model = Toy(shape.kind, params)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4)


def train_step(model: Toy, opt: torch.optim.Optimizer, step: int) -> None:
    """One step: forward, backward, ``optimizer.step()``."""
    forward_backward(model, opt, step)
    opt.step()


def forward_backward(model: Toy, opt: torch.optim.Optimizer, step: int) -> None:
    """A step up to ``optimizer.step()``: nothing of the train state changes in it."""
    opt.zero_grad()
    model.loss(step).backward()  # type: ignore[no-untyped-call]


def train_state(model: Toy, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """``{"model": ..., "optim": ...}`` as ``get_state_dict`` makes it (optimizer state keyed by
    parameter name): what every contender checkpoints."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizers=opt)
    return {"model": model_sd, "optim": optim_sd}


def state_gib(model: Toy) -> float:
    """Parameters + two AdamW moments, in GiB."""
    return 3 * sum(p.numel() * p.element_size() for p in model.parameters()) / GIB
