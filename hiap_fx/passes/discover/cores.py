"""Attention kernels: sdpa calls, registered kernels, and matmul -> softmax -> matmul patterns."""

from __future__ import annotations

from collections import deque

from torch import fx

from hiap_fx.graph.ir import arg_node, node_rank, node_shape
from hiap_fx.graph.ops import in_family
from hiap_fx.graph.queries import descendants, region_between
from hiap_fx.passes.discover.view import Core, GraphView, Reject
from hiap_fx.plan import Unclaimed
from hiap_fx.registry import attention_kernel


def find_cores(g: GraphView) -> tuple[list[Core], list[Unclaimed]]:
    cores: list[Core] = []
    unclaimed: list[Unclaimed] = []
    for node in g.cg.gm.graph.nodes:
        name = g.name(node)
        kernel = attention_kernel(node)
        if kernel is not None:
            if len(node.args) < 3 or not all(isinstance(a, fx.Node) for a in node.args[:3]):
                unclaimed.append(Unclaimed(node=node.name, what=f"attention kernel {kernel.name}",
                                           reason="q, k, v are not its first three positional arguments"))
                continue
            t = kernel.token_axis
            q, k, v = (arg_node(node, i) for i in range(3))
            cores.append(Core("sdpa", [node], q, k, v, node, -1, t, [], token_axis=t, kernel=kernel))
        elif name == "scaled_dot_product_attention":
            args = list(node.args) + [None] * 4
            q = node.kwargs.get("query", args[0])
            k = node.kwargs.get("key", args[1])
            v = node.kwargs.get("value", args[2])
            mask = node.kwargs.get("attn_mask", args[3])
            logits = [mask] if isinstance(mask, fx.Node) else []
            cores.append(Core("sdpa", [node], q, k, v, node, -1, -2, logits))
        elif in_family(name, "softmax"):
            try:
                cores.append(_manual_core(g, node))
            except Reject as exc:
                unclaimed.append(Unclaimed(node=node.name, what="softmax", reason=str(exc)))
    if not cores and not unclaimed:
        unclaimed.extend(_softmax_free_attention(g))
    return cores, unclaimed


def _softmax_free_attention(g: GraphView) -> list[Unclaimed]:
    """Products of two activations in a model without any softmax/sdpa: attention without a
    softmax (ReLU linear attention, additive attention), which hiap_fx names but does not cut."""
    found = []
    for node in g.cg.gm.graph.nodes:
        if not in_family(g.name(node), "matmul_like") or g.name(node) == "linear":
            continue
        operands = [a for a in node.args[:2] if isinstance(a, fx.Node)]
        if len(operands) == 2 and all(g.dependent(a) for a in operands):
            found.append(Unclaimed(
                node=node.name, what="attention without softmax",
                reason=f"{node.name} multiplies two activations with no softmax or sdpa in the "
                       "model (linear / ReLU / additive attention): hiap_fx cuts heads of softmax "
                       "attention only; its FFNs and projections are still gated where found"))
    return found[:8]


def _outside_terms(qk: fx.Node, inputs: list[fx.Node]) -> list[fx.Node]:
    """Logits-side inputs, with those computed from the logits themselves opened up (a
    functionalised ``attn[:, :, 1:] = attn[:, :, 1:] + rel_pos(q)`` scatters a slice of the
    logits plus the terms back): what enters that computation from outside the logits."""
    below = descendants(qk)
    found: list[fx.Node] = []
    for s in inputs:
        if s not in below:
            found.append(s)
            continue
        region = region_between({qk}, s)
        found.extend(a for n in region for a in n.all_input_nodes
                     if a not in region and a is not qk and a not in below)
    return list(dict.fromkeys(found))


def _manual_core(g: GraphView, softmax: fx.Node) -> Core:
    logits_inputs: list[fx.Node] = []
    mixers: list[fx.Node] = []
    cur = softmax.args[0]
    qk = None
    for _ in range(40):
        if not isinstance(cur, fx.Node):
            break
        name = g.name(cur)
        if name == "matmul":
            qk = cur
            break
        if name == "linear":
            mixers.append(cur)
            cur = cur.args[0]
            continue
        if not g.passes_back(cur):
            raise Reject(f"softmax input comes from {name} ({cur.name}), not from q @ k^T")
        data = g.data_inputs(cur)
        if in_family(name, "movement") and cur.args and isinstance(cur.args[0], fx.Node):
            same = [cur.args[0]]
        else:
            same = [a for a in data if node_rank(a) == node_rank(cur)]
        if len(same) > 1:
            same = [a for a in same if _near_matmul(g, a)] or same
        if not same:
            raise Reject(f"cannot follow attention logits back through {cur.name}")
        logits_inputs.extend(a for a in cur.all_input_nodes if a is not same[0])
        cur = same[0]
    if qk is None:
        raise Reject("no q @ k^T matmul found before this softmax")
    logits_inputs = _outside_terms(qk, logits_inputs)
    av = _find_av(g, softmax, mixers, logits_inputs)
    q, kt = arg_node(qk, 0), arg_node(qk, 1)
    v = arg_node(av, 1)
    if node_rank(q) < 2 or node_rank(kt) != node_rank(q) or node_rank(v) < 2:
        raise Reject(f"q/k/v of {qk.name} are not batched matrices")
    return Core("manual", [qk, softmax, av], q, kt, v, av, -2, -1, logits_inputs, mixers)


def _near_matmul(g: GraphView, node: fx.Node, depth: int = 8) -> bool:
    """Whether a matmul is reached going back from ``node`` through a few pass-through ops."""
    cur = node
    for _ in range(depth):
        if g.name(cur) == "matmul":
            return True
        data = g.data_inputs(cur)
        if not data or not g.passes_back(cur):
            return False
        cur = data[0]
    return False


def _find_av(g: GraphView, softmax: fx.Node, mixers: list[fx.Node],
             side_inputs: list[fx.Node]) -> fx.Node:
    found: list[fx.Node] = []
    todo = deque([(softmax, 0)])
    seen = {softmax}
    while todo:
        n, depth = todo.popleft()
        for u in n.users:
            if u in seen or depth > 8:
                continue
            seen.add(u)
            name = g.name(u)
            if name == "matmul" and u.args[0] is n:
                found.append(u)
            elif name == "linear":
                mixers.append(u)
                todo.append((u, depth + 1))
            elif g.passes_back(u) and not in_family(name, "norm"):
                side_inputs.extend(a for a in u.all_input_nodes
                                   if a is not n and node_shape(a) is not None)
                todo.append((u, depth + 1))
    if len(found) != 1:
        raise Reject(f"softmax {softmax.name} feeds {len(found)} probability @ v matmuls, expected 1")
    return found[0]
