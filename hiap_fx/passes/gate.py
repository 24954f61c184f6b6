"""Gate: insert the per-site gate bundles into the normalised graph.

Per attention site: the kernel output is multiplied by the [head, v-dim] mask (head gate times
value-dim gates), q and k by the shared q/k-dim mask when those gates are on, and the output
projection's result by the branch factor (zero once every head is closed). Per FFN site: the
output projection's input by the neuron mask (after the activation, after the product of a
gated FFN) and its result by the block gate. Granularities that would not be exact on a site
(dims mixed by rotary embedding or a norm, a norm over the hidden units, no residual branch)
are left off there and reported in ``plan.notes``.
"""

from __future__ import annotations

import operator
import re
from typing import Any, Optional

import torch
from torch import fx, nn

from hiap_fx.config import PruneConfig
from hiap_fx.gated.bundles import (
    GATES_ATTR,
    AttentionGates,
    FFNGates,
    SiteGates,
    broadcast_shape,
    folded_mask_mul,
)
from hiap_fx.gated.importance import init_from_importance
from hiap_fx.graph.ir import arg_node, copy_facts, node_dtype, node_rank
from hiap_fx.plan import AttentionSite, FFNSite, Plan


def _rank(node: Any) -> int:
    return node_rank(node)


def _module_key(name: str, taken: set[str]) -> str:
    key = re.sub(r"\W", "_", name) or "site"
    base, i = key, 1
    while key in taken:
        key, i = f"{base}_{i}", i + 1
    taken.add(key)
    return key


def _attention_gates(site: AttentionSite, nodes: dict[str, fx.Node], cfg: PruneConfig,
                     notes: list[str]) -> AttentionGates | None:
    core = nodes[site.core_nodes[0]]
    out_node = nodes[site.core_nodes[-1]]
    lay = site.layout
    v_dims = cfg.head_dims and site.v_dim > 1
    if v_dims and site.v.dims_mixed:
        notes.append(f"{site.name}: " + ("channel attention (each head's dims are its tokens)"
                                         if site.transposed else "value dims are mixed before the kernel")
                     + "; only whole heads are gated")
        v_dims = False
    qk = cfg.qk_dims and site.head_dim > 1
    if qk and (site.q.dims_mixed or site.k.dims_mixed):
        notes.append(f"{site.name}: q/k dims are mixed (rotary embedding or q/k norm); q/k dims "
                     "are not gated")
        qk = False
    heads = cfg.heads and (site.num_heads > 1 or site.residual is not None)
    if not (heads or v_dims or qk):
        if cfg.heads or cfg.head_dims or cfg.qk_dims:
            notes.append(f"{site.name}: not gated (a single head off the residual stream, and no "
                         "dims that can be gated)")
        return None
    out_shape = None
    if heads or v_dims:
        out_shape = broadcast_shape(_rank(out_node), lay.out_head_axis, site.num_heads, lay.out_dim_axis,
                                    site.v_dim)
    q_shape = k_shape = None
    k_rows_per_kv = len(site.k.index) != site.num_heads
    if qk:
        q_shape = broadcast_shape(_rank(core.args[0]), lay.q_head_axis, site.num_heads, -1, site.head_dim)
        k_heads = site.num_kv_heads if k_rows_per_kv else site.num_heads
        k_shape = broadcast_shape(_rank(core.args[1]), lay.k_head_axis, k_heads, lay.k_dim_axis,
                                   site.head_dim)
    return AttentionGates(site.name, site.num_heads, site.kv_of_head, site.head_dim, site.v_dim,
                          head=heads, head_dim_gates=v_dims, qk_dim_gates=qk,
                          branch=site.residual is not None and (heads or v_dims),
                          out_shape=out_shape, q_shape=q_shape, k_shape=k_shape,
                          k_rows_per_kv=k_rows_per_kv, init=cfg.gate_init,
                          align=cfg.unit_alignment(min(site.head_dim, site.v_dim)))


def _ffn_gates(site: FFNSite, cfg: PruneConfig, notes: list[str]) -> FFNGates | None:
    block = cfg.ffn_blocks and site.residual is not None
    neurons = cfg.neurons and site.hidden > 1
    if neurons and site.hidden_norm:
        notes.append(f"{site.name}: a norm runs over the hidden units; only the whole block is gated")
        neurons = False
    if not (block or neurons):
        if cfg.ffn_blocks or cfg.neurons:
            notes.append(f"{site.name}: not gated (no residual branch to remove and no neurons "
                         "that can be gated)")
        return None
    return FFNGates(site.name, site.hidden, block=block, neurons=neurons, init=cfg.gate_init,
                    align=cfg.unit_alignment(site.hidden))


def _low_precision(node: fx.Node) -> Optional[torch.dtype]:
    """The dtype of ``node``'s activations when it is a floating dtype other than float32 (the
    site's masks are cast to it), else ``None``."""
    dtype = node_dtype(node)
    return dtype if dtype is not None and dtype.is_floating_point and dtype != torch.float32 else None


def _copy_meta(src: fx.Node, dst: fx.Node) -> None:
    """A mask multiply keeps its operand's shape and dtype (masks broadcast into it)."""
    copy_facts(src, dst, macs=0)


