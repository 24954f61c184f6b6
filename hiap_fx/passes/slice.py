"""Slice: compile the hard-gated graph into a compact, ordinary graph.

* Gate machinery is removed (a kept unit's mask is 1; closed units are cut out instead).
* FFN sites: input-projection rows, output-projection columns and per-neuron side parameters
  (depthwise convs, norms) of closed neurons are removed, rows kept in their original order so
  chunk/strided layouts still hold; head-sized constants in between are rewritten.
* Attention sites are rebuilt around the kernel. Live heads are ordered by their kept widths and
  grouped; each operand is produced by a linear over exactly the kept rows, reshaped straight to
  the layout the original graph had at its last pure data-movement node (found by index flow),
  and the original ops after that point (scaling, rotary embedding, q/k norms, transposes) are
  replayed on it. Each width group gets its own fused ``scaled_dot_product_attention`` (or
  q@k^T / softmax / p@v, with logits-side tensors selected to the live heads), and the groups'
  outputs are concatenated into one output projection over the kept columns.
* A site whose units are all closed leaves the residual stream: its add becomes the identity.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

from .fuse import fuse_sibling_linears
from ..errors import HiapError
from ..flow import IndexFlow, feature_index, varies_along
from ..ir import CapturedGraph
from ..ops import in_family, op_name
from ..plan import AttentionSite, FFNSite, Plan, Residual
from .capture import remove_assertions
from .gate import GATES_ATTR
from .propagate import propagate


# ----------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------


def _reach(node: fx.Node, step: Callable[[fx.Node], Iterable[fx.Node]]) -> set[fx.Node]:
    """Every node reached from ``node`` by repeating ``step`` (``node`` itself excluded)."""
    seen: set[fx.Node] = set()
    todo = [node]
    while todo:
        for nxt in step(todo.pop()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def _descendants(node: fx.Node) -> set[fx.Node]:
    return _reach(node, lambda n: n.users)


def _ancestors(node: fx.Node) -> set[fx.Node]:
    return _reach(node, lambda n: n.all_input_nodes)


def _data_ancestors(node: fx.Node) -> set[fx.Node]:
    """Ancestors through data arguments (``x.type_as(other)`` reads only the dtype of ``other``)."""

    def inputs(n: fx.Node) -> list[fx.Node]:
        if op_name(n) == "type_as" and isinstance(n.args[0], fx.Node):
            return [n.args[0]]
        return n.all_input_nodes

    return _reach(node, inputs)


def _shape(node: Any) -> Optional[tuple[int, ...]]:
    s = node.meta.get("hiap_shape") if isinstance(node, fx.Node) else None
    return tuple(s) if isinstance(s, tuple) else None


def _map_ints(value: Any, table: dict[int, int]) -> Any:
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return table.get(value, value)
    if isinstance(value, (list, tuple)):
        return type(value)(_map_ints(v, table) for v in value)
    return value


_SIZE_ARGS = {  # op -> positions of size arguments (1: "every argument after the tensor")
    "reshape": "rest", "view": "rest", "expand": "rest", "repeat": "rest", "_unsafe_view": "rest",
    "unflatten": (2,), "split": (1,), "split_with_sizes": (1,), "narrow": (3,),
    "conv1d": (6,), "conv2d": (6,), "conv3d": (6,),
}
_SIZE_KWARGS = {"shape", "size", "sizes", "split_size_or_sections", "split_size", "length", "groups"}


def rewrite_sizes(node: fx.Node, table: dict[int, int]) -> None:
    """Rewrite size arguments (never axis arguments) of ``node`` whose value is in ``table``."""
    where = _SIZE_ARGS.get(op_name(node))
    if where is None or not table:
        return
    args = list(node.args)
    positions = range(1, len(args)) if where == "rest" else [p for p in where if p < len(args)]
    for p in positions:
        args[p] = _map_ints(args[p], table)
    node.args = tuple(args)
    node.kwargs = {k: (_map_ints(v, table) if k in _SIZE_KWARGS else v) for k, v in node.kwargs.items()}


class _Params:
    """Reads parameters of the graph module and registers sliced replacements."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.counter = 0

    def get(self, target: str) -> torch.Tensor:
        mod_path, _, name = target.rpartition(".")
        return getattr(self.gm.get_submodule(mod_path) if mod_path else self.gm, name)

    def replace(self, target: str, value: torch.Tensor) -> None:
        mod_path, _, name = target.rpartition(".")
        mod = self.gm.get_submodule(mod_path) if mod_path else self.gm
        old = getattr(mod, name)
        if isinstance(old, nn.Parameter):
            setattr(mod, name, nn.Parameter(value.detach().clone(), requires_grad=old.requires_grad))
        else:
            mod.register_buffer(name, value.detach().clone())

    def constant(self, graph: fx.Graph, name: str, value: torch.Tensor) -> fx.Node:
        """A buffer on the root (it moves with ``.to(device)``) and a get_attr node for it."""
        self.counter += 1
        attr = f"{name}_{self.counter}"
        while hasattr(self.gm, attr):
            self.counter += 1
            attr = f"{name}_{self.counter}"
        self.gm.register_buffer(attr, value)
        return graph.get_attr(attr)

    def add(self, graph: fx.Graph, like: str, suffix: str, value: torch.Tensor) -> fx.Node:
        """A new parameter next to ``like`` (same module, same kind) and a get_attr node for it."""
        mod_path, _, name = like.rpartition(".")
        mod = self.gm.get_submodule(mod_path) if mod_path else self.gm
        old = getattr(mod, name)
        new_name = f"{name}_{suffix}"
        while hasattr(mod, new_name):
            self.counter += 1
            new_name = f"{name}_{suffix}{self.counter}"
        if isinstance(old, nn.Parameter):
            mod.register_parameter(new_name, nn.Parameter(value.detach().clone(), requires_grad=old.requires_grad))
        else:
            mod.register_buffer(new_name, value.detach().clone())
        return graph.get_attr(f"{mod_path}.{new_name}" if mod_path else new_name)


