"""Discover: find attention sites and FFN sites by graph pattern and index flow only.

No module classes or names are consulted. An attention site is an attention kernel (an sdpa
call, or matmul -> softmax -> matmul) whose q, k and v operands come from linear projections and
whose output reaches one linear projection; the head axis is the kernel's batch axis along which
the projection's feature index varies. An FFN site is a linear whose input is produced, through
element-wise ops including a non-linear activation, by one or two other linears only.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import fx

from ..flow import FlowResult, IndexFlow, feature_index, varies_along
from ..ir import CapturedGraph
from ..macs import graph_macs
from ..ops import in_family, op_name
from ..registry import AttentionKernel, attention_kernel
from ..plan import (AttentionSite, CoreLayout, FFNSite, Plan, Projection, Residual, SideTensor,
                    Unclaimed)

_PASS_BACK = ("movement", "cast", "unary", "binary", "norm")


class _Reject(Exception):
    """A candidate structure that is not a prunable site (reason in the message)."""


class _NotCandidate(_Reject):
    """Not even shaped like the structure looked for (not reported)."""


@dataclass
class _Core:
    kind: str
    nodes: list[fx.Node]
    q: fx.Node
    k: fx.Node
    v: fx.Node
    out: fx.Node
    k_dim_axis: int  # -1 (sdpa, k as is) or -2 (manual, k transposed)
    k_token_axis: int
    logits_inputs: list[fx.Node] = field(default_factory=list)
    mixers: list[fx.Node] = field(default_factory=list)
    token_axis: int = -2  # of q, v and the output
    kernel: Optional[AttentionKernel] = None  # a registered attention kernel


# ----------------------------------------------------------------------------------------------
# small graph helpers
# ----------------------------------------------------------------------------------------------


def _rank(node: Any) -> int:
    s = node.meta.get("hiap_shape") if isinstance(node, fx.Node) else None
    return len(s) if isinstance(s, tuple) else -1


def _shape(node: Any) -> Optional[tuple[int, ...]]:
    s = node.meta.get("hiap_shape") if isinstance(node, fx.Node) else None
    return s if isinstance(s, tuple) else None


def _attr_path(node: Any) -> Optional[str]:
    return str(node.target) if isinstance(node, fx.Node) and node.op == "get_attr" else None


class _Graph:
    """Queries over a captured graph shared by the discovery steps."""

    def __init__(self, cg: CapturedGraph) -> None:
        self.cg = cg
        self.modules = dict(cg.gm.named_modules())
        self.flow = IndexFlow(cg)

    def name(self, node: fx.Node) -> str:
        return op_name(node, self.modules)

    def dependent(self, node: Any) -> bool:
        return isinstance(node, fx.Node) and node.name in self.cg.input_dependent

    def data_inputs(self, node: fx.Node) -> list[fx.Node]:
        if self.name(node) == "type_as" and isinstance(node.args[0], fx.Node):
            return [node.args[0]]  # x.type_as(other) reads only the dtype of other
        return [a for a in node.all_input_nodes
                if self.dependent(a) and isinstance(a.meta.get("hiap_shape"), (tuple, list))]

    def passes_back(self, node: fx.Node) -> bool:
        name = self.name(node)
        if any(in_family(name, f) for f in _PASS_BACK) or name in ("dropout", "identity"):
            return True
        if node.op == "call_module" and name == "module":
            return not any(True for _ in self.modules[str(node.target)].parameters())
        if name in ("conv1d", "conv2d", "conv3d"):
            return self.flow.is_channel_conv(node, name)
        if in_family(name, "channel_norm"):
            return True
        return node.op == "call_function" and name not in ("linear",) and not in_family(
            name, "matmul_like") and not in_family(name, "softmax")

    def ancestors(self, node: fx.Node, limit: int = 100000) -> set[fx.Node]:
        seen: set[fx.Node] = set()
        todo = deque([node])
        while todo and len(seen) < limit:
            n = todo.popleft()
            for a in n.all_input_nodes:
                if a not in seen:
                    seen.add(a)
                    todo.append(a)
        return seen

    def linear_params(self, lin: fx.Node) -> tuple[str, Optional[str]]:
        w = _attr_path(lin.args[1])
        if w is None:
            raise _Reject(f"linear {lin.name} has a computed weight ({lin.args[1]}), not a parameter")
        b = lin.args[2] if len(lin.args) > 2 else lin.kwargs.get("bias")
        if b is None:
            return w, None
        return w, _attr_path(b) or f"node:{b.name}"


# ----------------------------------------------------------------------------------------------
# attention kernels
# ----------------------------------------------------------------------------------------------


def _find_cores(g: _Graph) -> tuple[list[_Core], list[Unclaimed]]:
    cores: list[_Core] = []
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
            cores.append(_Core("sdpa", [node], *node.args[:3], node, -1, t, [], token_axis=t, kernel=kernel))
        elif name == "scaled_dot_product_attention":
            args = list(node.args) + [None] * 4
            q = node.kwargs.get("query", args[0])
            k = node.kwargs.get("key", args[1])
            v = node.kwargs.get("value", args[2])
            mask = node.kwargs.get("attn_mask", args[3])
            logits = [mask] if isinstance(mask, fx.Node) else []
            cores.append(_Core("sdpa", [node], q, k, v, node, -1, -2, logits))
        elif in_family(name, "softmax"):
            try:
                cores.append(_manual_core(g, node))
            except _Reject as exc:
                unclaimed.append(Unclaimed(node=node.name, what="softmax", reason=str(exc)))
    return cores, unclaimed


def _manual_core(g: _Graph, softmax: fx.Node) -> _Core:
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
            raise _Reject(f"softmax input comes from {name} ({cur.name}), not from q @ k^T")
        data = g.data_inputs(cur)
        if in_family(name, "movement") and cur.args and isinstance(cur.args[0], fx.Node):
            same = [cur.args[0]]
        else:
            same = [a for a in data if _rank(a) == _rank(cur)]
        if len(same) > 1:
            same = [a for a in same if _near_matmul(g, a)] or same
        if not same:
            raise _Reject(f"cannot follow attention logits back through {cur.name}")
        logits_inputs.extend(a for a in cur.all_input_nodes if a is not same[0])
        cur = same[0]
    if qk is None:
        raise _Reject("no q @ k^T matmul found before this softmax")
    av = _find_av(g, softmax, mixers, logits_inputs)
    q, kt = qk.args[0], qk.args[1]
    v = av.args[1]
    if _rank(q) < 2 or _rank(kt) != _rank(q) or _rank(v) < 2:
        raise _Reject(f"q/k/v of {qk.name} are not batched matrices")
    return _Core("manual", [qk, softmax, av], q, kt, v, av, -2, -1, logits_inputs, mixers)


def _near_matmul(g: _Graph, node: fx.Node, depth: int = 8) -> bool:
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


def _find_av(g: _Graph, softmax: fx.Node, mixers: list[fx.Node],
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
                                   if a is not n and isinstance(a.meta.get("hiap_shape"), tuple))
                todo.append((u, depth + 1))
    if len(found) != 1:
        raise _Reject(f"softmax {softmax.name} feeds {len(found)} probability @ v matmuls, expected 1")
    return found[0]


# ----------------------------------------------------------------------------------------------
# operands: projection -> kernel
# ----------------------------------------------------------------------------------------------


def _source_linears(g: _Graph, start: fx.Node) -> list[fx.Node]:
    found: list[fx.Node] = []
    todo = deque([start])
    seen = {start}
    while todo:
        n = todo.popleft()
        name = g.name(n)
        if name == "linear":
            found.append(n)
            continue
        if n.op == "placeholder":
            raise _Reject(f"operand {start.name} comes straight from a model input")
        if not g.passes_back(n):
            raise _Reject(f"operand {start.name} comes from {name} ({n.name}), not a linear projection")
        inputs = g.data_inputs(n) or [a for a in n.all_input_nodes if a.op != "get_attr"
                                      and isinstance(a.meta.get("hiap_shape"), (tuple, list))]
        for a in inputs:
            if a not in seen:
                seen.add(a)
                todo.append(a)
    return found


def _path_events(flow: FlowResult, g: _Graph, target: fx.Node) -> list[str]:
    anc = g.ancestors(target) | {target}
    return [e.kind for e in flow.events if e.node in anc]


def _operand(g: _Graph, core: _Core, operand: fx.Node, role: str, dim_axis: int,
             token_axis: int, q_heads: Optional[tuple[int, int]] = None) -> tuple[Projection, int, torch.Tensor]:
    """Projection of one kernel operand; returns (projection, head axis, head x dim row table).

    ``q_heads`` (q's head axis counted from the end, number of heads): a k/v operand repeated
    across all query heads (multi-query attention) varies along no axis; when it has an axis of
    that size there, it is taken as the head axis, every head reading the same rows."""
    lins = _source_linears(g, operand)
    if len(lins) != 1:
        raise _Reject(f"{role} of {core.nodes[0].name} comes from {len(lins)} linears, expected 1")
    lin = lins[0]
    shape = _shape(lin)
    flow = g.flow.run({lin: feature_index(shape, -1)})
    if operand not in flow.index:
        raise _Reject(f"could not follow {lin.name} to the {role} operand of {core.nodes[0].name}")
    idx = flow.index[operand]
    rank = idx.dim()
    dim_axis, token_axis = dim_axis % rank, token_axis % rank
    head_axis = _head_axis(idx, dim_axis, token_axis, role, core)
    if head_axis < 0 and q_heads is not None and q_heads[1] > 1 and -q_heads[0] <= rank:
        shared = q_heads[0] % rank
        if shared not in (dim_axis, token_axis) and idx.shape[shared] == q_heads[1]:
            head_axis = shared
    table = _table(idx, head_axis, dim_axis, role, core)
    events = _path_events(flow, g, operand)
    weight, bias = g.linear_params(lin)
    proj = Projection(node=lin.name, weight=weight, bias=bias,
                      index=table.long().tolist(), dims_mixed=any(e in ("mix", "norm") for e in events))
    return proj, head_axis, table


def _head_axis(idx: torch.Tensor, dim_axis: int, token_axis: int, role: str, core: _Core) -> int:
    varying = []
    for a in range(idx.dim()):
        if a in (dim_axis, token_axis):
            continue
        if idx.shape[a] > 1 and varies_along(idx, a):
            varying.append(a)
    if len(varying) > 1:
        raise _Reject(f"{role} of {core.nodes[0].name}: projection features spread over axes {varying}")
    return varying[0] if varying else -1


def _table(idx: torch.Tensor, head_axis: int, dim_axis: int, role: str, core: _Core) -> torch.Tensor:
    """[head][dim] -> projection feature, checked to be the same at every batch/token position."""
    t = idx.movedim(dim_axis, -1)
    if head_axis >= 0:
        h_axis = head_axis if head_axis < dim_axis else head_axis - 1
        t = t.movedim(h_axis, -2)
    else:
        t = t.unsqueeze(-2)
    flat = t.reshape(-1, t.shape[-2], t.shape[-1])
    table = flat[0]
    if not torch.equal(flat, table.expand_as(flat)):
        raise _Reject(f"{role} of {core.nodes[0].name}: projection features depend on the token")
    if (table < 0).any():
        raise _Reject(f"{role} of {core.nodes[0].name}: mixes projection features with other data")
    return table


def _out_projection(g: _Graph, core: _Core, head_axis: int, heads: int, v_dim: int) -> Projection:
    out_shape = _shape(core.out)
    if out_shape is None:
        raise _Reject(f"no shape recorded for {core.out.name}")
    h_axis = head_axis if head_axis >= 0 else None
    code = feature_index(out_shape, -1)
    if h_axis is not None:
        code = code + feature_index(out_shape, h_axis) * v_dim
    flow = g.flow.run({core.out: code})
    lins = [(n, pos, t) for n, pos, t in flow.reached if g.name(n) == "linear" and pos == 0]
    others = [n for n, pos, t in flow.reached if (n, pos) not in {(l, p) for l, p, _ in lins}]
    if len(lins) != 1 or others:
        stops = ", ".join(sorted({f"{g.name(n)} ({n.name})" for n, _, _ in flow.reached}))
        raise _Reject(f"output of {core.out.name} reaches {stops or 'nothing'}, not one output projection")
    lin, _, at = lins[0]
    events = _path_events(flow, g, lin)
    if "norm" in events or "mix" in events:
        raise _Reject(f"head outputs of {core.out.name} are normalised or mixed together before "
                      f"{lin.name}; removing a head would change the others")
    cols = at.reshape(-1, at.shape[-1])
    if not torch.equal(cols, cols[0].expand_as(cols)):
        raise _Reject(f"output projection {lin.name}: head layout depends on the token")
    cols = cols[0].long()
    total = heads * v_dim
    if cols.numel() != total or sorted(cols.tolist()) != list(range(total)):
        raise _Reject(f"output projection {lin.name} reads {cols.numel()} features, "
                      f"not exactly the {total} head outputs")
    table = torch.empty(total, dtype=torch.long)
    table[cols] = torch.arange(total)
    weight, bias = g.linear_params(lin)
    return Projection(node=lin.name, weight=weight, bias=bias,
                      index=table.reshape(heads, v_dim).tolist())


def _side_tensors(g: _Graph, core: _Core, heads: int, head_axis: int, logits_rank: int) -> list[SideTensor]:
    """Parameters that carry one entry per head into the attention logits (biases, mixers)."""
    side: list[SideTensor] = []
    if head_axis < 0:
        return side
    for s in core.logits_inputs:
        s_shape = _shape(s)
        if s_shape is None:
            continue
        axis_in_s = head_axis - (logits_rank - len(s_shape))
        if axis_in_s < 0 or s_shape[axis_in_s] != heads or heads == 1:
            continue
        found = _head_params(g, s, s_shape, axis_in_s, heads)
        if not found:
            raise _Reject(f"{s.name} enters the attention with one slice per head, but hiap_fx "
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
            raise _Reject(f"linear {m.name} mixes attention logits but is not heads x heads")
    return side


def _head_params(g: _Graph, s: fx.Node, s_shape: tuple[int, ...], axis_in_s: int,
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

    for p in g.ancestors(s) | {s}:
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
        elif g.name(p) == "linear" and _shape(p) and _shape(p)[-1] == heads:
            at = g.flow.run({p: feature_index(_shape(p), -1)}).index.get(s)
            if maps_heads(at):
                weight, bias = g.linear_params(p)
                found.append(SideTensor(param=weight, axis=0, kind="head_bias", index=list(range(heads))))
                if bias and not bias.startswith("node:"):
                    found.append(SideTensor(param=bias, axis=0, kind="head_bias", index=list(range(heads))))
    return found


def _attention_site(g: _Graph, core: _Core) -> AttentionSite:
    qp, q_head_axis, q_table = _operand(g, core, core.q, "q", -1, core.token_axis)
    heads, head_dim = q_table.shape
    q_heads = (q_head_axis - _rank(core.q), heads) if q_head_axis >= 0 else None
    kp, k_head_axis, k_table = _operand(g, core, core.k, "k", core.k_dim_axis, core.k_token_axis, q_heads)
    vp, v_head_axis, v_table = _operand(g, core, core.v, "v", -1, core.token_axis, q_heads)
    if core.kernel is not None and core.kernel.scale_arg is None:
        # the kernel derives its scale from the head dim: cutting q/k dims would change it
        qp, kp = qp.model_copy(update={"dims_mixed": True}), kp.model_copy(update={"dims_mixed": True})
    if tuple(k_table.shape) != (heads, head_dim) and k_table.shape[1] != head_dim:
        raise _Reject(f"k of {core.nodes[0].name} has head dim {k_table.shape[1]}, q has {head_dim}")
    v_dim = v_table.shape[1]
    kv_heads = len({tuple(r) for r in k_table.tolist()})
    # a v shared by every head (multi-query) has no head axis; the output follows q's heads
    out_head_axis = v_head_axis if _rank(core.out) == _rank(core.v) and v_head_axis >= 0 \
        else q_head_axis
    out = _out_projection(g, core, out_head_axis, max(heads, v_table.shape[0]), v_dim)
    side = _side_tensors(g, core, heads, q_head_axis, _rank(core.q))
    q_shape, k_shape = _shape(core.q), _shape(core.k)

    def neg(axis: int, node: fx.Node) -> Optional[int]:
        return axis - _rank(node) if axis >= 0 else None

    layout = CoreLayout(q_head_axis=neg(q_head_axis, core.q), k_head_axis=neg(k_head_axis, core.k),
                        k_dim_axis=core.k_dim_axis, out_head_axis=neg(out_head_axis, core.out),
                        k_token_axis=core.k_token_axis % _rank(core.k) - _rank(core.k))
    return AttentionSite(
        name="", kind=core.kind, core_nodes=[n.name for n in core.nodes], num_heads=heads,
        num_kv_heads=kv_heads, head_dim=head_dim, v_dim=v_dim,
        tokens=q_shape[core.token_axis] if q_shape else 0, kernel=core.kernel.name if core.kernel else None,
        kv_tokens=k_shape[core.k_token_axis] if k_shape else 0,
        kv_of_head=_kv_groups(core, heads, k_table, v_table), layout=layout,
        q=qp, k=kp, v=vp, out=out, side=side)


def _kv_groups(core: _Core, heads: int, k_table: torch.Tensor, v_table: torch.Tensor) -> list[int]:
    """kv head of every query head, numbered by first use; k and v must group heads alike."""

    def groups(table: torch.Tensor) -> list[int]:
        rows = [tuple(r) for r in table.long().tolist()]
        if len(rows) == heads:
            ids: dict[tuple[int, ...], int] = {}
            return [ids.setdefault(r, len(ids)) for r in rows]
        if len(rows) == 0 or heads % len(rows):
            raise _Reject(f"{core.nodes[0].name}: {heads} query heads cannot share "
                          f"{len(rows)} kv heads evenly")
        return [h // (heads // len(rows)) for h in range(heads)]

    k_groups, v_groups = groups(k_table), groups(v_table)
    if k_groups != v_groups:
        raise _Reject(f"{core.nodes[0].name}: k and v group the query heads differently")
    return k_groups


# ----------------------------------------------------------------------------------------------
# FFN
# ----------------------------------------------------------------------------------------------


def _ffn_site(g: _Graph, out_lin: fx.Node, claimed: set[str]) -> FFNSite:
    x = out_lin.args[0]
    if not isinstance(x, fx.Node) or not g.dependent(x):
        raise _NotCandidate("input is not data")
    try:
        sources = _source_linears(g, x)
    except _Reject as exc:
        raise _NotCandidate(str(exc)) from exc
    if not sources:
        raise _NotCandidate("no input linear")
    region = (g.ancestors(x) | {x})
    for s in sources:
        region -= g.ancestors(s) | {s}
    acts = [g.name(n) for n in region if in_family(g.name(n), "activation")]
    if not acts:
        raise _NotCandidate(f"no activation between the linears feeding {out_lin.name}")
    if len(sources) > 2:
        raise _Reject(f"hidden units come from {len(sources)} linears")
    if any(s.name in claimed for s in sources):
        raise _Reject("input projection already belongs to an attention")
    hidden = _shape(x)[-1]
    inputs: list[Projection] = []
    hidden_norm = False
    side: list[SideTensor] = []
    for src in sources:
        flow = g.flow.run({src: feature_index(_shape(src), -1)}, data_binary=("mul",))
        bad = [n for n, pos, _ in flow.reached if not (n is out_lin and pos == 0)]
        if bad:
            raise _Reject(f"hidden units of {src.name} also reach {bad[0].name}")
        if x not in flow.index:
            raise _Reject(f"cannot follow {src.name} to {out_lin.name}")
        at = flow.index[x]
        tables = _ffn_tables(flow, x, at, src)
        for table in tables:
            weight, bias = g.linear_params(src)
            inputs.append(Projection(node=src.name, weight=weight, bias=bias, index=[table]))
        kinds = {e.kind for e in flow.events if e.node in region}
        hidden_norm |= "norm" in kinds
        side.extend(_channel_side(g, flow, region, x, at))
    gated = len(inputs) == 2
    if len(inputs) > 2:
        raise _Reject(f"{len(inputs)} input projections")
    weight, bias = g.linear_params(out_lin)
    out = Projection(node=out_lin.name, weight=weight, bias=bias, index=[list(range(hidden))])
    return FFNSite(name="", hidden=hidden, gated=gated, inputs=inputs, out=out,
                   activation=sorted(set(acts))[0], hidden_norm=hidden_norm, side=side)


def _ffn_tables(flow: FlowResult, x: fx.Node, at: torch.Tensor, src: fx.Node) -> list[list[int]]:
    """Row of ``src`` for each hidden unit; two tables when one linear feeds both gate halves."""
    rows = at.reshape(-1, at.shape[-1])
    if not torch.equal(rows, rows[0].expand_as(rows)) or (rows[0] < 0).any():
        raise _Reject(f"hidden layout of {src.name} depends on the token")
    first = rows[0].long().tolist()
    mixes = [e for e in flow.events if e.kind == "mix"]
    if not mixes:
        return [first]
    e = mixes[-1]
    a, b = e.detail["a"].reshape(-1), e.detail["b"].reshape(-1)
    pair = {}
    for ra, rb in zip(a.long().tolist(), b.long().tolist()):
        if pair.setdefault(ra, rb) != rb:
            raise _Reject(f"hidden units of {src.name} pair inconsistently at {e.node.name}")
    return [first, [pair[r] for r in first]]


def _channel_side(g: _Graph, flow: FlowResult, region: set[fx.Node], x: fx.Node,
                  at: torch.Tensor) -> list[SideTensor]:
    """Per-channel parameters inside the FFN (depthwise conv, norms, scales) to cut with neurons."""
    row_to_unit = {int(r): k for k, r in enumerate(at.reshape(-1, at.shape[-1])[0].tolist())}
    side: list[SideTensor] = []
    for e in flow.events:
        if e.node not in region or e.kind not in ("channel_op", "norm", "const_binary"):
            continue
        node = e.node
        inp = node.args[0] if isinstance(node.args[0], fx.Node) and node.args[0] in flow.index else None
        if inp is None:
            continue
        idx = flow.index[inp]
        ch_axis = 1 if e.kind == "channel_op" else -1
        units = idx.movedim(ch_axis, -1).reshape(-1, idx.shape[ch_axis])[0].long().tolist()
        for a in node.all_input_nodes:
            if a.op != "get_attr":
                continue
            val = g.cg.values.get(a.name)
            if isinstance(val, torch.Tensor) and val.dim() >= 1 and val.shape[0] == len(units):
                side.append(SideTensor(param=str(a.target), axis=0, kind="channel",
                                       index=[row_to_unit.get(u, -1) for u in units]))
            elif isinstance(val, torch.Tensor) and val.dim() >= 1 and val.shape[-1] == len(units):
                side.append(SideTensor(param=str(a.target), axis=val.dim() - 1, kind="channel",
                                       index=[row_to_unit.get(u, -1) for u in units]))
    return side


# ----------------------------------------------------------------------------------------------
# residual branches, names, assembly
# ----------------------------------------------------------------------------------------------


def _zero_preserving(g: _Graph, node: fx.Node, data: fx.Node) -> bool:
    """Whether ``node`` maps an all-zero ``data`` operand to all zeros (others as recorded)."""
    shape = _shape(data)
    if shape is None or node.op not in ("call_function", "call_method", "call_module"):
        return False
    if node.op == "call_module" and any(True for _ in g.modules[str(node.target)].parameters()):
        return False
    try:
        out = g.flow.execute(node, {data: torch.zeros(shape, dtype=torch.float64)}, movement=False)
    except Exception:
        return False
    return isinstance(out, torch.Tensor) and out.numel() > 0 and not out.any()


def _residual(g: _Graph, branch_end: fx.Node, branch_input: fx.Node,
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
        tensors = [a for a in u.all_input_nodes if isinstance(a.meta.get("hiap_shape"), tuple)]
        if g.name(u) == "add" and len(tensors) == 2 and cur in tensors:
            other = tensors[0] if tensors[1] is cur else tensors[1]
            pos = next(i for i, a in enumerate(u.args) if a is cur)
            if other is branch_input or other in g.ancestors(branch_input):
                return Residual(add_node=u.name, branch_arg=pos)
            return None
        if g.data_inputs(u) != [cur] or (zero_preserving and not _zero_preserving(g, u, cur)):
            return None
        cur = u
    return None


def _site_name(paths: list[str], taken: set[str], kind: str) -> str:
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


def discover(cg: CapturedGraph, model_name: str = "model") -> Plan:
    """Find attention and FFN sites in a normalised, propagated graph and return the plan."""
    g = _Graph(cg)
    node_by_name = {n.name: n for n in cg.gm.graph.nodes}
    macs = graph_macs(cg)
    cores, unclaimed = _find_cores(g)
    attention: list[AttentionSite] = []
    claimed: set[str] = set()
    taken: set[str] = set()
    for core in cores:
        try:
            site = _attention_site(g, core)
        except _Reject as exc:
            unclaimed.append(Unclaimed(node=core.nodes[0].name, what=f"attention ({core.kind})",
                                       reason=str(exc)))
            continue
        projs = [site.q, site.k, site.v, site.out]
        owned = {p.node for p in projs}
        if owned & claimed:
            unclaimed.append(Unclaimed(node=core.nodes[0].name, what="attention",
                                       reason="shares projections with another attention"))
            continue
        claimed |= owned
        branch_input = node_by_name[site.q.node].args[0]
        site.residual = _residual(g, node_by_name[site.out.node], branch_input)
        site.macs = sum(macs.get(n, 0) for n in owned | set(site.core_nodes))
        site.name = _site_name([p.weight for p in projs], taken, "attn")
        attention.append(site)
    ffn: list[FFNSite] = []
    notes: list[str] = []
    for node in cg.gm.graph.nodes:
        if g.name(node) != "linear" or node.name in claimed:
            continue
        try:
            site = _ffn_site(g, node, claimed)
        except _NotCandidate:
            continue
        except _Reject as exc:
            unclaimed.append(Unclaimed(node=node.name, what="linear-activation-linear", reason=str(exc)))
            continue
        branch_input = node_by_name[site.inputs[0].node].args[0]
        site.residual = _residual(g, node, branch_input)
        if site.residual is None:
            if _residual(g, node, branch_input, zero_preserving=False) is None:
                unclaimed.append(Unclaimed(node=node.name, what="linear-activation-linear",
                                           reason="not on a residual branch (classifier or embedding MLP?)"))
                continue
        owned = {p.node for p in site.inputs} | {site.out.node}
        claimed |= owned
        site.macs = sum(macs.get(n, 0) for n in owned)
        site.name = _site_name([p.weight for p in site.inputs] + [site.out.weight], taken, "ffn")
        if site.residual is None:
            notes.append(f"{site.name}: the FFN joins the residual stream through a norm "
                         "(post-norm); its neurons are gated, the whole block is not")
        ffn.append(site)
    unclaimed.extend(_opaque_modules(g))
    return Plan(model=model_name, frontend=cg.frontend,  # type: ignore[arg-type]
                example_shapes=[list(t.shape) for t in cg.example_inputs],
                total_macs=sum(macs.values()), attention=attention, ffn=ffn,
                unclaimed=unclaimed, notes=list(cg.notes) + notes)


def _opaque_modules(g: _Graph) -> list[Unclaimed]:
    out = []
    for node in g.cg.gm.graph.nodes:
        if node.op == "call_module" and g.name(node) == "module":
            mod = g.modules[str(node.target)]
            if any(True for _ in mod.parameters()):
                out.append(Unclaimed(node=node.name, what=f"opaque module {type(mod).__name__}",
                                     reason=f"'{node.target}' was not traced into; anything inside "
                                     "it (e.g. attention) is left as is"))
    return out
