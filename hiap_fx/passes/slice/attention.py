"""Attention rebuild: live heads grouped by kept widths, one kernel call per group, one output projection over the kept columns."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import fx

from hiap_fx.errors import HiapError
from hiap_fx.graph.ir import node_shape, tensor_shape
from hiap_fx.passes.slice.context import SliceContext, operand_layout
from hiap_fx.passes.slice.ffn import remove_branch
from hiap_fx.passes.slice.kernel import group_sdpa, manual_logits, narrow_heads, width_runs
from hiap_fx.passes.slice.operands import build_operand
from hiap_fx.plan import AttentionSite


def rebuild_attention(ctx: SliceContext, site: AttentionSite) -> None:
    dec = ctx.decisions
    if dec.attention_untouched(site):
        return
    d_on, q_on = dec.value_dims(site), dec.qk_dims(site)
    kv = site.kv_of_head
    live = dec.live_heads(site)
    if not live:
        if site.residual is not None:
            remove_branch(ctx.graph, ctx.nodes, site.residual, site.name)
        else:
            bias_only(ctx, site)
        return
    # widths are per kv head (query heads of one group share k and v)
    qdims = {h: q_on[kv[h]].nonzero().flatten().tolist() for h in live}
    vdims = {h: d_on[kv[h]].nonzero().flatten().tolist() for h in live}
    live.sort(key=lambda h: (-len(qdims[h]), -len(vdims[h]), h))
    core = ctx.nodes[site.core_nodes[0]]
    av = ctx.nodes[site.core_nodes[-1]]
    out_lin = ctx.nodes[site.out.node]
    lays = {r: operand_layout(ctx, site, r) for r in ("q", "k", "v")}
    g = ctx.graph
    outs: list[tuple[fx.Node, list[int]]] = []
    out_head = out_head_axis(site, tensor_shape(av), tensor_shape(out_lin.args[0]))
    qk_runs = width_runs(live, lambda h: len(qdims[h]))
    if len(qk_runs) > 1 and any(t.kind.startswith("head_mixing") for t in site.side):
        raise HiapError(f"{site.name}: talking-heads mixing needs every live head at one q/k width, "
                        "but the q/k dim gates left different widths; prepare with "
                        "PruneConfig(qk_dims=False) for this model")
    with g.inserting_before(out_lin):
        for qk_heads in qk_runs:
            sfx = f"h{'_'.join(map(str, qk_heads))}" if len(live) < 8 else f"g{len(outs)}"
            q = build_operand(ctx, site, "q", lays["q"], qk_heads, qdims, "q" + sfx)
            k = build_operand(ctx, site, "k", lays["k"], qk_heads, qdims, "k" + sfx)
            if site.kind == "manual":
                probs = manual_logits(ctx, site, core, av, q, k, qk_heads)
            for v_heads in width_runs(qk_heads, lambda h: len(vdims[h])):
                v = build_operand(ctx, site, "v", lays["v"], v_heads, vdims, f"v{len(outs)}")
                off, n = qk_heads.index(v_heads[0]), len(v_heads)
                if site.kind == "sdpa":
                    qs = narrow_heads(g, q, site.layout.q_head_axis, off, n, len(qk_heads))
                    ks = narrow_heads(g, k, site.layout.k_head_axis, off, n, len(qk_heads))
                    out = group_sdpa(ctx, core, qs, ks, v, v_heads, site.layout.q_head_axis)
                else:
                    p = narrow_heads(g, probs, site.layout.q_head_axis, off, n, len(qk_heads))
                    out = g.node_copy(av, lambda a: {av.args[0]: p, av.args[1]: v}.get(a, a))
                outs.append((to_projection_input(out, out_head, len(tensor_shape(av)), g), v_heads))
        x = outs[0][0] if len(outs) == 1 else g.call_function(torch.cat, ([o for o, _ in outs], -1))
        cols = [site.out.index[h][j] for _, heads in outs for h in heads for j in vdims[h]]
        w = ctx.params.get(site.out.weight)[:, cols]
        ctx.params.replace(site.out.weight, w)
        new = g.call_function(F.linear, (x, out_lin.args[1], out_lin.args[2] if len(out_lin.args) > 2 else None))
    out_lin.replace_all_uses_with(new)


def to_projection_input(out: fx.Node, out_head: Optional[int], rank: int, g: fx.Graph) -> fx.Node:
    """Merge one group's heads and dims into the last axis (the projection's input layout)."""
    if out_head is not None:
        out = g.call_method("movedim", (out, out_head % rank, -2))
        out = g.call_method("flatten", (out, -2))
    return out


def same_lead(kernel_out: tuple[int, ...], out_head: Optional[int], proj_in: tuple[int, ...]) -> bool:
    rank = len(kernel_out)
    kept = [a for a in range(rank - 1) if out_head is None or a != out_head % rank]
    return tuple(kernel_out[a] for a in kept) == tuple(proj_in[:-1])


def bias_only(ctx: SliceContext, site: AttentionSite) -> None:
    """A closed attention off the residual stream still adds its output bias: keep just that."""
    out_lin = ctx.nodes[site.out.node]
    x = ctx.nodes[site.q.node].args[0]
    x_shape = node_shape(x)
    if x_shape is None or x_shape[:-1] != tensor_shape(out_lin.args[0])[:-1]:
        raise HiapError(f"{site.name}: every head is closed and the attention is not on a residual "
                        "branch, so its output bias would remain, but its input and output "
                        "layouts differ; keep at least one head open")
    ctx.params.replace(site.out.weight, ctx.params.get(site.out.weight)[:, :0])
    with ctx.graph.inserting_before(out_lin):
        empty = ctx.graph.call_method("narrow", (x, -1, 0, 0))
        new = ctx.graph.call_function(F.linear, (empty, *out_lin.args[1:]))
    out_lin.replace_all_uses_with(new)


def out_head_axis(site: AttentionSite, kernel_out: tuple[int, ...], proj_in: tuple[int, ...]) -> Optional[int]:
    """Head axis of the kernel output; with one head discovery sees no varying axis, so take the
    size-1 axis that the output projection's input does not have."""
    if site.layout.out_head_axis is not None or len(kernel_out) == len(proj_in):
        return site.layout.out_head_axis
    ones = [a - len(kernel_out) for a in range(1, len(kernel_out) - 1) if kernel_out[a] == 1]
    if not ones:
        raise HiapError(f"{site.name}: cannot tell how the kernel output {kernel_out} becomes the "
                        f"output projection input {proj_in}; please report the model")
    return -3 if -3 in ones else ones[-1]