def strip_gates(gm: fx.GraphModule) -> None:
    """Remove the gate bundles and every mask multiply (kept units had mask 1)."""
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and str(node.target).startswith(GATES_ATTR + "."):
            for item in list(node.users):
                for mul in list(item.users):
                    mul.replace_all_uses_with(mul.args[0])
                    graph.erase_node(mul)
                graph.erase_node(item)
            graph.erase_node(node)
    if hasattr(gm, GATES_ATTR):
        delattr(gm, GATES_ATTR)


def _remove_branch(graph: fx.Graph, nodes: dict[str, fx.Node], residual: Optional[Residual], site: str) -> None:
    if residual is None:
        raise HiapError(f"{site}: every unit is closed but the site is not on a residual branch, "
                        "so it cannot be removed; keep at least one unit open (e.g. raise its logit)")
    add = nodes[residual.add_node]
    other = add.args[1 - residual.branch_arg]
    add.replace_all_uses_with(other)
    graph.erase_node(add)


# ----------------------------------------------------------------------------------------------
# FFN
# ----------------------------------------------------------------------------------------------


def _slice_ffn(ctx: "_Context", site: FFNSite) -> None:
    dec = ctx.decisions
    block = bool(dec.get(f"{site.name}.ffn", torch.ones(1, dtype=torch.bool))[0])
    if not block:
        _remove_branch(ctx.graph, ctx.nodes, site.residual, site.name)
        return
    alive = dec.get(f"{site.name}.neuron", torch.ones(site.hidden, dtype=torch.bool))
    if bool(alive.all()):
        return
    kept = int(alive.sum())
    out = ctx.nodes[site.out.node]
    sources = [ctx.nodes[p.node] for p in site.inputs]
    region = set()
    for s in sources:
        region |= _descendants(s)
    region &= _ancestors(out.args[0]) | {out.args[0]}
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


# ----------------------------------------------------------------------------------------------
# attention
# ----------------------------------------------------------------------------------------------


@dataclass
class _Layout:
    """How to build an operand at its boundary node from a linear's output [lead..., heads*dims]."""

    boundary: fx.Node
    perm: list[int]  # boundary axis i (new axes left out) <- axis perm[i] of [lead..., head, dim]
    has_head_axis: bool
    new_axes: list[int]  # size-1 axes of the boundary that come from no source axis
    merges: list[tuple[int, int]]  # runs of lead axes flattened into one (last run first)
    replay: list[fx.Node]  # original path nodes after the boundary, in graph order
    operand: fx.Node


class _Context:
    def __init__(self, gm: fx.GraphModule, plan: Plan, decisions: dict[str, torch.Tensor],
                 example_inputs: tuple[torch.Tensor, ...]) -> None:
        self.gm, self.graph, self.plan, self.decisions = gm, gm.graph, plan, decisions
        self.cg = CapturedGraph(gm, example_inputs, plan.frontend)
        propagate(self.cg)
        self.flow = IndexFlow(self.cg)
        self.nodes = {n.name: n for n in self.graph.nodes}
        self.params = _Params(gm)


