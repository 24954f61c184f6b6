"""Fuse sibling linears: several ``F.linear`` calls on the same input become one linear over the
concatenated weights and a split. Slicing rebuilds attention operands as one linear each (and
HF-style models have separate q/k/v projections to begin with); at small batch the per-op
overhead dominates, so one wide matmul is faster than three narrow ones. MACs are unchanged."""

from __future__ import annotations

import operator
from collections import defaultdict
from typing import Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

from hiap_fx.graph.editing import Params

LINEAR_TARGETS = (torch._C._nn.linear, F.linear)


def _arg(node: fx.Node, pos: int, name: str) -> Optional[object]:
    if len(node.args) > pos:
        return node.args[pos]
    return node.kwargs.get(name)


def _register(gm: fx.GraphModule, like: str, value: torch.Tensor, requires_grad: bool) -> str:
    """Register ``value`` as a parameter in the module of ``like``, named after its base name
    (``weight_qh0_1`` -> ``weight``) when that name is free or no longer used by the graph."""
    mod_path, _, name = like.rpartition(".")
    mod = gm.get_submodule(mod_path) if mod_path else gm
    base = name.split("_")[0] or name
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    candidate, k = base, 0
    while hasattr(mod, candidate):
        full = f"{mod_path}.{candidate}" if mod_path else candidate
        if full not in used:
            delattr(mod, candidate)
            break
        k += 1
        candidate = f"{base}_fused{k}"
    mod.register_parameter(candidate, nn.Parameter(value, requires_grad=requires_grad))
    return f"{mod_path}.{candidate}" if mod_path else candidate


def fuse_sibling_linears(gm: fx.GraphModule) -> int:
    """Fuse every group of >= 2 linears that read the same tensor and whose weights (and biases,
    all present or all absent) are parameters used nowhere else; returns the number of groups."""

    param = Params(gm).get
    graph = gm.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    fused = 0
    for node in list(graph.nodes):
        groups: dict[tuple, list[tuple[fx.Node, fx.Node, Optional[fx.Node]]]] = defaultdict(list)
        for user in node.users:
            if user.op != "call_function" or user.target not in LINEAR_TARGETS or not user.args \
                    or user.args[0] is not node:
                continue
            w, b = _arg(user, 1, "weight"), _arg(user, 2, "bias")
            if not (isinstance(w, fx.Node) and w.op == "get_attr" and len(w.users) == 1):
                continue
            if b is not None and not (isinstance(b, fx.Node) and b.op == "get_attr" and len(b.users) == 1):
                continue
            wt = param(str(w.target))
            if not isinstance(wt, nn.Parameter) or wt.ndim != 2:
                continue
            key = (b is not None, wt.shape[1], wt.dtype, wt.device, wt.requires_grad)
            groups[key].append((user, w, b))
        for (has_bias, _, _, _, requires_grad), members in groups.items():
            if len(members) < 2:
                continue
            members.sort(key=lambda m: order[m[0]])
            weights = [param(str(w.target)).detach() for _, w, _ in members]
            first = members[0][0]
            with graph.inserting_before(first):
                w_node = graph.get_attr(_register(gm, str(members[0][1].target), torch.cat(weights), requires_grad))
                b_node = None
                if has_bias:
                    biases = [param(str(b.target)).detach() for _, _, b in members]  # type: ignore[union-attr]  # members with a bias
                    b_node = graph.get_attr(_register(gm, str(members[0][2].target), torch.cat(biases),  # type: ignore[union-attr]  # members with a bias
                                                      requires_grad))
                lin = graph.call_function(torch._C._nn.linear, (node, w_node, b_node))
                parts = graph.call_function(torch.split, (lin, [int(w.shape[0]) for w in weights]), {"dim": -1})
                for i, (user, _, _) in enumerate(members):
                    item = graph.call_function(operator.getitem, (parts, i))
                    user.replace_all_uses_with(item)
            for user, w, b in members:
                graph.erase_node(user)
                graph.erase_node(w)
                if b is not None:
                    graph.erase_node(b)
            fused += 1
    if fused:
        graph.lint()
        gm.recompile()
    return fused
