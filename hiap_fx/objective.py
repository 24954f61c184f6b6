"""The budget and feasibility terms of the HiAP objective, and the budget controller."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .gates import Gate


class BudgetController(nn.Module):
    """Dual ascent on the weight of the cost terms: after each training step the multiplier grows
    by ``lr * (expected/dense - target)`` and never drops below zero, so the expected MACs are
    driven to the target. Its state lives in buffers (saved with the model's state_dict).

    With ``target=None`` the multiplier stays 1: the paper's fixed-lambda mode.
    """

    def __init__(self, target: Optional[float], lr: float) -> None:
        super().__init__()
        self.target = target
        self.lr = lr
        self.register_buffer("multiplier", torch.tensor(1.0))
        self.register_buffer("steps", torch.tensor(0, dtype=torch.long))

    def update(self, ratio: float) -> None:
        """One controller step from the current expected MACs / dense MACs."""
        if self.target is None:
            return
        self.multiplier.add_(self.lr * (ratio - self.target)).clamp_(min=0.0)
        self.steps.add_(1)

    def extra_repr(self) -> str:
        return f"target={self.target}, lr={self.lr}"


def feasibility(gates: dict[str, Gate], min_heads: int, min_dim_fraction: float,
                min_neuron_fraction: float) -> torch.Tensor:
    """Penalties that keep layers from collapsing, on on-probabilities:
    sum over attentions of ReLU(min_heads - E[live heads])^2, plus sum over heads of
    ReLU(min fraction - E[kept fraction of dims])^2, plus the same per FFN for neurons."""
    terms = []
    for gate in gates.values():
        p = gate.probability()
        if gate.kind == "head":
            need = min(min_heads, p.numel())
            terms.append(torch.relu(need - p.sum()) ** 2)
        elif gate.kind in ("head_dim", "qk_dim"):
            terms.append((torch.relu(min_dim_fraction - p.view(gate.groups, -1).mean(-1)) ** 2).sum())
        elif gate.kind == "neuron":
            terms.append(torch.relu(min_neuron_fraction - p.mean()) ** 2)
    if not terms:
        return torch.zeros(())
    return torch.stack(terms).sum()