def _layout(ctx: _Context, site: AttentionSite, role: str) -> _Layout:
    """Find the deepest pure-movement node between a projection and the kernel operand that has
    the operand's head/dim structure, so the operand can be rebuilt there from kept rows."""
    proj = getattr(site, role)
    P = ctx.nodes[proj.node]
    core = ctx.nodes[site.core_nodes[0]]
    O = core.args[{"q": 0, "k": 1, "v": 2}[role]] if site.kind == "sdpa" or role != "v" else \
        ctx.nodes[site.core_nodes[-1]].args[1]
    full_path = (_descendants(P) & (_data_ancestors(O) | {O})) | {O}
    # shape queries (x.size(0), x.shape) are not data; those after the boundary are replayed
    path = {n for n in full_path if isinstance(n.meta.get("hiap_shape"), (tuple, list))}
    chain: list[fx.Node] = []
    cur = P
    while True:
        nxt = [u for u in cur.users if u in path]
        if len(nxt) != 1 or not in_family(op_name(nxt[0]), "movement"):
            break
        cur = nxt[0]
        chain.append(cur)
    p_shape = _shape(P)
    table = torch.tensor(proj.index, dtype=torch.float64)
    order = {n: i for i, n in enumerate(ctx.graph.nodes)}
    for B in reversed(chain):
        perm = _boundary_perm(ctx, P, p_shape, B, table)
        if perm is None:
            continue
        after = _descendants(B) & full_path
        before = _ancestors(B)
        if any(n not in after and n is not B and n not in before for n in path):
            continue
        return _Layout(B, perm[0], perm[1], perm[2], perm[3], sorted(after, key=order.__getitem__), O)
    raise HiapError(f"{site.name}: cannot rebuild the {role} operand of {site.core_nodes[0]}: no "
                    f"point between {P.name} and the kernel holds its heads and dims as separate "
                    "axes. Prepare with PruneConfig(heads=False, head_dims=False) to keep this "
                    "attention whole, or report the model")


def _boundary_perm(ctx: _Context, P: fx.Node, p_shape: tuple[int, ...], B: fx.Node,
                   table: torch.Tensor) -> Optional[tuple[list[int], bool, list[int], list[tuple[int, int]]]]:
    b_shape = _shape(B)
    if b_shape is None or p_shape is None:
        return None
    idx = ctx.flow.run({P: feature_index(p_shape, -1)}).index.get(B)
    if not isinstance(idx, torch.Tensor) or tuple(idx.shape) != b_shape:
        return None
    lead_axes = len(p_shape) - 1
    target: dict[int, int] = {}  # lead axis of P (size > 1) -> the axis of B it lands on
    for a in range(lead_axes):
        if p_shape[a] == 1:
            continue
        at = ctx.flow.run({P: feature_index(p_shape, a)}).index.get(B)
        if not isinstance(at, torch.Tensor):
            return None
        varying = [i for i in range(len(b_shape)) if b_shape[i] > 1 and varies_along(at, i)]
        if len(varying) != 1:
            return None
        target[a] = varying[0]
    # consecutive lead axes landing on one axis of B were merged (e.g. windows): flatten them
    merges: list[tuple[int, int]] = []
    for b_axis in set(target.values()):
        group = sorted(a for a, t in target.items() if t == b_axis)
        if group != list(range(group[0], group[-1] + 1)) or \
                math.prod(p_shape[a] for a in group) != b_shape[b_axis]:
            return None
        if len(group) > 1:
            code = torch.zeros(p_shape, dtype=torch.float64)
            for a in group:
                code = code * p_shape[a] + feature_index(p_shape, a)
            at = ctx.flow.run({P: code}).index.get(B)
            if not isinstance(at, torch.Tensor) or not torch.equal(
                    at, feature_index(b_shape, b_axis)):
                return None
            merges.append((group[0], group[-1]))
    merged_index = {}  # original lead axis -> lead axis after the merges
    shift = 0
    for a in range(lead_axes):
        inside = next((m for m in merges if m[0] < a <= m[1]), None)
        if inside is not None:
            shift += 1
        merged_index[a] = a - shift
    lead = lead_axes - shift
    source = {t: merged_index[a] for a, t in target.items()}
    rest = [i for i in range(len(b_shape)) if i not in source]
    heads, dims = table.shape
    options = [(h, d) for h in rest for d in rest if h != d] + [(None, d) for d in rest if heads == 1]
    unplaced = sorted({merged_index[a] for a in range(lead_axes)} - set(source.values()))  # size 1
    for head_axis, dim_axis in options:
        ones = [i for i in rest if i not in (head_axis, dim_axis)]
        if any(b_shape[i] != 1 for i in ones) or len(ones) < len(unplaced):
            continue
        t = idx.movedim(dim_axis, -1)
        if head_axis is None:
            t = t.unsqueeze(-2)
        else:
            t = t.movedim(head_axis if head_axis < dim_axis else head_axis - 1, -2)
        if tuple(t.shape[-2:]) != (heads, dims):
            continue
        flat = t.reshape(-1, heads, dims)
        if not torch.equal(flat, table.expand_as(flat)):
            continue
        # size-1 lead axes take the first size-1 axes of B, in order; the rest are new axes
        placed = dict(source)
        placed.update(zip(ones, unplaced))
        new_axes = [i for i in ones if i not in placed]
        # source axes: [lead..., head, dim] (or [lead..., dim] without a head axis)
        dim_src = lead + 1 if head_axis is not None else lead
        perm = [placed[i] if i in placed else (lead if i == head_axis else dim_src)
                for i in range(len(b_shape)) if i not in new_axes]
        if sorted(perm) != list(range(dim_src + 1)):
            continue
        return perm, head_axis is not None, new_axes, sorted(merges, reverse=True)
    return None


