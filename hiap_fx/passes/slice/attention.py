"""Attention rebuild: the live heads padded to one width per layer, one kernel call, one output projection."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import fx

from hiap_fx.errors import HiapError
from hiap_fx.graph.ir import is_tensor_node, node_shape, tensor_shape
from hiap_fx.graph.ops import in_family, op_name
from hiap_fx.graph.queries import ancestors, descendants
from hiap_fx.passes.slice.context import SizeFix, SliceContext, detach_sizes, kernel_operand, operand_layout
from hiap_fx.passes.slice.ffn import remove_branch
from hiap_fx.passes.slice.kernel import kernel_call, manual_logits, operand_terms
from hiap_fx.passes.slice.operands import (
    PAD,
    operand_rows,
    padded,
    projection_rows,
    replay_head_axes,
    replay_prefix,
    shape_operand,
)
from hiap_fx.passes.slice.rearrange import PASSED, moves_only, output_chain, plan_output_replay, replay_output
from hiap_fx.plan import AttentionSite
from hiap_fx.registry import SAFE_FUNCTIONS


def rebuild_attention(ctx: SliceContext, site: AttentionSite,
                      sizes: Optional[dict[fx.Node, Optional[SizeFix]]] = None) -> None:
    """Rebuild one attention for the decisions: the live heads, each padded to the widest kept
    q/k and value width of the layer, in one kernel call (padded rows and columns are zero).
    ``sizes``: the site's :func:`shape_queries`, read before any site was edited."""
    dec = ctx.decisions
    if dec.attention_untouched(site):
        return
    d_on, q_on = dec.value_dims(site), dec.qk_dims(site)
    kv = site.kv_of_head
    live = dec.live_heads(site)
    if not live:
        if site.residual is not None:
            remove_branch(ctx.graph, ctx.nodes, site.residual, site.name)
        elif site.passthrough:
            passed_only(ctx, site)
        else:
            bias_only(ctx, site)
        return
    # widths are per kv head (query heads of one group share k and v)
    dims = {"q": {h: q_on[kv[h]].nonzero().flatten().tolist() for h in live},
            "v": {h: d_on[kv[h]].nonzero().flatten().tolist() for h in live}}
    dims["k"] = dims["q"]
    width = {role: max(len(d) for d in dims[role].values()) for role in ("q", "k", "v")}
    core = ctx.nodes[site.core_nodes[0]]
    av = ctx.nodes[site.core_nodes[-1]]
    out_lin = ctx.nodes[site.out.node]
    g = ctx.graph
    out_head = out_head_axis(site, tensor_shape(av), tensor_shape(out_lin.args[0]))
    with g.inserting_before(out_lin):
        before = set(ctx.rebuilt)
        op = projected_operands(ctx, site, live, dims, width)
        gate = op.pop("out_gate", None)
        own = {n: new for n, new in ctx.rebuilt.items() if n not in before}  # this site's copies
        terms = operand_terms(ctx, site, op["q"], op["k"], live, own)
        if site.kind == "sdpa":
            if site.head_dim == site.v_dim:  # one head dim for q, k and v: CPU flash attention
                common = max(width["q"], width["v"])
                op = {role: pad_last(g, t, common - width[role]) for role, t in op.items()}
            out = kernel_call(ctx, core, op["q"], op["k"], op["v"], live, site.layout.q_head_axis, terms)
            if site.head_dim == site.v_dim and width["v"] < common:
                out = g.call_method("narrow", (out, -1, 0, width["v"]))
        else:
            probs = manual_logits(ctx, site, core, av, op["q"], op["k"], live, terms)
            out = g.node_copy(av, lambda a: {av.args[0]: probs, av.args[1]: op["v"]}.get(a, a))
        proj_in = out_lin.args[0]
        queries = {q: rebuilt_query(ctx, site, q, op["q"], own) for q in residual_queries(ctx.nodes, site)}
        if gate is not None:  # the gate multiplying the output, rebuilt for the live heads
            queries[kernel_operand(ctx, site, "out_gate")] = gate
        passed = [ctx.nodes[n] for n in site.passthrough]
        if not (site.transposed or queries or passed) and direct_output(av, out_head, proj_in, ctx.flow.modules):
            x = to_projection_input(out, out_head, len(tensor_shape(av)), g)
            order = [(i, j) for i in range(len(live)) for j in range(width["v"])]
        else:  # the token axis is rearranged first (H x W, windows reversed), or the queries
            # are added (residual pooling): replay those ops on the live heads
            replay = plan_output_replay(ctx.flow, av, proj_in, out_head, len(live), width["v"],
                                        site.layout.out_dim_axis, list(queries), passed)
            x = replay_output(ctx.flow, g, replay, av, out, queries)
            order = replay.order
        cols = [j if i == PASSED else site.out.index[live[i]][dims["v"][live[i]][j]]
                if j < len(dims["v"][live[i]]) else PAD for i, j in order]
        ctx.params.replace(site.out.weight, padded(ctx.params.get(site.out.weight), cols, 1))
        new = g.call_function(F.linear, (x, out_lin.args[1], out_lin.args[2] if len(out_lin.args) > 2 else None))
    out_lin.replace_all_uses_with(new)
    for query, fix in (sizes or {}).items():
        # sizes of tokens or batch read from an operand (Hiera's pooled q, LowFormer's projection
        # output): from its copy or as recorded, so the dense operand is not kept alive for them
        read = query.args[0]
        if fix == "copy" and isinstance(read, fx.Node) and read in own:
            query.replace_input_with(read, own[read])
        elif fix == "detach":
            detach_sizes(ctx, query)


