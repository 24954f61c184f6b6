"""FFN slicing: closed neurons' input rows, output columns and side parameters removed; a closed block leaves the residual stream."""

from __future__ import annotations

from typing import Optional

import torch
from torch import fx

from hiap_fx.errors import HiapError
from hiap_fx.graph.editing import rewrite_sizes
from hiap_fx.graph.ir import arg_node
from hiap_fx.graph.queries import ancestors, descendants
from hiap_fx.passes.slice.context import SliceContext
from hiap_fx.plan import FFNSite, Residual


def remove_branch(graph: fx.Graph, nodes: dict[str, fx.Node], residual: Optional[Residual], site: str) -> None:
    if residual is None:
        raise HiapError(f"{site}: every unit is closed but the site is not on a residual branch, "
                        "so it cannot be removed; keep at least one unit open (e.g. raise its logit)")
    add = nodes[residual.add_node]
    if add.graph is not graph or getattr(add, "_erased", False):  # a parallel sibling left the sum
        # first, which now is this branch alone: it leaves where the sum joined the stream
        remove_branch(graph, nodes, residual.outer, site)
        return
    other = arg_node(add, 1 - residual.branch_arg)
    add.replace_all_uses_with(other)
    graph.erase_node(add)


def slice_ffn(ctx: SliceContext, site: FFNSite) -> None:
    dec = ctx.decisions
    block = dec.ffn_on(site)
    if not block:
        remove_branch(ctx.graph, ctx.nodes, site.residual, site.name)
        return
    alive = dec.neurons(site)
    if bool(alive.all()):
        return
    kept = int(alive.sum())
    out = ctx.nodes[site.out.node]
    sources = [ctx.nodes[p.node] for p in site.inputs]
    region = set()
    for s in sources:
        region |= descendants(s)
    region &= ancestors(out.args[0]) | {out.args[0]}
    for weight in {p.weight for p in site.inputs}:
        w = ctx.params.get(weight)
        keep = torch.ones(w.shape[0], dtype=torch.bool)
        for p in site.inputs:
            if p.weight == weight:
                keep[[p.index[0][k] for k in range(site.hidden) if not alive[k]]] = False
        ctx.params.replace(weight, w[keep])
        bias = next((p.bias for p in site.inputs if p.weight == weight), None)
        if bias and not bias.startswith("node:"):
            ctx.params.replace(bias, ctx.params.get(bias)[keep])
    w = ctx.params.get(site.out.weight)
    cols = torch.ones(w.shape[1], dtype=torch.bool)
    cols[[site.out.index[0][k] for k in range(site.hidden) if not alive[k]]] = False
    ctx.params.replace(site.out.weight, w[:, cols])
    for t in site.side:
        v = ctx.params.get(t.param)
        keep = torch.tensor([u < 0 or bool(alive[u]) for u in t.index])
        ctx.params.replace(t.param, v.index_select(t.axis, keep.nonzero().flatten()))
    for n in region:
        rewrite_sizes(n, {site.hidden: kept})