def _linear_rows(ctx: _Context, proj, rows: list[int], x: fx.Node, suffix: str) -> fx.Node:
    w = ctx.params.get(proj.weight)[rows]
    w_node = ctx.params.add(ctx.graph, proj.weight, suffix, w)
    b_node = None
    if proj.bias and not proj.bias.startswith("node:"):
        b_node = ctx.params.add(ctx.graph, proj.bias, suffix, ctx.params.get(proj.bias)[rows])
    return ctx.graph.call_function(F.linear, (x, w_node, b_node))


def _build_operand(ctx: _Context, site: AttentionSite, role: str, lay: _Layout, heads: list[int],
                   dims: dict[int, list[int]], suffix: str) -> fx.Node:
    """The kernel operand for ``heads`` (each with its kept ``dims``), rebuilt from kept rows."""
    proj = getattr(site, role)
    nd = len(dims[heads[0]])
    # k/v of grouped-query attention: one table row per kv head, shared by its query heads
    unit = (lambda h: h) if len(proj.index) == site.num_heads else (lambda h: site.kv_of_head[h])
    rows = [proj.index[unit(h)][j] for h in heads for j in dims[h]]
    P = ctx.nodes[proj.node]
    g = ctx.graph
    unique = list(dict.fromkeys(rows))
    y = _linear_rows(ctx, proj, unique, P.args[0], suffix)
    if len(unique) != len(rows):  # shared kv rows are computed once and repeated (no MACs)
        if not lay.has_head_axis:
            raise HiapError(f"{site.name}: the {role} operand shared by query heads has no head "
                            f"axis at {lay.boundary.name} to repeat it along; prepare with "
                            "PruneConfig(heads=False) for this model, or report it")
        at = {r: i for i, r in enumerate(unique)}
        index = ctx.params.constant(g, "hiap_kv_rows", torch.tensor([at[r] for r in rows]))
        y = g.call_method("index_select", (y, -1, index))
    for first, last in lay.merges:
        y = g.call_method("flatten", (y, first, last))
    t = g.call_method("unflatten", (y, -1, (len(heads), nd))) if lay.has_head_axis else y
    if lay.perm != sorted(lay.perm):
        t = g.call_method("permute", (t, *lay.perm))
    for axis in lay.new_axes:
        t = g.call_method("unsqueeze", (t, axis))
    full_heads, full_dims = len(proj.index), len(proj.index[0])
    ints = {full_heads: len(heads)}
    if nd != full_dims:
        ints[full_dims] = nd
        ints[full_heads * full_dims] = len(heads) * nd
    mapping = {lay.boundary: t}
    # per-head tensors joining the operand after the boundary (e.g. rotary tables with one
    # frequency set per head) are cut to the kept heads, like logits-side biases
    head_axis = site.layout.k_head_axis if role == "k" else site.layout.q_head_axis
    units = [unit(h) for h in heads]
    selected: dict[fx.Node, Any] = {}

    def arg(a: Any) -> Any:
        if a in mapping:
            return mapping[a]
        if isinstance(a, fx.Node) and head_axis is not None and rank is not None:
            if a not in selected:
                selected[a] = _select_heads(ctx, a, head_axis % rank, rank, full_heads, units)
            return selected[a]
        return a

    for n in lay.replay:
        rank = len(_shape(n)) if _shape(n) is not None else None
        new = g.node_copy(n, arg)
        if op_name(new) == "type_as" and isinstance(n.args[1], fx.Node) and n.args[1] not in mapping:
            new.target, new.args = "to", (new.args[0], n.args[1].meta.get("hiap_dtype"))
        rewrite_sizes(new, ints)
        mapping[n] = new
    return mapping[lay.operand]


