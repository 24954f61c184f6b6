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
        macs_not_spent: MACs of the model as written that normalisation removed (a product
            with a one-hot constant computed as a gather).
        model_name: the captured model's class name (named in the plan and in errors).
        plan: what discovery found (set by the discover stage; later stages read it).
        facts_fresh: the recorded facts (``values``, node shapes) are those of ``gm`` as it is
            (set by a recording run, cleared by anything that edits the graph afterwards).
    """

    gm: fx.GraphModule
    example_inputs: tuple[torch.Tensor, ...]
    frontend: str
    values: dict[str, Any] = field(default_factory=dict)
    input_dependent: set[str] = field(default_factory=set)
    notes: list[str] = field(default_factory=list)
    macs_not_spent: int = 0
    model_name: str = "model"
    plan: Optional[Plan] = None
    facts_fresh: bool = False

    def input_values(self) -> dict[str, Any]:
        """The recorded values computed from the example input (masks, index tables, small
        tensors; not containers of activations): what a run on meta tensors cannot recompute."""
        return {k: v for k, v in self.values.items() if k in self.input_dependent
                and not (isinstance(v, (tuple, list)) and any(isinstance(t, torch.Tensor) for t in v))}

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
        return node_shape(node)


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


# ----------------------------------------------------------------------------------------------
# node facts recorded by the propagate pass: the only place that knows their meta keys
# ----------------------------------------------------------------------------------------------

SHAPE_KEY, DTYPE_KEY, MACS_KEY = "hiap_shape", "hiap_dtype", "hiap_macs"


def record_facts(node: fx.Node, shape: Any, dtype: Optional[torch.dtype], macs: Optional[int] = None) -> None:
    """Record what a node produced on the example inputs (called by the propagate pass)."""
    node.meta[SHAPE_KEY] = shape
    node.meta[DTYPE_KEY] = dtype
    if macs is not None:
        node.meta[MACS_KEY] = macs


def copy_facts(src: fx.Node, dst: fx.Node, macs: Optional[int] = None) -> None:
    """Give ``dst`` the recorded shape and dtype of ``src`` (and ``macs``, if given)."""
    for key in (SHAPE_KEY, DTYPE_KEY):
        if key in src.meta:
            dst.meta[key] = src.meta[key]
    if macs is not None:
        dst.meta[MACS_KEY] = macs


def node_shape(node: Any) -> Optional[tuple[int, ...]]:
    """Shape of a node's tensor value on the example inputs (None for anything else)."""
    s = node.meta.get(SHAPE_KEY) if isinstance(node, fx.Node) else None
    return tuple(s) if isinstance(s, tuple) else None


def tensor_shape(node: Any) -> tuple[int, ...]:
    """Shape of a node that must have produced a tensor (``HiapError`` naming it otherwise)."""
    shape = node_shape(node)
    if shape is None:
        from hiap_fx.errors import HiapError

        raise HiapError(f"internal: node {getattr(node, 'name', node)} has no recorded tensor shape "
                        "(the propagate pass did not see a tensor there); please report this model")
    return shape


def arg_node(node: fx.Node, index: int) -> fx.Node:
    """The ``index``-th positional argument of ``node``, which the caller knows is a node."""
    value = node.args[index]
    if not isinstance(value, fx.Node):
        from hiap_fx.errors import HiapError

        raise HiapError(f"internal: argument {index} of node {node.name} is {value!r}, not a node; "
                        "please report this model")
    return value


def is_tensor_node(node: Any) -> bool:
    """Whether a node produced a tensor, or a tuple/list of tensors, on the example inputs."""
    return isinstance(node, fx.Node) and isinstance(node.meta.get(SHAPE_KEY), (tuple, list))


def node_rank(node: Any) -> int:
    """Rank of a node's tensor value (-1 when it is not a tensor)."""
    shape = node_shape(node)
    return len(shape) if shape is not None else -1


def node_dtype(node: Any) -> Optional[torch.dtype]:
    """dtype of a node's tensor value on the example inputs."""
    return node.meta.get(DTYPE_KEY) if isinstance(node, fx.Node) else None


def recorded_macs(node: fx.Node) -> Optional[int]:
    """MACs the reference counter measured for a node (``propagate(count=True)``), if any."""
    value = node.meta.get(MACS_KEY)
    return int(value) if value is not None else None
