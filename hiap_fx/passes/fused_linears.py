"""One linear whose rows feed attention and something else, split into one linear per part.

ViT-22B-style parallel blocks (timm's ``ParallelScalingBlock``) compute the MLP's first layer
and q, k, v with one linear, ``x_mlp, q, k, v = torch.split(in_proj(y), sizes, dim=-1)``. Its rows
cannot be cut for the attention alone while the same linear also holds the MLP's rows. A linear
whose output is split along its feature axis into parts of which some reach an attention and some
do not is rewritten as one linear per part (the weight and bias rows of that part), so the
attention's q/k/v and the MLP's input are projections of their own. Finalize fuses sibling
linears on the same input back into one (:mod:`hiap_fx.passes.fuse`). A fused qkv whose parts
all reach the attention keeps its spelling.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import fx

from hiap_fx.graph.editing import add_parameter, sole_parameter
from hiap_fx.graph.flow import IndexFlow, feature_index
from hiap_fx.graph.ir import CapturedGraph, node_shape
from hiap_fx.graph.ops import op_name
from hiap_fx.passes.conv_linears import near_attention

_SPLITS = ("split", "split_with_sizes", "chunk", "tensor_split")


def _part_rows(flow: IndexFlow, lin: fx.Node, parts: list[fx.Node]) -> Optional[list[list[int]]]:
    """The rows of ``lin`` each part holds (the same at every position, along its last axis,
    the other axes those of ``lin``); ``None`` when a part is not such a row selection."""
    shape = node_shape(lin)
    if shape is None:
        return None
    index = flow.run({lin: feature_index(shape, -1)}).index
    rows = []
    for p in parts:
        at, p_shape = index.get(p), node_shape(p)
        if not isinstance(at, torch.Tensor) or p_shape is None or tuple(at.shape) != p_shape \
                or p_shape[:-1] != shape[:-1] or (at < 0).any():
            return None
        flat = at.reshape(-1, p_shape[-1])
        if not torch.equal(flat, flat[:1].expand_as(flat)):
            return None
        rows.append(flat[0].long().tolist())
    return rows


def split_fused_linears(cg: CapturedGraph) -> None:
    """Rewrite linears split into attention and non-attention parts (see the module docstring)."""
    gm = cg.gm
    g = gm.graph
    flow: Optional[IndexFlow] = None
    for lin in list(g.nodes):
        if op_name(lin) != "linear" or lin.op != "call_function" or len(lin.users) != 1:
            continue
        split = next(iter(lin.users))
        if op_name(split) not in _SPLITS or split.args[:1] != (lin,) or \
                not all(op_name(u) == "getitem" and isinstance(u.args[1], int) for u in split.users):
            continue
        parts = sorted(split.users, key=lambda u: u.args[1])
        near = [near_attention(p, lambda n: list(n.users)) for p in parts]
        if len(parts) < 2 or all(near) or not any(near):
            continue
        weight = sole_parameter(gm, lin.args[1] if len(lin.args) > 1 else lin.kwargs.get("weight"))
        b_node = lin.args[2] if len(lin.args) > 2 else lin.kwargs.get("bias")
        bias = sole_parameter(gm, b_node) if b_node is not None else None
        if weight is None or (b_node is not None and bias is None):
            continue
        flow = flow or IndexFlow(cg)
        rows = _part_rows(flow, lin, parts)
        if rows is None:
            continue
        holder, attr, W = weight
        with g.inserting_before(split):
            for i, (part, r) in enumerate(zip(parts, rows)):
                w_arg = g.get_attr(add_parameter(gm, holder, f"{attr}_part{i}", W[r], W))
                b_arg = None if bias is None else \
                    g.get_attr(add_parameter(gm, bias[0], f"{bias[1]}_part{i}", bias[2][r], bias[2]))
                part.replace_all_uses_with(g.call_function(F.linear, (lin.args[0], w_arg, b_arg)))
        old_params = [n for n in lin.all_input_nodes if n.op == "get_attr"]
        for node in [*parts, split, lin, *old_params]:
            g.erase_node(node)
        for owner, name, _ in [weight] + ([bias] if bias is not None else []):
            delattr(owner, name)