def _select_heads(ctx: "_Context", value: Any, head_axis: int, rank: int, total: int,
                  heads: list[int]) -> Any:
    """Select ``heads`` on a logits-side tensor that has one slice per head (else pass it on)."""
    if not isinstance(value, fx.Node):
        return value
    s = _shape(value)
    if s is None:
        return value
    axis = (head_axis % rank) - (rank - len(s))
    if axis < 0 or s[axis] != total or total == 1:
        return value
    if heads == list(range(total)):
        return value
    index = ctx.params.constant(ctx.graph, "hiap_heads", torch.tensor(heads, dtype=torch.long))
    return ctx.graph.call_method("index_select", (value, axis, index))


def _rebuild_attention(ctx: _Context, site: AttentionSite) -> None:
    dec, H = ctx.decisions, site.num_heads
    g_on = dec.get(f"{site.name}.head", torch.ones(H, dtype=torch.bool))
    d_on = dec.get(f"{site.name}.head_dim", torch.ones(site.num_kv_heads * site.v_dim, dtype=torch.bool))
    q_on = dec.get(f"{site.name}.qk_dim", torch.ones(site.num_kv_heads * site.head_dim, dtype=torch.bool))
    d_on = d_on.view(site.num_kv_heads, site.v_dim)
    q_on = q_on.view(site.num_kv_heads, site.head_dim)
    if bool(g_on.all()) and bool(d_on.all()) and bool(q_on.all()):
        return
    kv = site.kv_of_head
    live = [h for h in range(H) if g_on[h] and bool(d_on[kv[h]].any())]
    if not live:
        if site.residual is not None:
            _remove_branch(ctx.graph, ctx.nodes, site.residual, site.name)
        else:
            _bias_only(ctx, site)
        return
    # widths are per kv head (query heads of one group share k and v)
    qdims = {h: q_on[kv[h]].nonzero().flatten().tolist() for h in live}
    vdims = {h: d_on[kv[h]].nonzero().flatten().tolist() for h in live}
    live.sort(key=lambda h: (-len(qdims[h]), -len(vdims[h]), h))
    core = ctx.nodes[site.core_nodes[0]]
    av = ctx.nodes[site.core_nodes[-1]]
    out_lin = ctx.nodes[site.out.node]
    lays = {r: _layout(ctx, site, r) for r in ("q", "k", "v")}
    g = ctx.graph
    outs: list[tuple[fx.Node, list[int]]] = []
    out_head = _out_head_axis(site, _shape(av), _shape(out_lin.args[0]))
    qk_runs = _runs(live, lambda h: len(qdims[h]))
    if len(qk_runs) > 1 and any(t.kind.startswith("head_mixing") for t in site.side):
        raise HiapError(f"{site.name}: talking-heads mixing needs every live head at one q/k width, "
                        "but the q/k dim gates left different widths; prepare with "
                        "PruneConfig(qk_dims=False) for this model")
    with g.inserting_before(out_lin):
        for qk_heads in qk_runs:
            sfx = f"h{'_'.join(map(str, qk_heads))}" if len(live) < 8 else f"g{len(outs)}"
            q = _build_operand(ctx, site, "q", lays["q"], qk_heads, qdims, "q" + sfx)
            k = _build_operand(ctx, site, "k", lays["k"], qk_heads, qdims, "k" + sfx)
            if site.kind == "manual":
                probs = _manual_logits(ctx, site, core, av, q, k, qk_heads)
            for v_heads in _runs(qk_heads, lambda h: len(vdims[h])):
                v = _build_operand(ctx, site, "v", lays["v"], v_heads, vdims, f"v{len(outs)}")
                off, n = qk_heads.index(v_heads[0]), len(v_heads)
                if site.kind == "sdpa":
                    qs = _narrow(g, q, site.layout.q_head_axis, off, n, len(qk_heads))
                    ks = _narrow(g, k, site.layout.k_head_axis, off, n, len(qk_heads))
                    out = _sdpa(ctx, core, qs, ks, v, v_heads, site.layout.q_head_axis)
                else:
                    p = _narrow(g, probs, site.layout.q_head_axis, off, n, len(qk_heads))
                    out = g.node_copy(av, lambda a: {av.args[0]: p, av.args[1]: v}.get(a, a))
                outs.append((_to_projection_input(out, out_head, len(_shape(av)), g), v_heads))
        x = outs[0][0] if len(outs) == 1 else g.call_function(torch.cat, ([o for o, _ in outs], -1))
        cols = [site.out.index[h][j] for _, heads in outs for h in heads for j in vdims[h]]
        w = ctx.params.get(site.out.weight)[:, cols]
        ctx.params.replace(site.out.weight, w)
        new = g.call_function(F.linear, (x, out_lin.args[1], out_lin.args[2] if len(out_lin.args) > 2 else None))
    out_lin.replace_all_uses_with(new)


