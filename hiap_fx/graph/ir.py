"""The one IR every pass shares: a normalised fx GraphModule plus what capture learned."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import fx

from hiap_fx.errors import InputError
from hiap_fx.plan import Plan


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
        model_name: the captured model's class name (named in the plan and in errors).
        plan: what discovery found (set by the discover stage; later stages read it).
    """

    gm: fx.GraphModule
    example_inputs: tuple[torch.Tensor, ...]
    frontend: str
    values: dict[str, Any] = field(default_factory=dict)
    input_dependent: set[str] = field(default_factory=set)
    notes: list[str] = field(default_factory=list)
    model_name: str = "model"
    plan: Optional[Plan] = None

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


def as_input_tuple(example_inputs: Any) -> tuple[torch.Tensor, ...]:
    """Normalise ``example_inputs`` (a tensor or a tuple/list of tensors) to a tuple."""
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    for i, t in enumerate(inputs):
        if not isinstance(t, torch.Tensor):
            raise InputError(f"example_inputs[{i}] is a {type(t).__name__}, not a tensor; pass "
                             "a tensor or a tuple of positional tensors")
    if not inputs:
        raise InputError("example_inputs is empty; pass at least one tensor")
    return inputs


def node_shape(node: Any) -> Optional[tuple[int, ...]]:
    """Shape a node's value had on the example inputs (None for non-tensors and unrecorded nodes)."""
    s = node.meta.get("hiap_shape") if isinstance(node, fx.Node) else None
    return tuple(s) if isinstance(s, tuple) else None
