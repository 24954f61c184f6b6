"""The attention kernel of the live heads: sdpa or q@k^T / softmax / p@v, with logits-side tensors cut to them."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import fx

from hiap_fx.errors import HiapError
from hiap_fx.graph.editing import rewrite_axis_size, rewrite_sizes
from hiap_fx.graph.flow import axes_of_size, axis_of_size, feature_index
from hiap_fx.graph.ir import arg_node, is_tensor_node, node_shape, tensor_shape
from hiap_fx.graph.ops import einsum_letters, op_name
from hiap_fx.graph.queries import ancestors, descendants, region_between, scaling_chain
from hiap_fx.passes.slice.context import SliceContext
from hiap_fx.passes.slice.operands import select_heads
from hiap_fx.plan import AttentionSite


def operand_terms(ctx: SliceContext, site: AttentionSite, q: fx.Node, k: fx.Node,
                  heads: list[int], rebuilt: dict[fx.Node, fx.Node]) -> dict[fx.Node, fx.Node]:
    """The site's logits-side terms computed from q or k (relative positions), computed again
    from the rebuilt operands ``q`` and ``k`` (``heads`` live; ``rebuilt``: the copies of this
    site's operand paths): original term -> new term."""
    if not site.logits_terms:
        return {}
    g = ctx.graph
    core = ctx.nodes[site.core_nodes[0]]
    old_q, old_k = arg_node(core, 0), arg_node(core, 1)
    # the term may read q where the rebuilt operand path has a copy of it (before a scaling)
    mapping: dict[Any, Any] = {**rebuilt, old_q: q, old_k: k}
    order = {n: i for i, n in enumerate(g.nodes)}
    H = site.num_heads
    rank = len(tensor_shape(old_q))
    head_axis = site.layout.q_head_axis % rank if site.layout.q_head_axis is not None else None
    for name in site.logits_terms:
        term = ctx.nodes[name]
        region = region_between(mapping, term) - set(mapping)
        head_axes = logits_head_axes(ctx, old_q, head_axis, H, region)
        for n in sorted(region, key=order.__getitem__):
            unmapped = [a for a in n.all_input_nodes if a not in mapping and a.name in ctx.cg.input_dependent
                        and is_tensor_node(a)]
            if unmapped:
                raise HiapError(f"{site.name}: the logits term {name} reads {unmapped[0].name}, "
                                "which finalize does not rebuild; prepare with "
                                "PruneConfig(heads=False, head_dims=False) to keep this attention whole")
            new = g.node_copy(n, lambda a: mapping.get(a, a))
            if n in head_axes and op_name(n) in ("reshape", "view", "_unsafe_view", "expand"):
                rewrite_axis_size(new, head_axes[n], H, len(heads))
            mapping[n] = new
    return {ctx.nodes[name]: mapping[ctx.nodes[name]] for name in site.logits_terms}


def kernel_call(ctx: SliceContext, core: fx.Node, q: fx.Node, k: fx.Node, v: fx.Node, heads: list[int],
                head_axis: Optional[int], terms: dict[fx.Node, fx.Node]) -> fx.Node:
    """The fused kernel call ``core`` over new operands, its mask (if any) cut to ``heads``
    (or computed again from the new operands: ``terms``, :func:`operand_terms`)."""
    rank = len(tensor_shape(core.args[0]))
    mapping: dict[Any, Any] = {core.args[0]: q, core.args[1]: k, core.args[2]: v, **terms}
    mask = core.args[3] if len(core.args) > 3 else core.kwargs.get("attn_mask")
    if isinstance(mask, fx.Node) and mask not in terms and head_axis is not None:
        total = tensor_shape(core.args[0])[head_axis]
        mapping[mask] = select_heads(ctx, mask, head_axis % rank, rank, total, heads)
    return ctx.graph.node_copy(core, lambda a: mapping.get(a, a))


def manual_logits(ctx: SliceContext, site: AttentionSite, qk: fx.Node, av: fx.Node, q: fx.Node,
                   k: fx.Node, heads: list[int], terms: dict[fx.Node, fx.Node]) -> fx.Node:
    """q @ k^T and the ops up to the probabilities, replayed for ``heads`` (terms computed from
    q/k taken from ``terms``, :func:`operand_terms`)."""
    g = ctx.graph
    probs = arg_node(av, 0)
    region = (descendants(qk) & (ancestors(probs) | {probs})) | {probs}
    order = {n: i for i, n in enumerate(g.nodes)}
    rank = len(tensor_shape(qk))
    H = site.num_heads
    head_axis = site.layout.q_head_axis % rank if site.layout.q_head_axis is not None else None
    mapping: dict[Any, Any] = {qk: g.node_copy(qk, lambda a: {qk.args[0]: q, qk.args[1]: k}.get(a, a))}
    mixer_axes: dict[str, list[int]] = {}
    for t in site.side:
        if t.kind.startswith("head_mixing"):
            mixer_axes.setdefault(t.param, []).append(t.axis)
    selected: dict[str, fx.Node] = {}
    head_axes = logits_head_axes(ctx, qk, head_axis, H, region)
    for n in sorted(region, key=order.__getitem__):
        if n is qk:
            continue

        def arg(a: Any) -> Any:
            if a in mapping:
                return mapping[a]
            if a in terms:
                return terms[a]
            if isinstance(a, fx.Node) and a.op == "get_attr" and str(a.target) in mixer_axes:
                target = str(a.target)
                if target not in selected:
                    value = ctx.params.get(target)
                    for axis in mixer_axes[target]:
                        value = value.index_select(axis, torch.tensor(heads))
                    selected[target] = ctx.params.add(g, target, "heads", value)
                return selected[target]
            if isinstance(a, fx.Node) and head_axis is not None and a not in region:
                return select_heads(ctx, a, head_axis, rank, H, heads)
            return a

        new = g.node_copy(n, arg)
        if n in head_axes and op_name(n) in ("reshape", "view", "_unsafe_view", "expand"):
            rewrite_axis_size(new, head_axes[n], H, len(heads))
        else:
            rewrite_sizes(new, {H: len(heads)})
        mapping[n] = new
    return mapping[probs]


def logits_head_axes(ctx: "SliceContext", qk: fx.Node, head_axis: Optional[int], heads: int,
               region: set[fx.Node]) -> dict[fx.Node, int]:
    """For nodes of the logits region: the output axis that holds the heads (by index flow), so a
    reshape like ``(-1, windows, heads, N, N)`` has only its heads entry rewritten even when
    ``windows == heads``."""
    shape = node_shape(qk)
    if head_axis is None or shape is None:
        return {}
    # the queries before their scaling too (a relative-position term may read those)
    chain = scaling_chain(qk, lambda n: n.name in ctx.cg.input_dependent)
    sources = {n: feature_index(shape, head_axis) for n in chain if node_shape(n) == shape}
    found: dict[fx.Node, int] = {}
    for _ in range(len(region) + 1):  # the flow stops at products: go on past those that carry heads
        flow = ctx.flow.run(sources)
        found.update(axes_of_size(flow, region, heads))
        carried = {}
        for n in region:
            if n in sources or op_name(n) not in ("einsum", "matmul"):
                continue
            for pos, operand in enumerate(product_operands(n)):
                at = flow.index.get(operand) if isinstance(operand, fx.Node) else None
                if isinstance(at, torch.Tensor) and (axis := product_head_axis(n, pos, at, heads)) is not None:
                    carried[n] = axis
        if not carried:
            return found
        for n, axis in carried.items():
            found[n] = axis
            sources[n] = feature_index(tensor_shape(n), axis)
    return found


def product_operands(node: fx.Node) -> list[Any]:
    """The operands of an einsum (``einsum(eq, a, b)`` or aten's ``einsum(eq, [a, b])``) or matmul."""
    if op_name(node) == "einsum":
        rest = list(node.args[1:])
        return list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
    return list(node.args[:2])


def product_head_axis(node: fx.Node, pos: int, at: torch.Tensor, heads: int) -> Optional[int]:
    """The output axis of a product (einsum, matmul) that carries the head axis of its operand
    number ``pos`` (index values ``at``) as a batch axis, if there is one."""
    axis = axis_of_size(at, heads)
    out = node_shape(node)
    if axis is None or out is None:
        return None
    name = op_name(node)
    if name == "einsum" and isinstance(node.args[0], str):
        operands = product_operands(node)
        ranks = [len(tensor_shape(o)) for o in operands if isinstance(o, fx.Node)]
        parsed = einsum_letters(node.args[0], ranks) if len(ranks) == len(operands) else None
        if parsed is None or not 0 <= pos < len(operands):
            return None
        letter = parsed[0][pos][axis]  # kept in the output: not summed over
        return parsed[1].index(letter) if letter in parsed[1] else None
    if name == "matmul" and axis < at.dim() - 2:  # a batch axis, aligned from the right
        return axis + len(out) - at.dim()
    return None