def _to_projection_input(out: fx.Node, out_head: Optional[int], rank: int, g: fx.Graph) -> fx.Node:
    """Merge one group's heads and dims into the last axis (the projection's input layout)."""
    if out_head is not None:
        out = g.call_method("movedim", (out, out_head % rank, -2))
        out = g.call_method("flatten", (out, -2))
    return out


def _same_lead(kernel_out: tuple[int, ...], out_head: Optional[int], proj_in: tuple[int, ...]) -> bool:
    rank = len(kernel_out)
    kept = [a for a in range(rank - 1) if out_head is None or a != out_head % rank]
    return tuple(kernel_out[a] for a in kept) == tuple(proj_in[:-1])


def _bias_only(ctx: _Context, site: AttentionSite) -> None:
    """A closed attention off the residual stream still adds its output bias: keep just that."""
    out_lin = ctx.nodes[site.out.node]
    x = ctx.nodes[site.q.node].args[0]
    if _shape(x) is None or _shape(x)[:-1] != _shape(out_lin.args[0])[:-1]:
        raise HiapError(f"{site.name}: every head is closed and the attention is not on a residual "
                        "branch, so its output bias would remain, but its input and output "
                        "layouts differ; keep at least one head open")
    ctx.params.replace(site.out.weight, ctx.params.get(site.out.weight)[:, :0])
    with ctx.graph.inserting_before(out_lin):
        empty = ctx.graph.call_method("narrow", (x, -1, 0, 0))
        new = ctx.graph.call_function(F.linear, (empty, *out_lin.args[1:]))
    out_lin.replace_all_uses_with(new)


def _out_head_axis(site: AttentionSite, kernel_out: tuple[int, ...], proj_in: tuple[int, ...]) -> Optional[int]:
    """Head axis of the kernel output; with one head discovery sees no varying axis, so take the
    size-1 axis that the output projection's input does not have."""
    if site.layout.out_head_axis is not None or len(kernel_out) == len(proj_in):
        return site.layout.out_head_axis
    ones = [a - len(kernel_out) for a in range(1, len(kernel_out) - 1) if kernel_out[a] == 1]
    if not ones:
        raise HiapError(f"{site.name}: cannot tell how the kernel output {kernel_out} becomes the "
                        f"output projection input {proj_in}; please report the model")
    return -3 if -3 in ones else ones[-1]


def _runs(items: list[int], key) -> list[list[int]]:
    runs: list[list[int]] = []
    for h in items:
        if runs and key(runs[-1][0]) == key(h):
            runs[-1].append(h)
        else:
            runs.append([h])
    return runs


def _narrow(g: fx.Graph, t: fx.Node, head_axis: Optional[int], off: int, n: int, total: int) -> fx.Node:
    if head_axis is None or (off == 0 and n == total):
        return t
    return g.call_method("narrow", (t, head_axis, off, n))


def _sdpa(ctx: _Context, core: fx.Node, q: fx.Node, k: fx.Node, v: fx.Node, heads: list[int],
          head_axis: Optional[int]) -> fx.Node:
    rank = len(_shape(core.args[0]))
    mapping: dict[Any, Any] = {core.args[0]: q, core.args[1]: k, core.args[2]: v}
    mask = core.args[3] if len(core.args) > 3 else core.kwargs.get("attn_mask")
    if isinstance(mask, fx.Node) and head_axis is not None:
        total = _shape(core.args[0])[head_axis]
        mapping[mask] = _select_heads(ctx, mask, head_axis % rank, rank, total, heads)
    return ctx.graph.node_copy(core, lambda a: mapping.get(a, a))


