"""Discover: find attention sites and FFN sites by graph pattern and index flow only.

No module classes or names are consulted. An attention site is an attention kernel (an sdpa
call, or matmul -> softmax -> matmul; :mod:`.cores`) whose q, k and v operands come from linear
projections (:mod:`.operands`) and whose output reaches one linear projection (:mod:`.attention`);
the head axis is the kernel's batch axis along which the projection's feature index varies. An
FFN site (:mod:`.ffn`) is a linear whose input is produced, through element-wise ops including a
non-linear activation, by one or two other linears only. :mod:`.residual` finds where a site's
branch joins the residual stream.
"""

from __future__ import annotations

from hiap_fx.graph.ir import CapturedGraph
from hiap_fx.graph.node_macs import graph_macs
from hiap_fx.passes.discover.attention import attention_site
from hiap_fx.passes.discover.cores import find_cores
from hiap_fx.passes.discover.ffn import ffn_site
from hiap_fx.passes.discover.residual import residual_of, site_name
from hiap_fx.passes.discover.view import GraphView, NotCandidate, Reject
from hiap_fx.plan import AttentionSite, FFNSite, Plan, Unclaimed


def discover(cg: CapturedGraph, model_name: str = "model") -> Plan:
    """Find attention and FFN sites in a normalised, propagated graph and return the plan."""
    g = GraphView(cg)
    node_by_name = {n.name: n for n in cg.gm.graph.nodes}
    macs = graph_macs(cg)
    cores, unclaimed = find_cores(g)
    attention: list[AttentionSite] = []
    claimed: set[str] = set()
    taken: set[str] = set()
    for core in cores:
        try:
            site = attention_site(g, core)
        except Reject as exc:
            unclaimed.append(Unclaimed(node=core.nodes[0].name, what=f"attention ({core.kind})",
                                       reason=str(exc)))
            continue
        projs = [site.q, site.k, site.v, site.out] + ([site.out_gate] if site.out_gate else [])
        owned = {p.node for p in projs}
        if owned & claimed:
            unclaimed.append(Unclaimed(node=core.nodes[0].name, what="attention",
                                       reason="shares projections with another attention"))
            continue
        claimed |= owned
        branch_input = node_by_name[site.q.node].args[0]
        site.residual = residual_of(g, node_by_name[site.out.node], branch_input)
        site.macs = sum(macs.get(n, 0) for n in owned | set(site.core_nodes))
        site.name = site_name([p.weight for p in projs[:4]], taken, "attn")
        attention.append(site)
    ffn: list[FFNSite] = []
    notes: list[str] = []
    for node in cg.gm.graph.nodes:
        if g.name(node) != "linear" or node.name in claimed:
            continue
        try:
            found = ffn_site(g, node, claimed)
        except NotCandidate:
            continue
        except Reject as exc:
            unclaimed.append(Unclaimed(node=node.name, what="linear-activation-linear", reason=str(exc)))
            continue
        branch_input = node_by_name[found.inputs[0].node].args[0]
        found.residual = residual_of(g, node, branch_input)
        if found.residual is None:
            if residual_of(g, node, branch_input, zero_preserving=False) is None:
                unclaimed.append(Unclaimed(node=node.name, what="linear-activation-linear",
                                           reason="not on a residual branch (classifier or embedding MLP?)"))
                continue
        owned = {p.node for p in found.inputs} | {found.out.node}
        claimed |= owned
        found.macs = sum(macs.get(n, 0) for n in owned)
        found.name = site_name([p.weight for p in found.inputs] + [found.out.weight], taken, "ffn")
        if found.residual is None:
            notes.append(f"{found.name}: the FFN joins the residual stream through a norm "
                         "(post-norm); its neurons are gated, the whole block is not")
        ffn.append(found)
    unclaimed.extend(_opaque_modules(g))
    return Plan(model=model_name, frontend=cg.frontend,
                example_shapes=[list(t.shape) for t in cg.example_inputs],
                total_macs=sum(macs.values()), attention=attention, ffn=ffn,
                unclaimed=unclaimed, notes=list(cg.notes) + notes, macs_not_spent=cg.macs_not_spent)


def _opaque_modules(g: GraphView) -> list[Unclaimed]:
    out = []
    for node in g.cg.gm.graph.nodes:
        if node.op == "call_module" and g.name(node) == "module":
            mod = g.modules[str(node.target)]
            if any(True for _ in mod.parameters()):
                out.append(Unclaimed(node=node.name, what=f"opaque module {type(mod).__name__}",
                                     reason=f"'{node.target}' was not traced into; anything inside "
                                     "it (e.g. attention) is left as is"))
    return out
