"""Shared weights: a projection weight a site would cut must not be read anywhere else."""

from __future__ import annotations

import builtins

import torch
from torch import fx

from hiap_fx.errors import DiscoveryError
from hiap_fx.graph.ir import CapturedGraph
from hiap_fx.plan import Plan


def reads_values(user: fx.Node, tensor_node: fx.Node) -> bool:
    """Whether ``user`` reads the values of ``tensor_node`` (not only its shape or dtype)."""
    if user.op == "call_function" and user.target is builtins.getattr:
        return False
    if user.op == "call_method" and (user.target in ("size", "dim", "numel") or
                                     user.target == "type_as" and user.args[0] is not tensor_node):
        return False
    return True


def refuse_shared_weights(cg: CapturedGraph, plan: Plan) -> None:
    """Raise ``DiscoveryError`` when a projection weight a site would cut is also used elsewhere
    (one linear shared by two FFNs, one attention module called twice, tied weights): slicing it
    for one use would break the other, and gating each use apart would not be one decision."""
    uses: dict[int, set[str]] = {}  # tensor -> nodes that read it through any get_attr
    names: dict[int, str] = {}
    for node in cg.gm.graph.nodes:
        if node.op != "get_attr":
            continue
        tensor: torch.Tensor
        try:
            tensor = cg.gm.get_parameter(str(node.target))
        except (AttributeError, KeyError):
            try:
                tensor = cg.gm.get_buffer(str(node.target))
            except (AttributeError, KeyError):
                continue
        if isinstance(tensor, torch.Tensor):
            uses.setdefault(id(tensor), set()).update(u.name for u in node.users if reads_values(u, node))
            names.setdefault(id(tensor), str(node.target))
    owners: dict[int, list[str]] = {}
    problems: list[str] = []
    sites = [(s.name, [s.q, s.k, s.v, s.out] + ([s.out_gate] if s.out_gate else [])) for s in plan.attention] + \
            [(f.name, [*f.inputs, f.out]) for f in plan.ffn]
    for site, projections in sites:
        for proj in projections:
            for target in (proj.weight, proj.bias):
                if target is None:
                    continue
                try:
                    tensor = cg.gm.get_parameter(target)
                except (AttributeError, KeyError):
                    continue
                readers = uses.get(id(tensor), set())
                others = readers - {p.node for p in projections}
                if others:
                    problems.append(f"{site}: {target} is also read by node(s) {sorted(others)[:3]}")
                owners.setdefault(id(tensor), [])
                if site not in owners[id(tensor)]:
                    owners[id(tensor)].append(site)
    for key, sites_of in owners.items():
        if len(sites_of) > 1:
            problems.append(f"{names.get(key, '?')} belongs to sites {', '.join(sites_of)}")
    if problems:
        raise DiscoveryError(
            "shared weights: " + "; ".join(sorted(set(problems))[:4]) + ". hiap_fx cuts rows and "
            "columns of these weights for one site, which would change every other use. Give "
            "each use its own copy (e.g. copy.deepcopy of the module for each call) before "
            "prepare, or keep the shared module out of the model you prune")