def _manual_logits(ctx: _Context, site: AttentionSite, qk: fx.Node, av: fx.Node, q: fx.Node,
                   k: fx.Node, heads: list[int]) -> fx.Node:
    """q @ k^T and the ops up to the probabilities, replayed for ``heads``."""
    g = ctx.graph
    probs = av.args[0]
    region = (_descendants(qk) & (_ancestors(probs) | {probs})) | {probs}
    order = {n: i for i, n in enumerate(g.nodes)}
    rank = len(_shape(qk))
    H = site.num_heads
    head_axis = site.layout.q_head_axis % rank if site.layout.q_head_axis is not None else None
    mapping: dict[Any, Any] = {qk: g.node_copy(qk, lambda a: {qk.args[0]: q, qk.args[1]: k}.get(a, a))}
    mixer_axes: dict[str, list[int]] = {}
    for t in site.side:
        if t.kind.startswith("head_mixing"):
            mixer_axes.setdefault(t.param, []).append(t.axis)
    selected: dict[str, fx.Node] = {}
    head_axes = _head_axes(ctx, qk, head_axis, H, region)
    for n in sorted(region, key=order.__getitem__):
        if n is qk:
            continue

        def arg(a: Any) -> Any:
            if a in mapping:
                return mapping[a]
            if isinstance(a, fx.Node) and a.op == "get_attr" and str(a.target) in mixer_axes:
                target = str(a.target)
                if target not in selected:
                    value = ctx.params.get(target)
                    for axis in mixer_axes[target]:
                        value = value.index_select(axis, torch.tensor(heads))
                    selected[target] = ctx.params.add(g, target, "heads", value)
                return selected[target]
            if isinstance(a, fx.Node) and head_axis is not None and a not in region:
                return _select_heads(ctx, a, head_axis, rank, H, heads)
            return a

        new = g.node_copy(n, arg)
        if n in head_axes and op_name(n) in ("reshape", "view", "_unsafe_view", "expand"):
            _rewrite_axis_size(new, head_axes[n], H, len(heads))
        else:
            rewrite_sizes(new, {H: len(heads)})
        mapping[n] = new
    return mapping[probs]


def _head_axes(ctx: "_Context", qk: fx.Node, head_axis: Optional[int], heads: int,
               region: set[fx.Node]) -> dict[fx.Node, int]:
    """For nodes of the logits region: the output axis that holds the heads (by index flow), so a
    reshape like ``(-1, windows, heads, N, N)`` has only its heads entry rewritten even when
    ``windows == heads``."""
    shape = _shape(qk)
    if head_axis is None or shape is None:
        return {}
    flow = ctx.flow.run({qk: feature_index(shape, head_axis)})
    found: dict[fx.Node, int] = {}
    for n in region:
        at, s = flow.index.get(n), _shape(n)
        if not isinstance(at, torch.Tensor) or s is None or tuple(at.shape) != s:
            continue
        axes = [a for a in range(len(s)) if s[a] == heads and varies_along(at, a)]
        if len(axes) == 1:
            found[n] = axes[0]
    return found


def _rewrite_axis_size(node: fx.Node, axis: int, old: int, new: int) -> None:
    """Set the size argument of output ``axis`` of a reshape/view/expand node from old to new."""
    args = list(node.args)
    if len(args) == 2 and isinstance(args[1], (list, tuple)):
        sizes = list(args[1])
        if sizes[axis] == old:
            sizes[axis] = new
        args[1] = type(args[1])(sizes)
    elif 1 + axis < len(args) and args[1 + axis] == old:
        args[1 + axis] = new
    elif "shape" in node.kwargs or "size" in node.kwargs:
        key = "shape" if "shape" in node.kwargs else "size"
        sizes = list(node.kwargs[key])
        if sizes[axis] == old:
            sizes[axis] = new
        node.kwargs = {**node.kwargs, key: tuple(sizes)}
    node.args = tuple(args)


# ----------------------------------------------------------------------------------------------
# entry point
# ----------------------------------------------------------------------------------------------


def _mutates(node: fx.Node) -> bool:
    target = node.target
    if node.op == "call_method":
        return str(target).endswith("_") and not str(target).startswith("_")
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.is_mutable
    name = getattr(target, "__name__", "")
    return name.endswith("_") and not name.startswith("_")


