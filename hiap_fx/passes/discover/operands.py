"""q/k/v operands of a kernel traced back to their projections: head and dim tables by index flow."""

from __future__ import annotations

from collections import deque
from typing import Optional

import torch
from torch import fx

from hiap_fx.graph.flow import SENTINEL, FlowResult, feature_index
from hiap_fx.graph.ir import is_tensor_node, tensor_shape
from hiap_fx.graph.queries import ancestors
from hiap_fx.passes.discover.view import Core, GraphView, Reject
from hiap_fx.plan import Projection


class TokenDependent(Reject):
    """An operand whose projection features vary along the axis read as its tokens (they may be
    the kernel's tokens: channel attention)."""


def source_linears(g: GraphView, start: fx.Node) -> list[fx.Node]:
    found: list[fx.Node] = []
    todo = deque([start])
    seen = {start}
    while todo:
        n = todo.popleft()
        name = g.name(n)
        if name == "linear":
            found.append(n)
            continue
        if n.op == "placeholder":
            raise Reject(f"operand {start.name} comes straight from a model input")
        if not g.passes_back(n):
            raise Reject(f"operand {start.name} comes from {name} ({n.name}), not a linear projection")
        inputs = g.data_inputs(n) or [a for a in n.all_input_nodes if a.op != "get_attr"
                                      and is_tensor_node(a)]
        for a in inputs:
            if a not in seen:
                seen.add(a)
                todo.append(a)
    return found


def path_events(flow: FlowResult, g: GraphView, target: fx.Node) -> list[str]:
    anc = ancestors(target) | {target}
    return [e.kind for e in flow.events if e.node in anc]


def operand_projection(g: GraphView, core: Core, operand: fx.Node, role: str, dim_axis: int,
             token_axis: int, q_heads: Optional[tuple[int, int]] = None) -> tuple[Projection, int, torch.Tensor]:
    """Projection of one kernel operand; returns (projection, head axis, head x dim row table).

    ``q_heads`` (q's head axis counted from the end, number of heads): a k/v operand repeated
    across all query heads (multi-query attention) varies along no axis; when it has an axis of
    that size there, it is taken as the head axis, every head reading the same rows."""
    lins = source_linears(g, operand)
    if len(lins) != 1:
        raise Reject(f"{role} of {core.nodes[0].name} comes from {len(lins)} linears, expected 1")
    lin = lins[0]
    flow = g.flow.run({lin: feature_index(tensor_shape(lin), -1)})
    if operand not in flow.index:
        raise Reject(f"could not follow {lin.name} to the {role} operand of {core.nodes[0].name}")
    idx = flow.index[operand]
    rank = idx.dim()
    dim_axis, token_axis = dim_axis % rank, token_axis % rank
    head_axis = head_axis_of(idx, dim_axis, token_axis, role, core)
    if head_axis < 0 and q_heads is not None and q_heads[1] > 1 and -q_heads[0] <= rank:
        shared = q_heads[0] % rank
        if shared not in (dim_axis, token_axis) and idx.shape[shared] == q_heads[1]:
            head_axis = shared
    table = head_table(idx, head_axis, dim_axis, role, core)
    events = path_events(flow, g, operand)
    weight, bias = g.linear_params(lin)
    proj = Projection(node=lin.name, weight=weight, bias=bias,
                      # a strided depthwise convolution (MViTv2's pooling, one filter per dim
                      # shared by all heads): dims stay, heads go
                      index=table.long().tolist(), dims_mixed=any(e in ("mix", "norm", "channel_pool") for e in events))
    return proj, head_axis, table


def varies_where_valid(idx: torch.Tensor, axis: int) -> bool:
    """Whether ``idx`` holds different features along ``axis``, positions without a feature
    (SENTINEL: padding) left out."""
    top = idx.amax(axis, keepdim=True).expand_as(idx)
    return bool(((idx != top) & (idx != SENTINEL)).any())


def head_axis_of(idx: torch.Tensor, dim_axis: int, token_axis: int, role: str, core: Core) -> int:
    varying = []
    for a in range(idx.dim()):
        if a in (dim_axis, token_axis):
            continue
        if idx.shape[a] > 1 and varies_where_valid(idx, a):
            varying.append(a)
    if len(varying) > 1:
        raise Reject(f"{role} of {core.nodes[0].name}: projection features spread over axes {varying}")
    return varying[0] if varying else -1


def head_table(idx: torch.Tensor, head_axis: int, dim_axis: int, role: str, core: Core) -> torch.Tensor:
    """[head][dim] -> projection feature, checked to be the same at every batch/token position."""
    t = idx.movedim(dim_axis, -1)
    if head_axis >= 0:
        h_axis = head_axis if head_axis < dim_axis else head_axis - 1
        t = t.movedim(h_axis, -2)
    else:
        t = t.unsqueeze(-2)
    flat = t.reshape(-1, t.shape[-2], t.shape[-1])
    padding = (flat == SENTINEL).flatten(1).all(1)  # positions a pad added (halo blocks): no features
    kept = flat[~padding] if bool(padding.any()) and not bool(padding.all()) else flat
    table = kept[0]
    if not torch.equal(kept, table.expand_as(kept)):
        raise TokenDependent(f"{role} of {core.nodes[0].name}: projection features depend on the token")
    if (table < 0).any():
        raise Reject(f"{role} of {core.nodes[0].name}: mixes projection features with other data")
    if table.shape[-1] > 1 and any(len(set(row)) < len(row) for row in table.tolist()):
        # one feature at every position of the axis read as dims: those are tokens
        raise TokenDependent(f"{role} of {core.nodes[0].name}: the axis read as its dims repeats "
                             "one projection feature")
    return table
