"""A product with a constant one-hot tensor is a gather: rewritten as one.

MaxViT's TensorFlow-ported relative position bias (timm's ``RelPosBiasTf``) spreads its per-head
table over the window with two einsums against one-hot lookup buffers,
``einsum("nhw,ixh->nixw", table, lookup)``. Each output element *selects* one table entry (or
none: zero), but as a product the index flow cannot follow it, so the table's head axis was not
recognised and no head could be cut; it also costs MACs it does not need. An einsum of two
operands, one of them a constant 0/1 tensor with at most one 1 along the one letter they
contract, is rewritten as ``x[..., index] * valid`` (index and validity precomputed as
buffers), then the permute to the equation's output: the same values, movement for the index
flow, no MACs.
"""

from __future__ import annotations

import operator
from typing import Any, Optional

import torch
from torch import fx

from hiap_fx.graph.ir import CapturedGraph, node_shape
from hiap_fx.graph.node_macs import node_macs
from hiap_fx.graph.ops import einsum_letters

_BUFFER = "hiap_selection"


def _operands(node: fx.Node) -> list[Any]:
    args = list(node.args)
    return list(args[1]) if len(args) == 2 and isinstance(args[1], (list, tuple)) else args[1:]


def _register(gm: fx.GraphModule, value: torch.Tensor) -> str:
    i = 0
    while hasattr(gm, f"{_BUFFER}_{i}"):
        i += 1
    gm.register_buffer(f"{_BUFFER}_{i}", value)
    return f"{_BUFFER}_{i}"


def selection_as_gather(node: fx.Node, cg: CapturedGraph) -> Optional[fx.Node]:
    """``einsum(eq, x, onehot)`` (either order) as a gather, or ``None`` when the einsum is not a
    selection by a constant one-hot operand (see the module docstring)."""
    if not node.args or not isinstance(node.args[0], str):
        return None
    operands = _operands(node)
    shapes = [node_shape(o) if isinstance(o, fx.Node) else None for o in operands]
    if len(operands) != 2 or any(s is None for s in shapes):
        return None
    parsed = einsum_letters(node.args[0], [len(s) for s in shapes if s is not None])
    if parsed is None:
        return None
    terms, out = parsed
    for s in (0, 1):
        sel, data = operands[s], operands[1 - s]
        value = cg.values.get(sel.name)
        if sel.name in cg.input_dependent or not isinstance(value, torch.Tensor) or value.numel() == 0 \
                or not bool(((value == 0) | (value == 1)).all()):
            continue
        sel_t, data_t = terms[s], terms[1 - s]
        shared = [c for c in sel_t if c in data_t]
        if len(shared) != 1 or shared[0] in out or set(out) != (set(data_t) | set(sel_t)) - set(shared):
            continue
        c = shared[0]
        onehot = value.movedim(sel_t.index(c), -1)
        hits = onehot.sum(-1)
        if bool((hits > 1).any()):
            continue
        g = node.graph
        saved = node_macs(node)
        cg.macs_not_spent += saved
        cg.notes.append(f"{node.name}: einsum {node.args[0]!r} selects by the one-hot constant {sel.name}; "
                        f"computed as a gather (the {saved:,} MACs of the product are not spent)")
        index = g.get_attr(_register(cg.gm, onehot.argmax(-1)))
        valid = g.get_attr(_register(cg.gm, hits.to(value.dtype if value.is_floating_point() else torch.float32)))
        x = g.call_method("movedim", (data, data_t.index(c), -1))
        key: Any = (Ellipsis, index)
        picked = g.call_function(operator.mul, (g.call_function(operator.getitem, (x, key)), valid))
        letters = [ch for ch in data_t if ch != c] + [ch for ch in sel_t if ch != c]
        order = [letters.index(ch) for ch in out]
        return picked if order == sorted(order) else g.call_method("permute", (picked, *order))
    return None