def eliminate_dead_code(gm: fx.GraphModule) -> None:
    """Remove unused nodes; unlike fx's own DCE this also drops ops fx calls impure only because
    they may draw random numbers (sdpa with dropout, dropout), but keeps in-place ops."""
    changed = True
    while changed:
        changed = False
        for node in reversed(list(gm.graph.nodes)):
            if node.op in ("placeholder", "output") or node.users or _mutates(node) or _guards(node):
                continue
            gm.graph.erase_node(node)
            changed = True


def _guards(node: fx.Node) -> bool:
    """A call made for its check alone (registered with ``torch.fx.node.has_side_effect``, e.g. the
    fixed-argument guard); runtime asserts of the tracer are removed separately."""
    from torch.fx.node import _side_effectful_functions

    return node.op == "call_function" and node.target in _side_effectful_functions \
        and not _is_tracer_assert(node)


def _is_tracer_assert(node: fx.Node) -> bool:
    name = getattr(node.target, "__name__", "") or ""
    return "assert" in name or "sym_constrain" in name


def _check_private_projections(nodes: dict[str, fx.Node], site: AttentionSite) -> None:
    """Finalize rebuilds q/k/v from the kept rows of their projections and lets the original
    linears die; a projection whose output also feeds something else (a parallel block fusing
    the MLP's input into the same linear) would stay whole next to the rebuilt rows."""
    core = [nodes[n] for n in site.core_nodes]
    operands = [a for c in core for a in c.all_input_nodes]
    feeding: set[fx.Node] = set()
    for o in operands:
        feeding |= _data_ancestors(o) | {o}
    for role in ("q", "k", "v"):
        P = nodes[getattr(site, role).node]
        for n in _descendants(P) & feeding:
            for u in n.users:
                if u in feeding or u in core or not isinstance(u.meta.get("hiap_shape"), (tuple, list)):
                    continue
                raise HiapError(f"{site.name}: the {role} projection {P.name} also feeds {u.name} "
                                f"({op_name(u)}), outside this attention (e.g. an MLP fused into the "
                                "same linear); its rows cannot be cut for the attention alone")


def unsliceable_attention(cg: CapturedGraph, plan: Plan) -> dict[str, str]:
    """Attention sites finalize could not rebuild (site name -> reason), found before any gate
    is inserted so that they are reported at prepare time instead of failing after training."""

    class _Check:
        gm, graph, flow = cg.gm, cg.gm.graph, IndexFlow(cg)
        nodes = {n.name: n for n in cg.gm.graph.nodes}

    bad: dict[str, str] = {}
    for site in plan.attention:
        try:
            _check_private_projections(_Check.nodes, site)
            for role in ("q", "k", "v"):
                _layout(_Check, site, role)  # type: ignore[arg-type]
            out_lin = _Check.nodes[site.out.node]
            av = _Check.nodes[site.core_nodes[-1]]
            head = _out_head_axis(site, _shape(av), _shape(out_lin.args[0]))
            if not _same_lead(_shape(av), head, _shape(out_lin.args[0])):
                raise HiapError(f"{site.name}: the kernel output {_shape(av)} is rearranged (e.g. "
                                f"windows reversed) before {out_lin.name} {_shape(out_lin.args[0])}")
        except HiapError as exc:
            bad[site.name] = str(exc)
    return bad


def compile_compact(gm_gated: fx.GraphModule, plan: Plan, decisions: dict[str, torch.Tensor],
                    example_inputs: tuple[torch.Tensor, ...]) -> fx.GraphModule:
    """The compact graph module for the given hard decisions (``gate key -> bool per unit``)."""
    gm = copy.deepcopy(gm_gated)
    strip_gates(gm)
    gm.recompile()
    ctx = _Context(gm, plan, decisions, example_inputs)
    for site in plan.ffn:
        _slice_ffn(ctx, site)
    for site in plan.attention:
        _rebuild_attention(ctx, site)
    ctx.graph.lint()
    remove_assertions(gm)
    eliminate_dead_code(gm)
    fuse_sibling_linears(gm)
    # a fresh module tree holding only what the graph uses: parameters in plain containers (no
    # stale Linear/attention attributes such as in_features or num_heads), leaf modules as is
    compact = fx.GraphModule(gm, gm.graph, class_name="CompactModel")
    compact.recompile()
    return compact

