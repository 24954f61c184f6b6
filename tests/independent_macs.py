"""An independent MAC count of the sub-network eval mode selects, for checking the cost model.

It does not use sympy or the cost model (only the rule that finalize pads the live heads of an
attention to the widest kept width of the layer): from the eval-mode gate decisions it builds boolean
keep-masks over every weight row/column the plan assigns to a unit, then counts each node of the
graph from its recorded shapes with the kept sizes.
"""

from __future__ import annotations

import math

import torch

from hiap_fx.graph.node_macs import node_macs
from hiap_fx.graph.ops import op_name


def _decisions(prepared) -> dict[str, torch.Tensor]:
    return {k: g.hard().bool() for k, g in prepared.gate_modules().items()}


def independent_macs(prepared) -> int:
    gates = _decisions(prepared)
    keep: dict[tuple[str, int], torch.Tensor] = {}
    kernel: dict[str, tuple[int, int]] = {}  # node -> (heads, kept head x dim units on that kernel)
    dead_sites: set[str] = set()

    def mark(param: str, axis: int, size_hint: int, positions: list[int], alive: list[bool]) -> None:
        mask = keep.get((param, axis))
        if mask is None:
            mask = torch.ones(size_hint, dtype=torch.bool)
        for p, a in zip(positions, alive):
            mask[p] = mask[p] & a
        keep[(param, axis)] = mask

    params = dict(prepared.graph_module.named_parameters())
    params.update(dict(prepared.graph_module.named_buffers()))

    def size(param: str, axis: int) -> int:
        return params[param].shape[axis]

    for s in prepared.plan.attention:
        H, dq, dv = s.num_heads, s.head_dim, s.v_dim
        kv = s.kv_of_head
        K = max(kv) + 1
        g = gates.get(f"{s.name}.head", torch.ones(H, dtype=torch.bool))
        d = gates.get(f"{s.name}.head_dim", torch.ones(K * dv, dtype=torch.bool)).view(K, dv)
        qk = gates.get(f"{s.name}.qk_dim", torch.ones(K * dq, dtype=torch.bool)).view(K, dq)
        live = [bool(g[h]) and bool(d[kv[h]].any()) for h in range(H)]
        group_live = [any(live[h] for h in range(H) if kv[h] == k) for k in range(K)]
        # finalize pads every live head to the widest kept width of the layer (one kernel call)
        wq = max([int(qk[kv[h]].sum()) for h in range(H) if live[h]], default=0)
        wv = max([int(d[kv[h]].sum()) for h in range(H) if live[h]], default=0)

        def first(n: int, width: int, on: bool) -> list[bool]:
            return [on and j < width for j in range(n)]

        for h in range(H):
            mark(s.q.weight, 0, size(s.q.weight, 0), s.q.index[h], first(dq, wq, live[h]))
            mark(s.out.weight, 1, size(s.out.weight, 1), s.out.index[h], first(dv, wv, live[h]))
        for proj, width in ((s.k, wq), (s.v, wv)):
            rows_kv = kv if len(proj.index) == H else list(range(K))
            for r, k in enumerate(rows_kv):
                mark(proj.weight, 0, size(proj.weight, 0), proj.index[r],
                     first(len(proj.index[r]), width, group_live[k]))
        for t in s.side:  # mixers shrink with the heads; bias tables are selected, not sliced
            if t.kind != "head_bias":
                mark(t.param, t.axis, size(t.param, t.axis), list(range(len(t.index))),
                     [live[u] if u >= 0 else True for u in t.index])
        if not any(live):
            dead_sites.update([s.q.node, s.k.node, s.v.node, s.out.node, *s.core_nodes])
        qk_units, v_units = sum(live) * wq, sum(live) * wv
        if s.kind == "sdpa" and dq == dv:  # padded to one head dim (CPU flash attention)
            qk_units = v_units = sum(live) * max(wq, wv)
        if s.kind == "sdpa":
            kernel[s.core_nodes[0]] = (H * (dq + dv), qk_units + v_units)
        else:
            kernel[s.core_nodes[0]] = (H * dq, qk_units)
            kernel[s.core_nodes[-1]] = (H * dv, v_units)
    for s in prepared.plan.ffn:
        b = bool(gates.get(f"{s.name}.ffn", torch.ones(1, dtype=torch.bool))[0])
        c = gates.get(f"{s.name}.neuron", torch.ones(s.hidden, dtype=torch.bool))
        alive = [b and bool(c[k]) for k in range(s.hidden)]
        if not b:
            dead_sites.update([p.node for p in s.inputs] + [s.out.node])
        for p in s.inputs:
            mark(p.weight, 0, size(p.weight, 0), p.index[0], alive)
        mark(s.out.weight, 1, size(s.out.weight, 1), s.out.index[0], alive)
        for t in s.side:
            mark(t.param, t.axis, size(t.param, t.axis), list(range(len(t.index))),
                 [alive[u] if u >= 0 else True for u in t.index])

    dead = _feeding_only(prepared.graph_module.graph, dead_sites)
    total = 0
    for n in prepared.graph_module.graph.nodes:
        if n.name in dead:
            continue
        dense = int(n.meta.get("hiap_macs", node_macs(n))) if "hiap_shape" in n.meta else 0
        if not dense:
            continue
        if n.name in kernel:
            units, kept = kernel[n.name]
            total += dense // units * kept
            continue
        name = op_name(n)
        w = n.args[1] if len(n.args) > 1 else None
        if name in ("linear", "conv1d", "conv2d", "conv3d") and getattr(w, "op", None) == "get_attr":
            shape = list(w.meta["hiap_shape"])
            kept = [int(keep[(str(w.target), a)].sum()) if (str(w.target), a) in keep else shape[a]
                    for a in range(len(shape))]
            total += dense // math.prod(shape) * math.prod(kept)
        else:
            total += dense
    return total


def _feeding_only(graph, sites: set[str]) -> set[str]:
    """Nodes outside ``sites`` whose every use ends in ``sites`` (they die with them)."""
    only: dict[str, bool] = {}
    for n in reversed(list(graph.nodes)):
        users = list(n.users)
        only[n.name] = bool(users) and all(u.name in sites or only.get(u.name, False) for u in users)
    return {k for k, v in only.items() if v and k not in sites}


def randomise_gates(prepared, seed: int, p_off: float = 0.4) -> None:
    """Set every gate logit to +-3 at random (about ``p_off`` of the units off)."""
    from hiap_fx.app.coverage import randomise_gates as pin

    pin(prepared, seed, p_off)
