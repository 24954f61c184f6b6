"""PreparedModel: the captured, analysed model that training and finalize work on."""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn

from .plan import Plan


class PreparedModel(nn.Module):
    """An ordinary ``nn.Module`` wrapping the normalised graph of a model and its plan.

    ``forward`` has the original model's signature and output structure.
    """

    def __init__(self, graph_module: fx.GraphModule, plan: Plan,
                 example_inputs: tuple[torch.Tensor, ...]) -> None:
        super().__init__()
        self.graph_module = graph_module
        self.plan = plan
        self._example_inputs = tuple(t.detach().clone() for t in example_inputs)

    @property
    def example_inputs(self) -> tuple[torch.Tensor, ...]:
        """The example inputs the model was prepared with."""
        return self._example_inputs

    @property
    def example_shapes(self) -> list[tuple[int, ...]]:
        """Shapes of the example inputs."""
        return [tuple(t.shape) for t in self._example_inputs]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.graph_module(*args, **kwargs)

    def extra_repr(self) -> str:
        return (f"attention sites={len(self.plan.attention)}, ffn sites={len(self.plan.ffn)}, "
                f"front end={self.plan.frontend}")
