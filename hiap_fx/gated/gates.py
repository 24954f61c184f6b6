"""Gumbel-Sigmoid (binary concrete) gates with straight-through hard samples.

Training forward: z = sigmoid((logit + eps) / tau), eps ~ Logistic(0, 1); the value used is the
hard sample 1[z > 0.5] with the gradient of z (straight-through), so training sees exactly the
sub-networks that can be exported. P(hard = 1) = sigmoid(logit), whatever tau.
Eval forward: deterministic, on iff logit > 0.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

GateKind = Literal["head", "head_dim", "ffn", "neuron", "qk_dim"]


class _StraightThrough(torch.autograd.Function):
    """Forward: the exact hard value. Backward: the gradient goes to the relaxed sample."""

    @staticmethod
    def forward(ctx, hard: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
        return hard.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return None, grad


class Gate(nn.Module):
    """One learnable logit per gated unit of one site.

    Args:
        size: number of units.
        kind: ``"head"``, ``"head_dim"``, ``"ffn"``, ``"neuron"`` (or ``"qk_dim"``).
        site: name of the site the gate belongs to.
        init: initial logit; the default 3.0 starts every unit on with probability 0.95.
        groups: the units form this many equal groups (e.g. the dims of each head).
        align: in eval mode the kept count of each group is rounded up to a multiple of
            ``align`` by also keeping the closed units with the highest logits (a group with
            nothing kept stays empty).
    """

    tau: torch.Tensor

    def __init__(self, size: int, kind: GateKind, site: str, init: float = 3.0,
                 groups: int = 1, align: int = 1) -> None:
        super().__init__()
        if size < 1:
            raise ValueError(f"a gate needs at least one unit, got {size}")
        if groups < 1 or size % groups:
            raise ValueError(f"{size} units cannot form {groups} equal groups")
        self.kind = kind
        self.site = site
        self.groups = groups
        self.align = max(1, int(align))
        self.logits = nn.Parameter(torch.full((size,), float(init)))
        self.register_buffer("tau", torch.tensor(2.0), persistent=True)

    def set_temperature(self, tau: float) -> None:
        """Set the Gumbel-Sigmoid temperature (> 0)."""
        if not tau > 0:
            raise ValueError(f"temperature must be > 0, got {tau}")
        self.tau.fill_(float(tau))

    def probability(self) -> torch.Tensor:
        """P(unit on) = sigmoid(logit), differentiable."""
        return torch.sigmoid(self.logits)

    def hard(self) -> torch.Tensor:
        """The deterministic eval decision: 1.0 where logit > 0 (rounded up to ``align``)."""
        logits = self.logits.detach()
        on = logits > 0
        if self.align > 1:
            per_group = logits.view(self.groups, -1)
            counts = on.view(self.groups, -1).sum(-1)
            keep = ((counts + self.align - 1) // self.align * self.align).clamp(max=per_group.shape[1])
            order = torch.sort(per_group, dim=-1, descending=True, stable=True).indices
            rank = torch.empty_like(order)
            rank.scatter_(-1, order, torch.arange(order.shape[-1]).expand_as(order).contiguous())
            on = (rank < keep[:, None]).view(-1)
        return on.to(self.logits.dtype)

    def sample(self) -> torch.Tensor:
        """A hard 0/1 sample with straight-through gradients of the relaxed sample."""
        u = torch.rand_like(self.logits).clamp_(1e-6, 1.0 - 1e-6)
        noise = torch.log(u) - torch.log1p(-u)
        soft = torch.sigmoid((self.logits + noise) / self.tau)
        hard = (self.logits + noise > 0).to(soft.dtype)
        return _StraightThrough.apply(hard, soft)

    def forward(self) -> torch.Tensor:
        return self.sample() if self.training else self.hard()

    def extra_repr(self) -> str:
        return f"kind={self.kind}, site={self.site!r}, units={self.logits.numel()}"
