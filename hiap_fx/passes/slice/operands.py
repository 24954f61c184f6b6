"""q/k/v operands rebuilt from the kept rows of their projections, in the original layout."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

from hiap_fx.errors import HiapError
from hiap_fx.graph.editing import rewrite_sizes
from hiap_fx.graph.ir import node_dtype, node_shape
from hiap_fx.graph.ops import op_name
from hiap_fx.passes.slice.context import OperandLayout, SliceContext
from hiap_fx.plan import AttentionSite


def linear_rows(ctx: SliceContext, proj, rows: list[int], x: fx.Node, suffix: str) -> fx.Node:
    w = ctx.params.get(proj.weight)[rows]
    w_node = ctx.params.add(ctx.graph, proj.weight, suffix, w)
    b_node = None
    if proj.bias and not proj.bias.startswith("node:"):
        b_node = ctx.params.add(ctx.graph, proj.bias, suffix, ctx.params.get(proj.bias)[rows])
    return ctx.graph.call_function(F.linear, (x, w_node, b_node))


def build_operand(ctx: SliceContext, site: AttentionSite, role: str, lay: OperandLayout, heads: list[int],
                   dims: dict[int, list[int]], suffix: str) -> fx.Node:
    """The kernel operand for ``heads`` (each with its kept ``dims``), rebuilt from kept rows."""
    proj = getattr(site, role)
    nd = len(dims[heads[0]])
    # k/v of grouped-query attention: one table row per kv head, shared by its query heads
    unit = (lambda h: h) if len(proj.index) == site.num_heads else (lambda h: site.kv_of_head[h])
    rows = [proj.index[unit(h)][j] for h in heads for j in dims[h]]
    P = ctx.nodes[proj.node]
    g = ctx.graph
    unique = list(dict.fromkeys(rows))
    y = linear_rows(ctx, proj, unique, P.args[0], suffix)
    if len(unique) != len(rows):  # shared kv rows are computed once and repeated (no MACs)
        if not lay.has_head_axis:
            raise HiapError(f"{site.name}: the {role} operand shared by query heads has no head "
                            f"axis at {lay.boundary.name} to repeat it along; prepare with "
                            "PruneConfig(heads=False) for this model, or report it")
        at = {r: i for i, r in enumerate(unique)}
        index = ctx.params.constant(g, "hiap_kv_rows", torch.tensor([at[r] for r in rows]))
        y = g.call_method("index_select", (y, -1, index))
    for first, last in lay.merges:
        y = g.call_method("flatten", (y, first, last))
    t = g.call_method("unflatten", (y, -1, (len(heads), nd))) if lay.has_head_axis else y
    if lay.perm != sorted(lay.perm):
        t = g.call_method("permute", (t, *lay.perm))
    for axis in lay.new_axes:
        t = g.call_method("unsqueeze", (t, axis))
    full_heads, full_dims = len(proj.index), len(proj.index[0])
    ints = {full_heads: len(heads)}
    if nd != full_dims:
        ints[full_dims] = nd
        ints[full_heads * full_dims] = len(heads) * nd
    mapping = {lay.boundary: t}
    # per-head tensors joining the operand after the boundary (e.g. rotary tables with one
    # frequency set per head) are cut to the kept heads, like logits-side biases
    head_axis = site.layout.k_head_axis if role == "k" else site.layout.q_head_axis
    units = [unit(h) for h in heads]
    selected: dict[fx.Node, Any] = {}

    def arg(a: Any) -> Any:
        if a in mapping:
            return mapping[a]
        if isinstance(a, fx.Node) and head_axis is not None and rank is not None:
            if a not in selected:
                selected[a] = select_heads(ctx, a, head_axis % rank, rank, full_heads, units)
            return selected[a]
        return a

    for n in lay.replay:
        shape = node_shape(n)
        rank = len(shape) if shape is not None else None
        new = g.node_copy(n, arg)
        if op_name(new) == "type_as" and isinstance(n.args[1], fx.Node) and n.args[1] not in mapping:
            new.target, new.args = "to", (new.args[0], node_dtype(n.args[1]))
        rewrite_sizes(new, ints)
        mapping[n] = new
    return mapping[lay.operand]


def select_heads(ctx: "SliceContext", value: Any, head_axis: int, rank: int, total: int,
                  heads: list[int]) -> Any:
    """Select ``heads`` on a logits-side tensor that has one slice per head (else pass it on)."""
    if not isinstance(value, fx.Node):
        return value
    s = node_shape(value)
    if s is None:
        return value
    axis = (head_axis % rank) - (rank - len(s))
    if axis < 0 or s[axis] != total or total == 1:
        return value
    if heads == list(range(total)):
        return value
    index = ctx.params.constant(ctx.graph, "hiap_heads", torch.tensor(heads, dtype=torch.long))
    return ctx.graph.call_method("index_select", (value, axis, index))