def _mask_mul(graph: fx.Graph, x: Any, factor: fx.Node, folded: Optional[int]) -> fx.Node:
    """``x * factor``; with heads folded into the batch axis ``folded``, the mask is applied
    per (batch, head) slice (:func:`folded_mask_mul`)."""
    if folded is None:
        return graph.call_function(operator.mul, (x, factor))
    return graph.call_function(folded_mask_mul, (x, factor, folded))


def _multiply_output(graph: fx.Graph, node: fx.Node, factor: fx.Node, folded: Optional[int] = None) -> None:
    with graph.inserting_after(node):
        scaled = _mask_mul(graph, node, factor, folded)
    _copy_meta(node, scaled)
    node.replace_all_uses_with(scaled, delete_user_cb=lambda u: u is not scaled)


def _multiply_arg(graph: fx.Graph, user: fx.Node, pos: int, factor: fx.Node, folded: Optional[int] = None) -> None:
    with graph.inserting_before(user):
        scaled = _mask_mul(graph, user.args[pos], factor, folded)
    _copy_meta(arg_node(user, pos), scaled)
    user.update_arg(pos, scaled)


def gate_nodes(graph: fx.Graph) -> tuple[set[fx.Node], dict[fx.Node, fx.Node]]:
    """What :func:`insert_gates` added to ``graph``: every node it created (bundle calls, their
    mask items, the mask multiplies), and for each mask multiply the node it scales."""
    added: set[fx.Node] = set()
    scaled: dict[fx.Node, fx.Node] = {}
    for node in graph.nodes:
        if node.op == "call_module" and str(node.target).startswith(GATES_ATTR + "."):
            added.add(node)
            for item in node.users:
                added.add(item)
                for mul in item.users:
                    added.add(mul)
                    scaled[mul] = mul.args[0]
    return added, scaled


def insert_gates(gm: fx.GraphModule, plan: Plan, cfg: PruneConfig) -> dict[str, SiteGates]:
    """Add one gate bundle per site to ``gm`` (under ``hiap_gates``) and wire its masks in.

    Logits start at ``cfg.gate_init``, spread by weight magnitude when ``cfg.importance_init``
    is set (:mod:`hiap_fx.gated.importance`). Returns the bundles by site name. Mutates ``gm``
    (which is already the prepared copy).
    """
    graph = gm.graph
    nodes = {n.name: n for n in graph.nodes}
    first = next(n for n in graph.nodes if n.op != "placeholder")
    container = nn.ModuleDict()
    gm.add_module(GATES_ATTR, container)
    bundles: dict[str, SiteGates] = {}
    taken: set[str] = set()

    def masks_of(site_name: str, bundle: SiteGates) -> dict[str, fx.Node]:
        key = _module_key(site_name, taken)
        container[key] = bundle
        with graph.inserting_before(first):
            call = graph.call_module(f"{GATES_ATTR}.{key}")
            keys = bundle.mask_keys()
            return {k: graph.call_function(operator.getitem, (call, k)) for k in keys}

    for site in plan.attention:
        bundle = _attention_gates(site, nodes, cfg, plan.notes)
        if bundle is None:
            continue
        bundle.mask_dtype = _low_precision(nodes[site.core_nodes[-1]])
        bundles[site.name] = bundle
        m = masks_of(site.name, bundle)
        core, out = nodes[site.core_nodes[0]], nodes[site.core_nodes[-1]]
        lay = site.layout

        def fold(role: str, axis: Optional[int]) -> Optional[int]:
            return axis if role in lay.batch_folded else None

        if "q" in m:
            _multiply_arg(graph, core, 0, m["q"], fold("q", lay.q_head_axis))
            _multiply_arg(graph, core, 1, m["k"], fold("k", lay.k_head_axis))
        if "out" in m:  # after the queries' add, when they join the output (residual pooling)
            _multiply_output(graph, nodes[site.out_residual] if site.out_residual else out, m["out"],
                             fold("out", lay.out_head_axis))
        if "branch" in m:
            _multiply_output(graph, nodes[site.out.node], m["branch"])
    for ffn_site in plan.ffn:
        ffn_bundle = _ffn_gates(ffn_site, cfg, plan.notes)
        if ffn_bundle is None:
            continue
        ffn_bundle.mask_dtype = _low_precision(nodes[ffn_site.out.node])
        bundles[ffn_site.name] = ffn_bundle
        m = masks_of(ffn_site.name, ffn_bundle)
        out = nodes[ffn_site.out.node]
        if "hidden" in m:
            _multiply_arg(graph, out, 0, m["hidden"])
        if "branch" in m:
            _multiply_output(graph, out, m["branch"])
    if cfg.importance_init > 0:
        init_from_importance(dict(gm.named_parameters()), plan, bundles, cfg.gate_init, cfg.importance_init)
    graph.lint()
    gm.recompile()
    return bundles


def strip_gates(gm: fx.GraphModule) -> None:
    """The inverse of :func:`insert_gates`: remove the gate bundles, their mask items and every
    mask multiply (a kept unit's mask is 1)."""
    added, scaled = gate_nodes(gm.graph)
    for mul, operand in scaled.items():
        while operand in scaled:  # a mask multiply of a mask multiply
            operand = scaled[operand]
        mul.replace_all_uses_with(operand)
    for node in reversed([n for n in gm.graph.nodes if n in added]):
        gm.graph.erase_node(node)
    if hasattr(gm, GATES_ATTR):
        delattr(gm, GATES_ATTR)
