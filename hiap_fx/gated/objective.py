"""The budget and feasibility terms of the HiAP objective, and the budget controller."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from hiap_fx.gated.gates import Gate


class BudgetController(nn.Module):
    """PI control of the weight of the cost terms (dual ascent plus a proportional term).

    Each training step, with ``gap = ratio - reference`` (ratio: expected MACs / dense MACs):
    ``integral += lr * gap`` and ``multiplier = integral + kp * gap``, both bounded below by
    ``floor`` (-1). A negative multiplier rewards compute: the target is an equality, so gates
    re-open when the run has cut below it. ``reference`` is the target unless ``prune`` /
    ``PreparedModel.schedule`` ramps it down from the starting MACs. When ``use_hard`` is set
    (the end of a run) the ratio fed in is that of the MACs eval mode selects. With
    ``target=None`` the multiplier stays 1: the paper's fixed-lambda mode. The state lives in
    buffers (saved with the model's state_dict).
    """

    integral: torch.Tensor
    multiplier: torch.Tensor
    steps: torch.Tensor
    use_hard: torch.Tensor
    reference: torch.Tensor
    start: torch.Tensor
    last_ratio: torch.Tensor

    def __init__(self, target: Optional[float], lr: float, kp: float = 0.0, floor: float = -1.0) -> None:
        super().__init__()
        self.target = target
        self.lr, self.kp, self.floor = lr, kp, floor
        start = 1.0 if target is None else 0.0
        self.register_buffer("integral", torch.tensor(start))
        self.register_buffer("multiplier", torch.tensor(start))
        self.register_buffer("steps", torch.tensor(0, dtype=torch.long))
        self.register_buffer("use_hard", torch.tensor(False))
        # what the ratio is driven to now (prune() ramps it from `start` down to the target)
        self.register_buffer("reference", torch.tensor(1.0 if target is None else float(target)))
        self.register_buffer("start", torch.tensor(-1.0))  # -1: not set yet
        self.register_buffer("last_ratio", torch.tensor(-1.0))  # -1: no step yet

    def update(self, ratio: float) -> None:
        """One controller step from the current expected MACs / dense MACs."""
        self.last_ratio.fill_(ratio)
        if self.target is None:
            return
        gap = ratio - float(self.reference)
        self.integral.add_(self.lr * gap).clamp_(min=self.floor)
        self.multiplier.copy_((self.integral + self.kp * gap).clamp(min=self.floor))
        self.steps.add_(1)

    def extra_repr(self) -> str:
        return f"target={self.target}, lr={self.lr}, kp={self.kp}"


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
