"""Prepare-time checks: attention that finalize could not rebuild is reported, never gated."""

from __future__ import annotations

from typing import Any, Literal, Optional

from torch import fx

from hiap_fx.errors import HiapError
from hiap_fx.graph.ir import CapturedGraph, is_tensor_node, tensor_shape
from hiap_fx.graph.ops import op_name
from hiap_fx.graph.queries import data_ancestors, descendants
from hiap_fx.passes.slice.attention import direct_output, operand_roles, out_head_axis, residual_queries
from hiap_fx.passes.slice.context import (
    SizeFix,
    SliceContext,
    from_safe_queries,
    kernel_operand,
    operand_layout,
    shape_queries,
)
from hiap_fx.passes.slice.rearrange import plan_output_replay
from hiap_fx.plan import AttentionSite, Plan, Unclaimed


def check_private_projections(nodes: dict[str, fx.Node], site: AttentionSite,
                              queries: Optional[dict[fx.Node, Optional[SizeFix]]] = None) -> None:
    """Finalize rebuilds q/k/v from the kept rows of their projections and lets the original
    linears die; a projection whose output also feeds something else (a parallel block fusing
    the MLP's input into the same linear) would stay whole next to the rebuilt rows. Sizes read
    from the operands by safe shape queries (``queries``: :func:`shape_queries`) are read from
    the rebuilt operands instead."""
    core = [nodes[n] for n in site.core_nodes]
    if site.out_residual:  # the queries' add to the output (residual pooling) is the attention's
        core.append(nodes[site.out_residual])
    if site.out_gate_mul:  # so is the product with the output gate
        core.append(nodes[site.out_gate_mul])
    operands = [a for c in core for a in c.all_input_nodes]
    feeding: set[fx.Node] = set()
    for o in operands:
        feeding |= data_ancestors(o) | {o}
    for role in operand_roles(site):
        P = nodes[getattr(site, role).node]
        for n in descendants(P) & feeding:
            if not is_tensor_node(n) and from_safe_queries(n, queries or {}):
                continue
            for u in n.users:
                if u in feeding or u in core or not is_tensor_node(u):
                    continue
                raise HiapError(f"{site.name}: the {role} projection {P.name} also feeds {u.name} "
                                f"({op_name(u)}), outside this attention (e.g. an MLP fused into the "
                                "same linear); its rows cannot be cut for the attention alone")


def unsliceable_attention(cg: CapturedGraph, plan: Plan) -> dict[str, str]:
    """Attention sites finalize could not rebuild (site name -> reason), found before any gate
    is inserted so that they are reported at prepare time instead of failing after training."""
    check = SliceContext(cg, plan, {})  # reads only: nothing is cut without decisions
    bad: dict[str, str] = {}
    for site in plan.attention:
        try:
            check_private_projections(check.nodes, site, shape_queries(check, site))
            for role in operand_roles(site):
                operand_layout(check, site, role)
            out_lin = check.nodes[site.out.node]
            av = check.nodes[site.core_nodes[-1]]
            head = out_head_axis(site, tensor_shape(av), tensor_shape(out_lin.args[0]))
            queries = residual_queries(check.nodes, site) + (
                [kernel_operand(check, site, "out_gate")] if site.out_gate else [])
            passed = [check.nodes[n] for n in site.passthrough]
            if site.transposed or queries or passed or \
                    not direct_output(av, head, out_lin.args[0], check.flow.modules):
                # rearranged before the projection (H x W, windows reversed): it must replay for
                # fewer heads and narrower heads (finalize plans again for the real decisions)
                out_shape = tensor_shape(av)
                heads = out_shape[head] if head is not None else 1
                dims = out_shape[site.layout.out_dim_axis]
                plan_output_replay(check.flow, av, out_lin.args[0], head, max(1, heads - 1),
                                   dims if site.transposed or queries else max(1, dims - 1),
                                   site.layout.out_dim_axis, queries, passed)
        except HiapError as exc:
            bad[site.name] = str(exc)
    return bad


def mark_folded_batch(cg: CapturedGraph, plan: Plan) -> None:
    """Record on each site which kernel tensors hold the batch inside their head axis (heads
    folded into the batch axis): the gates then mask per (batch, head) slice, and finalize
    checks a batch of two as well."""
    ctx = SliceContext(cg, plan, {})
    for site in plan.attention:
        core, av = ctx.nodes[site.core_nodes[0]], ctx.nodes[site.core_nodes[-1]]
        lay = site.layout
        tensors: dict[Literal["q", "k", "out"], tuple[Any, Optional[int]]] = {
            "q": (core.args[0], lay.q_head_axis), "k": (core.args[1], lay.k_head_axis),
            "out": (av, lay.out_head_axis)}
        folded: list[Literal["q", "k", "out"]] = []
        for role, (node, axis) in tensors.items():
            if not isinstance(node, fx.Node) or axis is None:
                continue
            found = ctx.folded_axis(node)
            if found is not None and found == axis % len(tensor_shape(node)):
                folded.append(role)
        site.layout.batch_folded = folded


def drop_unsliceable(cg: CapturedGraph, plan: Plan) -> None:
    """Report attention sites that finalize could not rebuild as unclaimed (never gate them)."""

    mark_folded_batch(cg, plan)
    bad = unsliceable_attention(cg, plan)
    if not bad:
        return
    for site in [s for s in plan.attention if s.name in bad]:
        plan.attention.remove(site)
        plan.unclaimed.append(Unclaimed(node=site.core_nodes[0], what=f"attention {site.name}",
                                        reason=f"cannot be sliced: {bad[site.name].split(': ', 1)[-1][:200]}"))