def operand_roles(site: AttentionSite) -> tuple[str, ...]:
    """The projected operands finalize rebuilds: q, k, v and the output gate, if any."""
    return ("q", "k", "v", "out_gate") if site.out_gate is not None else ("q", "k", "v")


def projected_operands(ctx: SliceContext, site: AttentionSite, live: list[int],
                       dims: dict[str, dict[int, list[int]]], width: dict[str, int]) -> dict[str, fx.Node]:
    """q, k and v (and the output gate) for the live heads, in their original layouts; roles
    that share one projection (a fused qkv linear) share one linear over their rows, split
    afterwards. The gate takes the value dims."""
    roles = operand_roles(site)
    dims = {**dims, "out_gate": dims["v"]}
    width = {**width, "out_gate": width["v"]}
    lays = {role: operand_layout(ctx, site, role) for role in roles}  # before any edit
    axes = {role: replay_head_axes(ctx, getattr(site, role), lays[role].replay, len(getattr(site, role).index))
            for role in roles}
    rows = {role: operand_rows(site, role, live, dims[role], width[role]) for role in roles}
    by_node: dict[str, list[str]] = {}
    for role in roles:
        by_node.setdefault(getattr(site, role).node, []).append(role)
    ys: dict[str, fx.Node] = {}
    for group in by_node.values():
        proj = getattr(site, group[0])
        picks = [r for role in group for r in rows[role].rows]
        y = projection_rows(ctx, proj, picks, "".join(group))
        y = replay_prefix(ctx, lays[group[0]].prefix, ctx.nodes[proj.node], y, picks, "".join(group))
        off = 0
        for role in group:
            n = len(rows[role].rows)
            ys[role] = y if len(group) == 1 else ctx.graph.call_method("narrow", (y, -1, off, n))
            off += n
    return {role: shape_operand(ctx, site, role, lays[role], ys[role],
                                rows[role].repeat, live, width[role], axes[role]) for role in roles}


def pad_last(g: fx.Graph, t: fx.Node, extra: int) -> fx.Node:
    """``t`` with ``extra`` zeros appended along the last axis (unchanged when 0)."""
    return t if extra <= 0 else g.call_function(F.pad, (t, (0, extra)))


def residual_queries(nodes: dict[str, fx.Node], site: AttentionSite) -> list[fx.Node]:
    """The queries added to the kernel output before the output projection (``out_residual``)."""
    if not site.out_residual:
        return []
    add, av = nodes[site.out_residual], nodes[site.core_nodes[-1]]
    below = descendants(av) | {av}
    return [a for a in add.all_input_nodes if a not in below]


def rebuilt_query(ctx: SliceContext, site: AttentionSite, query: fx.Node, q: fx.Node,
                  own: dict[fx.Node, fx.Node]) -> fx.Node:
    """The live heads' copy of ``query`` (the queries of a residual pooling): the rebuilt q
    operand or a node on its rebuilt path (``own``: this site's rebuilt copies)."""
    if query is ctx.nodes[site.core_nodes[0]].args[0]:
        return q
    if query in own:
        return own[query]
    raise HiapError(f"{site.name}: the queries added to the attention output ({query.name}) are "
                    "not on the rebuilt q path; please report the model")


def to_projection_input(out: fx.Node, out_head: Optional[int], rank: int, g: fx.Graph) -> fx.Node:
    """Merge one group's heads and dims into the last axis (the projection's input layout)."""
    if out_head is not None:
        out = g.call_method("movedim", (out, out_head % rank, -2))
        out = g.call_method("flatten", (out, -2))
    return out


def direct_output(av: fx.Node, out_head: Optional[int], proj_in: fx.Node, modules: dict[str, Any]) -> bool:
    """Whether the kernel output reaches the projection only by merging heads into channels
    (else the ops in between are replayed: :mod:`hiap_fx.passes.slice.rearrange`)."""
    return same_lead(tensor_shape(av), out_head, tensor_shape(proj_in)) and all(
        moves_only(op_name(n, modules)) for n in output_chain(av, proj_in, modules) if is_tensor_node(n))


