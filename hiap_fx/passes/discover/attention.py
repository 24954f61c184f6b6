"""An attention site from a kernel: projections, output projection, per-head side tensors, GQA groups."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import fx

from hiap_fx.graph.flow import FlowResult, feature_index
from hiap_fx.graph.ir import is_tensor_node, node_rank, node_shape, tensor_shape
from hiap_fx.graph.ops import in_family
from hiap_fx.graph.queries import ancestors, region_between, scaling_chain, width_stat_source
from hiap_fx.passes.discover.operands import TokenDependent, operand_projection, path_events, source_linears
from hiap_fx.passes.discover.view import Core, GraphView, Reject
from hiap_fx.plan import AttentionSite, CoreLayout, Projection, SideTensor


@dataclass
class OutputPath:
    """What discovery found between the kernel output and the output projection."""

    out: Projection
    residual: Optional[fx.Node]  # the add of the queries (MViTv2)
    passthrough: list[fx.Node]  # activations concatenated with the output (SHViT)
    gate: Optional[Projection]  # rows multiplying the output feature by feature (IFormer)
    gate_mul: Optional[fx.Node]


def out_projection(g: GraphView, core: Core, head_axis: int, heads: int, v_dim: int,
                   dim_axis: int = -1) -> OutputPath:
    """The output projection of the kernel output, the add of the queries to the output on
    the way (MViTv2's residual pooling), if there is one, and the activations concatenated with
    the output as further features of the projection (SHViT's attention over part of the
    channels: ``proj(cat([attn(x1), x2]))``), which pass through unchanged, and a gate that
    multiplies the output feature by feature (IFormer: ``proj(attn_out * sigmoid(g))``)."""
    out_shape = node_shape(core.out)
    if out_shape is None:
        raise Reject(f"no shape recorded for {core.out.name}")
    h_axis = head_axis if head_axis >= 0 else None
    code = feature_index(out_shape, dim_axis)
    if h_axis is not None:
        code = code + feature_index(out_shape, h_axis) * v_dim
    flow = g.flow.run({core.out: code}, data_binary=("add", "mul"))
    lins = [(n, pos, t) for n, pos, t in flow.reached if g.name(n) == "linear" and pos == 0]
    stats = [(n, t) for n, pos, t in flow.reached if in_family(g.name(n), "width_stat")]
    others = [n for n, pos, t in flow.reached if (n, pos) not in {(l, p) for l, p, _ in lins}
              and not in_family(g.name(n), "width_stat")]
    if len(lins) != 1 or others or not all(torch.equal(t, lins[0][2]) and n.args[1] == t.shape[-1]
                                           for n, t in stats):
        raise Reject(not_one_projection(g, core, flow))
    lin, _, at = lins[0]
    residual = query_residual(g, core, flow, lin)
    gate, gate_mul = output_gate(g, flow, lin, heads, v_dim)
    if gate is not None and residual is not None:
        raise Reject(f"output of {core.out.name} meets both the queries and a gate before {lin.name}")
    events = path_events(flow, g, lin)
    if "norm" in events or "mix" in events:
        raise Reject(f"head outputs of {core.out.name} are normalised or mixed together before "
                      f"{lin.name}; removing a head would change the others")
    cols = at.reshape(-1, at.shape[-1])
    if not torch.equal(cols, cols[0].expand_as(cols)):
        raise Reject(f"output projection {lin.name}: head layout depends on the token")
    cols = cols[0].long()
    total = heads * v_dim
    passthrough = concatenated(g, flow, core.out, lin) if bool((cols < 0).any()) else []
    if passthrough and residual is not None:
        raise Reject(f"output of {core.out.name} meets both the queries and other features before "
                     f"{lin.name}")
    own = (cols >= 0).nonzero().flatten() if passthrough else torch.arange(cols.numel())
    if own.numel() != total or sorted(cols[own].tolist()) != list(range(total)):
        raise Reject(f"output projection {lin.name} reads {cols.numel()} features, "
                      f"not exactly the {total} head outputs")
    table = torch.empty(total, dtype=torch.long)
    table[cols[own]] = own
    weight, bias = g.linear_params(lin)
    out = Projection(node=lin.name, weight=weight, bias=bias, index=table.reshape(heads, v_dim).tolist())
    return OutputPath(out, residual, passthrough, gate, gate_mul)


def not_one_projection(g: GraphView, core: Core, flow: FlowResult) -> str:
    """Why the kernel output does not reach exactly one output projection, naming the two forms
    that cause it most: a second attention map combined with this one (differential attention)
    and an output read by more than the projection (cascaded heads)."""
    stops = ", ".join(sorted({f"{g.name(n)} ({n.name})" for n, _, _ in flow.reached}))
    for n, _, _ in flow.reached:
        others = [a for a in n.all_input_nodes if a not in flow.index and g.dependent(a)]
        kernels = [m for a in others for m in ancestors(a) | {a}
                   if g.name(m) in ("scaled_dot_product_attention", "softmax") and m not in core.nodes]
        if in_family(g.name(n), "binary") and kernels:
            return (f"two attention maps combined (differential attention?): the output of "
                    f"{core.out.name} meets that of {kernels[0].name} at {n.name}; heads would have to "
                    "be cut in both together, which hiap_fx does not do, so they stay dense")
    lins = sorted({n.name for n, _, _ in flow.reached if g.name(n) == "linear"})
    if len(lins) > 1:
        return (f"output read by more than its projection (cascaded heads?): the output of "
                f"{core.out.name} reaches {stops}; cutting a head or dim would change what the "
                "other layers read, so its heads stay dense")
    return f"output of {core.out.name} reaches {stops or 'nothing'}, not one output projection"


def output_gate(g: GraphView, flow: FlowResult, lin: fx.Node, heads: int,
                v_dim: int) -> tuple[Optional[Projection], Optional[fx.Node]]:
    """The projection whose rows, through element-wise and movement ops, multiply the kernel
    output feature by feature on its way to ``lin`` (IFormer's ``proj(attn_out * gate)``), as
    [head][dim] -> row, and that product; ``(None, None)`` when the output meets no product."""
    on_path = ancestors(lin) | {lin}
    muls = [e for e in flow.events if e.kind == "data_binary" and e.node in on_path and g.name(e.node) == "mul"
            and not all(width_stat_source(o) is not None for o in e.detail["other"])]  # a sub-norm
    if not muls:
        return None, None
    mul, others = muls[0].node, muls[0].detail["other"]
    if len(muls) > 1 or len(others) != 1:
        raise Reject(f"the attention output is multiplied by other activations more than once "
                     f"before {lin.name}")
    gate = others[0]
    sources = source_linears(g, gate)
    if len(sources) != 1:
        raise Reject(f"the gate {gate.name} multiplying the attention output at {mul.name} comes "
                     f"from {len(sources)} linears, not one")
    G = sources[0]
    gate_flow = g.flow.run({G: feature_index(tensor_shape(G), -1)})
    if any(e.kind in ("mix", "norm") and e.node in ancestors(gate) for e in gate_flow.events):
        raise Reject(f"the gate {gate.name} at {mul.name} mixes or normalises the features of {G.name}")
    mul_shape = node_shape(mul)
    kernel_side = [a for a in mul.all_input_nodes if a in flow.index]
    at_gate = gate_flow.index.get(gate)
    if mul_shape is None or len(kernel_side) != 1 or not isinstance(at_gate, torch.Tensor):
        raise Reject(f"cannot follow the gate {gate.name} of the attention output to {mul.name}")
    try:
        codes = torch.broadcast_to(flow.index[kernel_side[0]], mul_shape).reshape(-1).long()
        rows = torch.broadcast_to(at_gate, mul_shape).reshape(-1).long()
    except RuntimeError:
        raise Reject(f"the gate {gate.name} does not meet the attention output feature by feature "
                     f"at {mul.name}") from None
    total = heads * v_dim
    row_of = torch.full((total,), -1, dtype=torch.long)
    valid = (codes >= 0) & (codes < total) & (rows >= 0)
    row_of[codes[valid]] = rows[valid]
    if not bool(valid.all()) or bool((row_of < 0).any()) or not torch.equal(row_of[codes], rows) \
            or len(set(row_of.tolist())) != total:
        raise Reject(f"the gate {gate.name} does not pair one of its features with each feature of "
                     f"the attention output at {mul.name}")
    weight, bias = g.linear_params(G)
    return Projection(node=G.name, weight=weight, bias=bias,
                      index=row_of.reshape(heads, v_dim).tolist()), mul


def concatenated(g: GraphView, flow: FlowResult, out: fx.Node, lin: fx.Node) -> list[fx.Node]:
    """The activations concatenated with the kernel output ``out`` on its way to ``lin``;
    refused (:class:`Reject`) when the output meets another activation in any other way."""
    on_path = (ancestors(lin) & set(flow.index)) - {out}
    found: list[fx.Node] = []
    for n in sorted(on_path, key=lambda n: g.flow.order[n]):
        others = [a for a in n.all_input_nodes if a not in flow.index and g.dependent(a) and is_tensor_node(a)]
        if not others:
            continue
        if g.name(n) != "cat":
            raise Reject(f"the output of the attention meets {others[0].name} at {n.name} "
                         f"({g.name(n)}) before the output projection {lin.name}")
        found.extend(others)
    if not found:
        raise Reject(f"output projection {lin.name} reads features the attention output does "
                     "not reach, from no concatenation")
    return found


def query_residual(g: GraphView, core: Core, flow: FlowResult, lin: fx.Node) -> Optional[fx.Node]:
    """The add of the (unscaled) queries to the kernel output before ``lin``, element by element
    in one layout (MViTv2: ``attn @ v + q``); ``None`` when the output meets no other activation.
    Any other activation added or multiplied on the way is refused."""
    on_path = ancestors(lin) | {lin}
    adds = [e for e in flow.events if e.kind == "data_binary" and e.node in on_path and g.name(e.node) != "mul"]
    if not adds:
        return None
    queries = scaling_chain(core.q, g.dependent)
    e = adds[0]
    other = e.detail["other"]
    if len(adds) > 1 or len(other) != 1 or other[0] not in queries or g.name(e.node) != "add" \
            or not (node_shape(e.node) == node_shape(core.out) == node_shape(other[0])):
        raise Reject(f"output of {core.out.name} meets another activation at {e.node.name} before "
                     f"{lin.name}; only the queries added in the output's own layout are followed")
    return e.node


def operand_terms(g: GraphView, core: Core, heads: int, head_axis: int) -> list[fx.Node]:
    """Logits-side inputs computed from q or k (with constants and sizes) alone: relative-position
    terms such as SAM's ``rel_pos(q)``, which finalize computes again from the rebuilt q/k.
    ``head_axis``: q's head axis counted from the end (a parameter with the head count there
    may hold one slice per head, which the recomputed term could not cut: refused)."""
    sources = scaling_chain(core.q, g.dependent) | scaling_chain(core.k, g.dependent)
    terms = []
    for s in core.logits_inputs:
        if not g.dependent(s):
            continue
        region = region_between(sources, s)
        if not region or any(a.op == "placeholder" or (g.dependent(a) and is_tensor_node(a)
                                                       and a not in region and a not in sources)
                             for n in region for a in n.all_input_nodes):
            continue  # the term also reads other activations
        if region & set(core.nodes):
            continue  # computed from the kernel's own logits (ConViT's attn / attn.sum()): no term
        params = {p for n in region for a in n.all_input_nodes if not g.dependent(a) and is_tensor_node(a)
                  for p in constant_ancestors(g, a) if p.op == "get_attr"}
        for p in params:
            value = g.cg.values.get(p.name)
            if isinstance(value, torch.Tensor) and heads > 1 and value.dim() >= -head_axis \
                    and value.shape[head_axis] == heads:
                raise Reject(f"{s.name} enters the attention computed from q or k and {p.target}, "
                             "which may hold one slice per head; heads cannot be cut safely")
        terms.append(s)
    return terms


def constant_ancestors(g: GraphView, node: fx.Node) -> set[fx.Node]:
    """``node`` and its ancestors through nodes that do not depend on the input."""
    found = {node}
    todo = [node]
    while todo:
        for a in todo.pop().all_input_nodes:
            if a not in found and not g.dependent(a):
                found.add(a)
                todo.append(a)
    return found


def side_tensors(g: GraphView, core: Core, heads: int, head_axis: int, logits_rank: int,
                 terms: list[fx.Node]) -> list[SideTensor]:
    """Parameters that carry one entry per head into the attention logits (biases, mixers);
    ``terms`` (computed from q/k, :func:`operand_terms`) are left to finalize to recompute."""
    side: list[SideTensor] = []
    if head_axis < 0:
        return side
    for s in core.logits_inputs:
        if s in terms:
            continue
        s_shape = node_shape(s)
        if s_shape is None:
            continue
        axis_in_s = head_axis - (logits_rank - len(s_shape))
        if axis_in_s < 0 or s_shape[axis_in_s] != heads or heads == 1:
            continue
        found = head_params(g, s, s_shape, axis_in_s, heads)
        if not found:
            raise Reject(f"{s.name} enters the attention with one slice per head, but hiap_fx "
                          "cannot tell which parameters make it; heads cannot be cut safely")
        side.extend(found)
    for m in core.mixers:
        w = g.cg.values.get(m.args[1].name) if isinstance(m.args[1], fx.Node) else None
        if isinstance(w, torch.Tensor) and tuple(w.shape) == (heads, heads):
            weight, bias = g.linear_params(m)
            side.append(SideTensor(param=weight, axis=0, kind="head_mixing_out", index=list(range(heads))))
            side.append(SideTensor(param=weight, axis=1, kind="head_mixing_in", index=list(range(heads))))
            if bias and not bias.startswith("node:"):
                side.append(SideTensor(param=bias, axis=0, kind="head_mixing_out", index=list(range(heads))))
        else:
            raise Reject(f"linear {m.name} mixes attention logits but is not heads x heads")
    return side


def head_params(g: GraphView, s: fx.Node, s_shape: tuple[int, ...], axis_in_s: int,
                 heads: int) -> list[SideTensor]:
    """Parameters (or constant linears) whose axis of size ``heads`` becomes the head axis of s."""
    found: list[SideTensor] = []
    if g.dependent(s):
        return found
    want = feature_index(s_shape, axis_in_s)

    def maps_heads(at: Optional[torch.Tensor]) -> bool:
        # every position holds its head's index, or a value shared by all heads (padding)
        if at is None or at.shape != s_shape:
            return False
        shared = at == at.narrow(axis_in_s, 0, 1).expand_as(at)
        exact = at == want
        return bool((exact | shared).all()) and bool((exact & ~shared).any())

    for p in ancestors(s) | {s}:
        if g.dependent(p):
            continue
        if p.op == "get_attr":
            val = g.cg.values.get(p.name)
            if not isinstance(val, torch.Tensor) or not val.is_floating_point():
                continue
            axes = [a for a in range(val.dim()) if val.shape[a] == heads]
            for axis in axes:
                at = g.flow.run({p: feature_index(tuple(val.shape), axis)}).index.get(s)
                if maps_heads(at):
                    found.append(SideTensor(param=str(p.target), axis=axis, kind="head_bias",
                                            index=list(range(heads))))
        elif g.name(p) == "linear" and node_shape(p) is not None and tensor_shape(p)[-1] == heads:
            at = g.flow.run({p: feature_index(tensor_shape(p), -1)}).index.get(s)
            if maps_heads(at):
                weight, bias = g.linear_params(p)
                found.append(SideTensor(param=weight, axis=0, kind="head_bias", index=list(range(heads))))
                if bias and not bias.startswith("node:"):
                    found.append(SideTensor(param=bias, axis=0, kind="head_bias", index=list(range(heads))))
    return found


def attention_site(g: GraphView, core: Core) -> AttentionSite:
    """The site of ``core``: q/k/v features on their last axis (dims) and tokens on the other
    (the usual attention), or else with the two swapped (channel attention)."""
    try:
        try:
            return _site(g, core, transposed=False)
        except TokenDependent as usual:
            try:
                return _site(g, core, transposed=True)
            except Reject:
                raise usual from None
    except Reject as exc:
        if folded_at_batch(g, core):
            raise Reject(f"{exc}; its heads look folded into the batch axis (reshape(B * heads, "
                         "...)), which hiap_fx reads on an example batch of 1: prepare with "
                         "example_inputs[:1]") from None
        raise


def folded_at_batch(g: GraphView, core: Core) -> bool:
    """Whether the example batch is above 1 and q's leading axis holds a multiple of it with no
    axis of q holding the batch alone (heads folded into the batch axis)."""
    first = g.cg.example_inputs[0] if g.cg.example_inputs else None
    shape = node_shape(core.q)
    if first is None or first.dim() == 0 or shape is None:
        return False
    b0 = int(first.shape[0])
    return b0 > 1 and shape[0] % b0 == 0 and shape[0] > b0 and b0 not in shape


def _site(g: GraphView, core: Core, transposed: bool) -> AttentionSite:
    # channel attention (XCiT): each head's features are the kernel's tokens, the tokens are
    # contracted; its dims cannot be cut (a key row would leave every query's softmax)
    q_axes, v_axes = (-1, core.token_axis), (-1, core.token_axis)
    k_axes = (core.k_dim_axis, core.k_token_axis)
    if transposed:
        q_axes, k_axes, v_axes = q_axes[::-1], k_axes[::-1], v_axes[::-1]
    qp, q_head_axis, q_table = operand_projection(g, core, core.q, "q", *q_axes)
    heads, head_dim = q_table.shape
    q_heads = (q_head_axis - node_rank(core.q), heads) if q_head_axis >= 0 else None
    kp, k_head_axis, k_table = operand_projection(g, core, core.k, "k", *k_axes, q_heads)
    vp, v_head_axis, v_table = operand_projection(g, core, core.v, "v", *v_axes, q_heads)
    if transposed:
        qp, kp, vp = (p.model_copy(update={"dims_mixed": True}) for p in (qp, kp, vp))
    if core.kernel is not None and core.kernel.scale_arg is None:
        # the kernel derives its scale from the head dim: cutting q/k dims would change it
        qp, kp = qp.model_copy(update={"dims_mixed": True}), kp.model_copy(update={"dims_mixed": True})
    if tuple(k_table.shape) != (heads, head_dim) and k_table.shape[1] != head_dim:
        raise Reject(f"k of {core.nodes[0].name} has head dim {k_table.shape[1]}, q has {head_dim}")
    v_dim = v_table.shape[1]
    kv_heads = len({tuple(r) for r in k_table.tolist()})
    # a v shared by every head (multi-query) has no head axis; the output follows q's heads
    out_head_axis = v_head_axis if node_rank(core.out) == node_rank(core.v) and v_head_axis >= 0 \
        else q_head_axis
    out_dim_axis = v_axes[0] % node_rank(core.v) - node_rank(core.v)  # same rank as the output
    if transposed and (out_head_axis < 0 < heads - 1 or out_head_axis - node_rank(core.out) > out_dim_axis):
        raise Reject(f"{core.nodes[0].name}: channel attention without a head axis before its dims")
    found = out_projection(g, core, out_head_axis, max(heads, v_table.shape[0]), v_dim, out_dim_axis)
    out, residual, passthrough = found.out, found.residual, found.passthrough
    if found.gate is not None and (transposed or v_table.shape[0] != heads):
        raise Reject(f"a gate multiplies the output of {core.nodes[-1].name} feature by feature; "
                     "hiap_fx cuts such gates only with one value row per query head")
    if residual is not None:  # the queries enter the output: q and v dims are tied, heads stay
        if q_head_axis - node_rank(core.q) != out_head_axis - node_rank(core.out) or v_dim != head_dim:
            raise Reject(f"the queries are added to the output of {core.nodes[-1].name} in another "
                         "head layout")
        qp, kp, vp = (p.model_copy(update={"dims_mixed": True}) for p in (qp, kp, vp))
    terms = operand_terms(g, core, heads, q_head_axis - node_rank(core.q) if q_head_axis >= 0 else -1)
    side = side_tensors(g, core, heads, q_head_axis, node_rank(core.q), terms)
    read = set().union(*(ancestors(t) for t in terms))
    # a term contracts the dims of what it reads with shared tables: only whole heads can be cut
    if scaling_chain(core.q, g.dependent) & read:
        qp = qp.model_copy(update={"dims_mixed": True})
    if scaling_chain(core.k, g.dependent) & read:
        kp = kp.model_copy(update={"dims_mixed": True})
    q_shape, k_shape = node_shape(core.q), node_shape(core.k)

    def neg(axis: int, node: fx.Node) -> Optional[int]:
        return axis - node_rank(node) if axis >= 0 else None

    layout = CoreLayout(q_head_axis=neg(q_head_axis, core.q), k_head_axis=neg(k_head_axis, core.k),
                        k_dim_axis=core.k_dim_axis, out_head_axis=neg(out_head_axis, core.out),
                        k_token_axis=core.k_token_axis % node_rank(core.k) - node_rank(core.k),
                        out_dim_axis=out_dim_axis)
    return AttentionSite(
        name="", kind=core.kind, core_nodes=[n.name for n in core.nodes], num_heads=heads,
        num_kv_heads=kv_heads, head_dim=head_dim, v_dim=v_dim,
        tokens=q_shape[core.token_axis] if q_shape else 0, kernel=core.kernel.name if core.kernel else None,
        kv_tokens=k_shape[core.k_token_axis] if k_shape else 0, transposed=transposed,
        kv_of_head=kv_groups(core, heads, k_table, v_table), layout=layout,
        logits_terms=[t.name for t in terms], out_residual=residual.name if residual is not None else None,
        passthrough=[n.name for n in passthrough], out_gate=found.gate,
        out_gate_mul=found.gate_mul.name if found.gate_mul is not None else None,
        q=qp, k=kp, v=vp, out=out, side=side)


def kv_groups(core: Core, heads: int, k_table: torch.Tensor, v_table: torch.Tensor) -> list[int]:
    """kv head of every query head, numbered by first use; k and v must group heads alike."""

    def groups(table: torch.Tensor) -> list[int]:
        rows = [tuple(r) for r in table.long().tolist()]
        if len(rows) == heads:
            ids: dict[tuple[int, ...], int] = {}
            return [ids.setdefault(r, len(ids)) for r in rows]
        if len(rows) == 0 or heads % len(rows):
            raise Reject(f"{core.nodes[0].name}: {heads} query heads cannot share "
                          f"{len(rows)} kv heads evenly")
        return [h // (heads // len(rows)) for h in range(heads)]

    k_groups, v_groups = groups(k_table), groups(v_table)
    if k_groups != v_groups:
        raise Reject(f"{core.nodes[0].name}: k and v group the query heads differently")
    return k_groups
