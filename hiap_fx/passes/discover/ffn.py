"""FFN sites: a linear fed, through element-wise ops with a non-linear activation, by one or two linears."""

from __future__ import annotations

import torch
from torch import fx

from hiap_fx.graph.flow import FlowResult, feature_index
from hiap_fx.graph.ir import tensor_shape
from hiap_fx.graph.ops import in_family
from hiap_fx.graph.queries import ancestors
from hiap_fx.passes.discover.operands import source_linears
from hiap_fx.passes.discover.view import GraphView, NotCandidate, Reject
from hiap_fx.plan import FFNSite, Projection, SideTensor


def ffn_site(g: GraphView, out_lin: fx.Node, claimed: set[str]) -> FFNSite:
    x = out_lin.args[0]
    if not isinstance(x, fx.Node) or not g.dependent(x):
        raise NotCandidate("input is not data")
    try:
        sources = source_linears(g, x)
    except Reject as exc:
        raise NotCandidate(str(exc)) from exc
    if not sources:
        raise NotCandidate("no input linear")
    region = (ancestors(x) | {x})
    for s in sources:
        region -= ancestors(s) | {s}
    acts = [g.name(n) for n in region if in_family(g.name(n), "activation")]
    if not acts:
        raise NotCandidate(f"no activation between the linears feeding {out_lin.name}")
    if len(sources) > 2:
        raise Reject(f"hidden units come from {len(sources)} linears")
    if any(s.name in claimed for s in sources):
        raise Reject("input projection already belongs to an attention")
    hidden = tensor_shape(x)[-1]
    inputs: list[Projection] = []
    hidden_norm = False
    side: list[SideTensor] = []
    for src in sources:
        flow = g.flow.run({src: feature_index(tensor_shape(src), -1)}, data_binary=("mul",))
        bad = [n for n, pos, _ in flow.reached if not (n is out_lin and pos == 0)]
        if bad:
            raise Reject(f"hidden units of {src.name} also reach {bad[0].name}")
        if x not in flow.index:
            raise Reject(f"cannot follow {src.name} to {out_lin.name}")
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
        raise Reject(f"{len(inputs)} input projections")
    weight, bias = g.linear_params(out_lin)
    out = Projection(node=out_lin.name, weight=weight, bias=bias, index=[list(range(hidden))])
    return FFNSite(name="", hidden=hidden, gated=gated, inputs=inputs, out=out,
                   activation=sorted(set(acts))[0], hidden_norm=hidden_norm, side=side)


def _ffn_tables(flow: FlowResult, x: fx.Node, at: torch.Tensor, src: fx.Node) -> list[list[int]]:
    """Row of ``src`` for each hidden unit; two tables when one linear feeds both gate halves."""
    rows = at.reshape(-1, at.shape[-1])
    if not torch.equal(rows, rows[0].expand_as(rows)) or (rows[0] < 0).any():
        raise Reject(f"hidden layout of {src.name} depends on the token")
    first = rows[0].long().tolist()
    mixes = [e for e in flow.events if e.kind == "mix"]
    if not mixes:
        return [first]
    e = mixes[-1]
    a, b = e.detail["a"].reshape(-1), e.detail["b"].reshape(-1)
    pair: dict[int, int] = {}
    for ra, rb in zip(a.long().tolist(), b.long().tolist()):
        if pair.setdefault(ra, rb) != rb:
            raise Reject(f"hidden units of {src.name} pair inconsistently at {e.node.name}")
    return [first, [pair[r] for r in first]]


def _channel_side(g: GraphView, flow: FlowResult, region: set[fx.Node], x: fx.Node,
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
