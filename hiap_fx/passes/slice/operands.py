"""q/k/v operands rebuilt from the kept rows of their projections, in the original layout."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Optional, cast

import torch
import torch.nn.functional as F
from torch import fx

from hiap_fx.errors import HiapError
from hiap_fx.graph.editing import rewrite_axis_size, rewrite_sizes
from hiap_fx.graph.flow import axes_of_size
from hiap_fx.graph.ir import is_tensor_node, node_dtype, node_shape, tensor_shape
from hiap_fx.graph.ops import op_name
from hiap_fx.graph.queries import data_descendants
from hiap_fx.passes.slice.context import OperandLayout, SliceContext, row_op
from hiap_fx.plan import AttentionSite

PAD = None  # a padded row or column: zero weight, zero bias


@dataclass
class OperandRows:
    """The projection rows one operand needs: ``rows`` (``PAD`` for padding) computed once each,
    and ``repeat`` (positions into ``rows``, or ``None``) when query heads share kv rows."""

    rows: list[Optional[int]]
    repeat: Optional[list[int]]


def head_unit(site: AttentionSite, role: str) -> Callable[[int], int]:
    """Query head -> row of ``role``'s head table (k/v of grouped-query attention have one row
    per kv head, shared by its query heads)."""
    if len(getattr(site, role).index) == site.num_heads:
        return lambda h: h
    return lambda h: site.kv_of_head[h]


def operand_rows(site: AttentionSite, role: str, heads: list[int], dims: dict[int, list[int]],
                 width: int) -> OperandRows:
    """Rows of ``role``'s projection for ``heads``: each head's kept ``dims``, padded to ``width``."""
    proj = getattr(site, role)
    unit = head_unit(site, role)
    # the query heads of one kv group share its k/v rows (padding included): one copy each
    share = (lambda h: h) if role in ("q", "out_gate") else (lambda h: site.kv_of_head[h])
    keys = [(share(h), j) for h in heads for j in range(width)]
    unique = list(dict.fromkeys(keys))
    first: dict[int, int] = {}
    for h in heads:
        first.setdefault(share(h), h)
    rows: list[Optional[int]] = []
    for u, j in unique:
        kept = dims[first[u]]
        rows.append(proj.index[unit(first[u])][kept[j]] if j < len(kept) else PAD)
    at = {key: i for i, key in enumerate(unique)}
    return OperandRows(rows, None if len(unique) == len(keys) else [at[key] for key in keys])


def padded(values: torch.Tensor, picks: list[Optional[int]], axis: int) -> torch.Tensor:
    """``values`` indexed along ``axis`` by ``picks``, zeros where a pick is ``PAD``."""
    shape = list(values.shape)
    shape[axis] = len(picks)
    out = values.new_zeros(shape)
    real = [i for i, p in enumerate(picks) if p is not PAD]
    src = torch.tensor([picks[i] for i in real], dtype=torch.long)
    out.index_copy_(axis, torch.tensor(real, dtype=torch.long), values.index_select(axis, src))
    return out


def projection_rows(ctx: SliceContext, proj, rows: list[Optional[int]], suffix: str) -> fx.Node:
    """One linear over the given rows of ``proj`` (padded rows are zero)."""
    w_node = ctx.params.add(ctx.graph, proj.weight, suffix, padded(ctx.params.get(proj.weight), rows, 0))
    b_node = None
    if proj.bias and not proj.bias.startswith("node:"):
        b_node = ctx.params.add(ctx.graph, proj.bias, suffix, padded(ctx.params.get(proj.bias), rows, 0))
    return ctx.graph.call_function(F.linear, (ctx.nodes[proj.node].args[0], w_node, b_node))


def replay_prefix(ctx: SliceContext, prefix: list[fx.Node], P: fx.Node, y: fx.Node,
                  rows: list[Optional[int]], suffix: str) -> fx.Node:
    """The per-row ops between a projection and its operand layout (a batch norm over its rows)
    replayed on the new rows ``y``: their statistics and affine taken at ``rows`` (zero for a
    padded row, which then stays zero)."""
    if not prefix:
        return y
    g = ctx.graph
    mapping: dict[fx.Node, fx.Node] = {P: y}
    full = tensor_shape(P)[-1]
    for n in prefix:
        cut: dict[Any, Any] = {}
        if n.op == "call_function" and row_op(ctx, n):  # an exported batch norm: its weight,
            # bias and statistics are arguments
            cut = {a: ctx.params.add(g, str(a.target), suffix, padded(ctx.params.get(str(a.target)).detach(), rows, 0))
                   for a in n.args[1:5] if isinstance(a, fx.Node)}
        new = g.node_copy(n, lambda a: mapping.get(a, cut.get(a, a)))
        if n.op == "call_module" and row_op(ctx, n):
            target = sliced_module(ctx, str(n.target), rows, suffix)
            new.target = target
        rewrite_sizes(new, {full: len(rows)} if full != len(rows) else {})
        mapping[n] = new
    return mapping[prefix[-1]]


def sliced_module(ctx: SliceContext, target: str, rows: list[Optional[int]], suffix: str) -> str:
    """A copy of the per-channel module at ``target`` (a batch norm) for ``rows``, registered
    next to it; returns its path."""
    module = copy.deepcopy(ctx.gm.get_submodule(target))
    path = f"{target}_{suffix}"
    while path in dict(ctx.gm.named_modules()):
        path += "_"
    ctx.gm.add_submodule(path, module)
    for name, tensor in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
        if tensor.dim() > 0:
            ctx.params.replace(f"{path}.{name}", padded(tensor.detach(), rows, 0))
    if hasattr(module, "num_features"):
        setattr(module, "num_features", len(rows))
    return path


def shape_operand(ctx: SliceContext, site: AttentionSite, role: str, lay: OperandLayout, y: fx.Node,
                  repeat: Optional[list[int]], live: list[int], width: int,
                  lay_head_axes: Optional[dict[fx.Node, int]] = None) -> fx.Node:
    """The kernel operand from the projection output ``y`` ([lead..., rows], shared kv rows
    once), reshaped and replayed into the original layout: the ``live`` heads, ``width`` each
    (``lay_head_axes``: :func:`replay_head_axes`, read before the graph was edited)."""
    heads = len(live)
    proj = getattr(site, role)
    g = ctx.graph
    kv_live = list(dict.fromkeys(site.kv_of_head[h] for h in live))
    if lay.kv_repeat is not None:  # one slot per live kv head up to the repeat (see OperandLayout)
        repeat, heads = None, len(kv_live)
    if repeat is not None:  # shared kv rows are computed once and repeated (no MACs)
        if not lay.has_head_axis:
            raise HiapError(f"{site.name}: the {role} operand shared by query heads has no head "
                            f"axis at {lay.boundary.name} to repeat it along; prepare with "
                            "PruneConfig(heads=False) for this model, or report it")
        index = ctx.params.constant(g, "hiap_kv_rows", torch.tensor(repeat))
        y = g.call_method("index_select", (y, -1, index))
    for first, last in lay.merges:
        y = g.call_method("flatten", (y, first, last))
    for axis, sizes in lay.splits:  # a token axis split into windows (leading size inferred)
        y = g.call_method("unflatten", (y, axis, (-1, *sizes[1:])))
    t = g.call_method("unflatten", (y, -1, (heads, width))) if lay.has_head_axis else y
    if lay.perm != sorted(lay.perm):
        t = g.call_method("permute", (t, *lay.perm))
    if lay.fold is not None:  # heads folded into the batch axis: (B, heads) -> B * heads
        t = g.call_method("flatten", (t, lay.fold, lay.fold + 1))
    for axis in lay.new_axes:
        t = g.call_method("unsqueeze", (t, axis))
    for n in lay.pointwise:  # element-wise ops before the boundary (a sigmoid after a movedim)
        t = g.node_copy(n, _feeding(n, ctx.cg.input_dependent, t))
    full_heads, full_dims = len(proj.index), len(proj.index[0])
    if lay.kv_repeat is not None:
        full_heads = site.num_kv_heads
    ints = {full_heads: heads}
    if width != full_dims:
        ints[full_dims] = width
        ints[full_heads * full_dims] = heads * width
    mapping = {lay.boundary: t}
    head_axes = lay_head_axes or {}
    # per-head tensors joining the operand after the boundary (e.g. rotary tables with one
    # frequency set per head) are cut to the kept heads, like logits-side biases
    head_axis = site.layout.k_head_axis if role == "k" else site.layout.q_head_axis
    units = kv_live if lay.kv_repeat is not None else [head_unit(site, role)(h) for h in live]
    selected: dict[fx.Node, Any] = {}

    def arg(a: Any) -> Any:
        if a in mapping:
            return mapping[a]
        if isinstance(a, fx.Node) and head_axis is not None and rank is not None:
            if a not in selected:
                selected[a] = select_heads(ctx, a, head_axis % rank, rank, full_heads, units)
            return selected[a]
        return a

    # tensors after the boundary made from its sizes or dtype alone (rotary tables built from
    # the sequence length) hold no heads: their literals are not head counts
    from_data = {lay.boundary} | {n for n in data_descendants(lay.boundary) if n in set(lay.replay)}
    for n in lay.replay:
        shape = node_shape(n)
        rank = len(shape) if shape is not None else None
        if is_tensor_node(n) and n not in from_data:
            mapping[n] = g.node_copy(n, arg)
            continue
        if n is lay.kv_repeat:  # kv heads -> query heads: each live query head's kv slot
            dim = n.kwargs.get("dim", n.args[2] if len(n.args) > 2 else None)
            slots = ctx.params.constant(g, "hiap_kv_heads", torch.tensor(
                [kv_live.index(site.kv_of_head[h]) for h in live], dtype=torch.long))
            mapping[n] = g.call_method("index_select", (mapping[cast(fx.Node, n.args[0])], dim, slots))
            # from here on the sizes and per-head tensors are the query heads'
            full_heads = site.num_heads
            ints = {k: v for k, v in ints.items() if k != site.num_kv_heads}
            ints[full_heads] = len(live)
            units, selected = [head_unit(site, role)(h) for h in live], {}
            continue
        new = g.node_copy(n, arg)
        if op_name(new) == "type_as" and isinstance(n.args[1], fx.Node) and n.args[1] not in mapping:
            to = g.call_method("to", (new.args[0], node_dtype(n.args[1])))  # the dtype, not the tensor
            g.erase_node(new)
            new = to
        if n in head_axes and op_name(n) in ("reshape", "view", "_unsafe_view", "expand"):
            # the heads' entry found by index flow (a literal head count equal to the width)
            rewrite_axis_size(new, head_axes[n], full_heads, heads)
            rewrite_sizes(new, {k: v for k, v in ints.items() if k != full_heads})
        elif not (op_name(n) in ("conv1d", "conv2d", "conv3d") and new.args[1] is n.args[1]):
            rewrite_sizes(new, ints)  # a convolution keeping its filters keeps its groups
        mapping[n] = new
    ctx.rebuilt.update(mapping)
    return mapping[lay.operand]


def _feeding(n: fx.Node, dependent: Any, t: fx.Node) -> Callable[[fx.Node], Any]:
    """Argument map for a copy of element-wise ``n`` that reads ``t`` in place of its one
    input-dependent operand."""
    data = next(a for a in n.all_input_nodes if a.name in dependent)
    return lambda a: t if a is data else a


def replay_head_axes(ctx: SliceContext, proj: Any, replay: list[fx.Node], heads: int) -> dict[fx.Node, int]:
    """For the replayed operand-path nodes: the output axis holding the projection's heads (index
    flow of each feature's head from the projection), where exactly one axis of ``heads`` does."""
    lin = ctx.nodes[proj.node]
    shape = node_shape(lin)
    if shape is None:
        return {}
    head_of = torch.full((shape[-1],), -1.0, dtype=torch.float64)
    for h, features in enumerate(proj.index):
        head_of[torch.tensor(features, dtype=torch.long)] = float(h)
    code = head_of.expand(*shape).clone()
    try:
        flow = ctx.flow.run({lin: code})
    except KeyError:  # the graph was edited since the flow read it: no head axes known
        return {}
    return axes_of_size(flow, replay, heads)


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
