"""Slice: compile the hard-gated graph into a compact, ordinary graph (see the modules of this package).

* Gate machinery is removed (a kept unit's mask is 1; closed units are cut out instead).
* FFN sites (:mod:`.ffn`): rows, columns and per-neuron side parameters of closed neurons go.
* Attention sites (:mod:`.attention`) are rebuilt around the kernel from the kept rows of
  their projections (:mod:`.operands`), padded to one width per layer and run in one kernel call (:mod:`.kernel`).
* A site whose units are all closed leaves the residual stream: its add becomes the identity.
"""

from __future__ import annotations

import torch

from hiap_fx.graph.editing import restore_order
from hiap_fx.graph.ir import CapturedGraph
from hiap_fx.passes.slice.attention import rebuild_attention
from hiap_fx.passes.slice.context import SliceContext, shape_queries
from hiap_fx.passes.slice.ffn import slice_ffn
from hiap_fx.plan import Plan


def slice_sites(cg: CapturedGraph, plan: Plan, decisions: dict[str, torch.Tensor]) -> CapturedGraph:
    """Cut every site of ``plan`` in the gate-free graph of ``cg`` as ``decisions`` say (FFN rows
    and columns, attention rebuilt around the kernel, closed sub-layers off the stream)."""
    ctx = SliceContext(cg, plan, decisions)
    if any(s.layout.batch_folded or not ctx.decisions.live_heads(s) and s.residual is None
           and not s.passthrough for s in plan.attention):
        # heads folded into the batch axis, or a closed attention off the stream: the shapes at
        # another batch are read before any weight is cut (the graph cannot run in between)
        ctx.read_batch_shapes()
    sizes = {s.name: shape_queries(ctx, s) for s in plan.attention}  # before any edit
    for site in plan.ffn:
        slice_ffn(ctx, site)
    for attention_site in plan.attention:
        rebuild_attention(ctx, attention_site, sizes[attention_site.name])
    restore_order(ctx.graph)  # shape queries redirected to rebuilt operands defined later
    ctx.graph.lint()
    return cg