def same_lead(kernel_out: tuple[int, ...], out_head: Optional[int], proj_in: tuple[int, ...]) -> bool:
    rank = len(kernel_out)
    kept = [a for a in range(rank - 1) if out_head is None or a != out_head % rank]
    return tuple(kernel_out[a] for a in kept) == tuple(proj_in[:-1])


def passed_only(ctx: SliceContext, site: AttentionSite) -> None:
    """No head live, but features concatenated with the kernel output (``passthrough``) still
    reach the output projection: it keeps only their columns."""
    out_lin, av = ctx.nodes[site.out.node], ctx.nodes[site.core_nodes[-1]]
    proj_in = out_lin.args[0]
    out_head = out_head_axis(site, tensor_shape(av), tensor_shape(proj_in))
    g = ctx.graph
    with g.inserting_before(out_lin):
        replay = plan_output_replay(ctx.flow, av, proj_in, out_head, 0, 0, site.layout.out_dim_axis,
                                    passed=[ctx.nodes[n] for n in site.passthrough])
        x = replay_output(ctx.flow, g, replay, av, None)
        ctx.params.replace(site.out.weight, padded(ctx.params.get(site.out.weight), [j for _, j in replay.order], 1))
        new = g.call_function(F.linear, (x, *out_lin.args[1:]))
    out_lin.replace_all_uses_with(new)


def no_features(batch_of: torch.Tensor, tail: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    """An empty ``(batch, *tail, 0)`` tensor of ``like``'s dtype and device, the batch read from
    axis 0 of ``batch_of`` (a closed attention's input to its output projection)."""
    return like.new_zeros((batch_of.shape[0], *tail, 0))


SAFE_FUNCTIONS.append(no_features)


def bias_only(ctx: SliceContext, site: AttentionSite) -> None:
    """A closed attention off the residual stream still adds its output bias: keep just that
    (the projection reads no features; nothing that fed only the attention stays)."""
    out_lin = ctx.nodes[site.out.node]
    proj_in = out_lin.args[0]
    first_input = next((n for n in ctx.graph.nodes if n.op == "placeholder"), None)
    ctx.params.replace(site.out.weight, ctx.params.get(site.out.weight)[:, :0])
    with ctx.graph.inserting_before(out_lin):
        if first_input is not None and ctx.batch_first(proj_in):
            empty = ctx.graph.call_function(no_features, (first_input, tensor_shape(proj_in)[1:-1], out_lin.args[1]))
        else:
            x = ctx.nodes[site.q.node].args[0]
            x_shape = node_shape(x)
            if x_shape is None or x_shape[:-1] != tensor_shape(proj_in)[:-1]:
                raise HiapError(f"{site.name}: every head is closed and the attention is not on a "
                                "residual branch, so its output bias would remain, but its input "
                                "and output layouts differ; keep at least one head open")
            empty = ctx.graph.call_method("narrow", (x, -1, 0, 0))
        new = ctx.graph.call_function(F.linear, (empty, *out_lin.args[1:]))
        restat_empty(ctx, site, empty)
    out_lin.replace_all_uses_with(new)


def restat_empty(ctx: SliceContext, site: AttentionSite, empty: fx.Node) -> None:
    """Width statistics on the way to the closed attention's projection (a sub-norm) read the
    zero-width ``empty`` instead: over a nominal width, no features are all features zero, as
    in the gated model."""
    av, out_lin = ctx.nodes[site.core_nodes[-1]], ctx.nodes[site.out.node]
    lead = tensor_shape(out_lin.args[0])[:-1]
    before = ancestors(out_lin)
    for stat in [n for n in descendants(av) & before if in_family(op_name(n), "width_stat")]:
        x = stat.args[0]
        if not isinstance(x, fx.Node) or tensor_shape(x)[:-1] != lead:
            raise HiapError(f"{site.name}: every head is closed, and the norm before the output "
                            f"projection ({stat.name}) reads another layout than the projection; "
                            "keep at least one head open")
        new = ctx.graph.node_copy(stat, lambda a: empty if a is x else a)
        stat.replace_all_uses_with(new, delete_user_cb=lambda u: u not in before)


def out_head_axis(site: AttentionSite, kernel_out: tuple[int, ...], proj_in: tuple[int, ...]) -> Optional[int]:
    """Head axis of the kernel output; with one head discovery sees no varying axis, so take the
    size-1 axis that the output projection's input does not have."""
    if site.layout.out_head_axis is not None or len(kernel_out) == len(proj_in):
        return site.layout.out_head_axis
    ones = [a - len(kernel_out) for a in range(1, len(kernel_out) - 1) if kernel_out[a] == 1]
    if not ones:  # no axis for the one head (folded into the batch axis): the replay of the
        # ops up to the projection is checked by index flow
        return None
    return -3 if -3 in ones else ones[-1]
