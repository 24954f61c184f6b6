"""The one IR every pass shares: a normalised fx GraphModule plus what capture learned."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import fx


@dataclass
class CapturedGraph:
    """A model captured as an ordinary ``fx.GraphModule``.

    Attributes:
        gm: the graph module (trainable, picklable, any batch size).
        example_inputs: the positional example tensors used for capture.
        frontend: ``"fx"`` or ``"export"``.
        values: node name -> value the node produced on ``example_inputs`` (filled by the
            propagate pass; tensors that depend on the input are kept only as shapes).
        notes: human-readable remarks gathered on the way (shown by ``inspect``).
    """

    gm: fx.GraphModule
    example_inputs: tuple[torch.Tensor, ...]
    frontend: str
    values: dict[str, Any] = field(default_factory=dict)
    input_dependent: set[str] = field(default_factory=set)
    notes: list[str] = field(default_factory=list)

    def node(self, name: str) -> fx.Node:
        """The node called ``name``."""
        for n in self.gm.graph.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def modules(self) -> dict[str, torch.nn.Module]:
        """Submodules of the graph module by qualified name."""
        return dict(self.gm.named_modules())

    def shape(self, node: fx.Node) -> Optional[tuple[int, ...]]:
        """Shape the node's value had on the example inputs (None for non-tensors)."""
        meta = node.meta.get("hiap_shape")
        return tuple(meta) if isinstance(meta, (tuple, torch.Size)) and all(
            isinstance(s, int) for s in meta) else None
