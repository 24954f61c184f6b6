"""Residual branches: where a site's output joins the stream (so a closed site can leave it), and site names."""

from __future__ import annotations

from typing import Optional

import torch
from torch import fx

from hiap_fx.graph.ir import node_shape
from hiap_fx.graph.queries import ancestors, width_stat_source
from hiap_fx.passes.discover.view import GraphView
from hiap_fx.plan import Residual


def preserves_zero(g: GraphView, node: fx.Node, data: fx.Node) -> bool:
    """Whether ``node`` maps an all-zero ``data`` operand to all zeros (others as recorded)."""
    shape = node_shape(data)
    if shape is None or node.op not in ("call_function", "call_method", "call_module"):
        return False
    if node.op == "call_module" and any(True for _ in g.modules[str(node.target)].parameters()):
        return False
    try:
        out = g.flow.execute(node, {data: torch.zeros(shape, dtype=torch.float64)}, movement=False)
    except Exception:
        return False
    return isinstance(out, torch.Tensor) and out.numel() > 0 and not out.any()


def norm_correction(g: GraphView, term: fx.Node, branch_end: fx.Node) -> bool:
    """Whether ``term`` is a constant times width statistics of a tensor inside the branch
    ending at ``branch_end`` (a sub-norm's ``(mu / sigma) * (W @ g)``; see
    :mod:`hiap_fx.passes.subnorms`), which vanishes with the features it is computed from."""
    if g.name(term) != "mul":
        return False
    sources = {a: width_stat_source(a) for a in term.all_input_nodes}
    stats = [s for s in sources.values() if s is not None]
    rest = [a for a, s in sources.items() if s is None]
    inside = ancestors(branch_end)
    return len(stats) == 1 and not any(g.dependent(a) for a in rest) \
        and any(x in inside for x in stats[0].all_input_nodes)


def stream_of(g: GraphView, other: fx.Node, branch_input: fx.Node, depth: int = 8) -> bool:
    """Whether ``other`` is the stream the branch reads (``branch_input`` or one of its
    ancestors), possibly scaled on the way (``x * gamma + f(x)``, MetaFormer's res-scale):
    followed back through ops with one data input that keep its shape."""
    up = ancestors(branch_input) | {branch_input}
    cur = other
    for _ in range(depth):
        if cur in up:
            return True
        data = g.data_inputs(cur)
        if len(data) != 1 or node_shape(data[0]) != node_shape(cur) or not g.passes_back(cur):
            return False
        cur = data[0]
    return cur in up


def residual_of(g: GraphView, branch_end: fx.Node, branch_input: fx.Node,
              zero_preserving: bool = True) -> Optional[Residual]:
    """The add joining the branch ending at ``branch_end`` into the stream that feeds
    ``branch_input``, reached through single-use ops that keep a zero branch zero (so closing
    the whole site removes it); with ``zero_preserving=False`` through any single-input ops (a
    post-norm branch, ``x + norm(f(x))``, whose units can be cut but not the whole branch)."""
    cur = branch_end
    for _ in range(64):
        users = list(cur.users)
        if len(users) != 1:
            return None
        u = users[0]
        tensors = [a for a in u.all_input_nodes if node_shape(a) is not None]
        if g.name(u) in ("add", "sub") and len(tensors) == 2 and u.args[:1] == (cur,) \
                and norm_correction(g, tensors[1], branch_end):
            cur = u  # a sub-norm's mean term: zero when the branch's heads are all closed
            continue
        if g.name(u) == "add" and len(tensors) == 2 and cur in tensors:
            other = tensors[0] if tensors[1] is cur else tensors[1]
            pos = next(i for i, a in enumerate(u.args) if a is cur)
            if stream_of(g, other, branch_input):
                return Residual(add_node=u.name, branch_arg=pos)
            outer = residual_of(g, u, branch_input, zero_preserving) if branch_input in ancestors(other) else None
            # a parallel branch of the same input (``attn(y) + mlp(y)``, then into the stream):
            # this one leaves the sum; with its sibling gone too, the sum leaves the stream
            return Residual(add_node=u.name, branch_arg=pos, outer=outer) if outer is not None else None
        if g.data_inputs(u) != [cur] or (zero_preserving and not preserves_zero(g, u, cur)):
            return None
        cur = u
    return None


def site_name(paths: list[str], taken: set[str], kind: str) -> str:
    parts = [p.split(".")[:-1] for p in paths if p and not p.startswith("node:")]
    common: list[str] = []
    if parts:
        for segs in zip(*parts):
            if len(set(segs)) != 1:
                break
            common.append(segs[0])
    name = ".".join(common) or kind
    if name in taken:
        i = 1
        while f"{name}[{kind}{i}]" in taken:
            i += 1
        name = f"{name}[{kind}{i}]" if name != kind else f"{kind}{i}"
    taken.add(name)
    return name
