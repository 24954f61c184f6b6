"""Public entry points: prepare() and inspect()."""

from __future__ import annotations

from typing import Any, Optional

from torch import nn

from .analysis import analyse
from .config import PruneConfig
from .plan import Plan
from .prepared import PreparedModel


def prepare(model: nn.Module, example_inputs: Any, config: Optional[PruneConfig] = None) -> PreparedModel:
    """Capture ``model`` (a deep copy; the original is not modified), find its attention and FFN
    sites, and return a :class:`PreparedModel` with the same forward signature.

    Args:
        model: any ``nn.Module`` holding a vision transformer.
        example_inputs: a tensor or a tuple of positional tensors at the size you will train at.
        config: a :class:`PruneConfig`; ``None`` means defaults.
    Raises:
        NoAttentionError: no attention was found; CaptureError: the model could not be captured.
    """
    cg, plan = analyse(model, example_inputs, config)
    return PreparedModel(cg.gm, plan, cg.example_inputs)


def inspect(model: nn.Module, example_inputs: Any, config: Optional[PruneConfig] = None,
            show: bool = True) -> Plan:
    """Find the prunable structure of ``model`` and (when ``show``) print it as a table.

    Returns the :class:`Plan`; raises ``NoAttentionError`` when the model has no attention.
    """
    _, plan = analyse(model, example_inputs, config)
    if show:
        print(plan.summary())
    return plan
