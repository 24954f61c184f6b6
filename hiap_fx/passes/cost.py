"""Cost: derive the symbolic MAC expression of every matmul-like node of the gated graph.

Each MAC-bearing node (linear, conv, matmul, sdpa) gets its MACs from its recorded shapes with
the sizes that gates change replaced by symbolic kept counts:
  * a weighted op (linear, conv) costs rows x prod(weight shape); every weight axis that a site
    slices (projection rows/columns, per-head or per-neuron side parameters) becomes
    ``size - sum over the roles that cut it of (role size - kept)``;
  * finalize pads the live heads of an attention to the widest kept q/k and value width of the
    layer and runs them in one kernel call, so q/k/v rows and output-projection columns are
    (live heads) x (widest width), and the kernel costs (query rows per head) x (key tokens) x
    (live heads) x (widest q/k width + widest value width); an sdpa kernel whose dense q/k and
    value head dims are equal keeps them equal (the narrower padded to the wider: CPU flash
    attention needs one head dim), so it costs (live heads) x 2 x (the wider);
  * rows scale with the batch symbol B when the node depends on the input, and token-sized rows
    become the token symbol N on isotropic models.
At the example input with every unit on, each node's expression equals its measured MACs (checked).
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from typing import Mapping, Optional

import sympy
from torch import fx, nn

from hiap_fx.errors import HiapError
from hiap_fx.gated.bundles import AttentionGates, FFNGates
from hiap_fx.gated.cost_model import CostModel, NodeTerm, SymbolSource, Widest
from hiap_fx.gated.decisions import gate_key
from hiap_fx.graph.ir import CapturedGraph, arg_node, node_shape, recorded_macs, tensor_shape
from hiap_fx.graph.node_macs import node_macs
from hiap_fx.graph.ops import in_family, op_name
from hiap_fx.graph.queries import region_between, scaling_chain
from hiap_fx.plan import AttentionSite, FFNSite, Plan

_PREFIX_TOKENS = 16  # rows this far below N (patches without cls/register tokens) become N - k


class _Builder:
    def __init__(self, cg: CapturedGraph, plan: Plan, bundles: Mapping[str, nn.Module]) -> None:
        self.cg, self.plan, self.bundles = cg, plan, bundles
        self.nodes = {n.name: n for n in cg.gm.graph.nodes}
        self.sources: list[SymbolSource] = []
        self.group_sizes: dict[str, int] = {}
        self.unit_symbols: set[sympy.Symbol] = set()
        self.batch = sympy.Symbol("B", positive=True, integer=True)
        self.b0 = int(cg.example_inputs[0].shape[0]) if cg.example_inputs and cg.example_inputs[0].dim() else 1
        self.tokens, self.t0 = self._token_symbol()
        # (param, axis) -> list of (role size, kept expression)
        self.cuts: dict[tuple[str, int], list[tuple[int, sympy.Expr]]] = defaultdict(list)
        # kernel node -> (heads, sum over heads of kept dims, role "sdpa" | "qk" | "av")
        self.kernels: dict[str, tuple[int, sympy.Expr, str, int]] = {}
        self.site_alive: dict[str, sympy.Expr] = {}  # 1 while any head of the attention is live
        self.terms: dict[str, NodeTerm] = {}

    # --- symbols -----------------------------------------------------------------------------

    def _symbol(self, name: str, gate: str, reduce: str, index: int, micro: bool) -> sympy.Symbol:
        sym = sympy.Symbol(name, nonnegative=True, integer=True)
        self.sources.append(SymbolSource(sym, gate, reduce, index, micro))
        if reduce in ("unit", "any"):
            self.unit_symbols.add(sym)
        return sym

    def _token_symbol(self) -> tuple[Optional[sympy.Symbol], int]:
        sites = self.plan.attention
        if not sites:
            return None, 0
        t0 = sites[0].tokens
        for s in sites:
            if s.transposed:  # its kernel's tokens are head dims
                return None, t0
            q = self.nodes[s.core_nodes[0]].args[0]
            shape = node_shape(q)
            if not isinstance(shape, tuple) or s.tokens != t0 or s.kv_tokens != t0:
                return None, t0
            if math.prod(shape[:-1]) != self.b0 * s.num_heads * t0:
                return None, t0
        return sympy.Symbol("N", positive=True, integer=True), t0

    def rows(self, count: int, dependent: bool) -> sympy.Expr:
        """Symbolic row count: B x per-sample rows (token-sized rows as N) for input-dependent nodes."""
        if not dependent or count % self.b0:
            return sympy.Integer(count)
        return self.batch * self.tok(count // self.b0)

    def tok(self, count: int) -> sympy.Expr:
        if self.tokens is None or count <= 0:
            return sympy.Integer(count)
        if count % self.t0 == 0:
            return (count // self.t0) * self.tokens
        if 0 < self.t0 - count <= min(_PREFIX_TOKENS, self.t0 // 4):
            return self.tokens - (self.t0 - count)
        return sympy.Integer(count)

    # --- sites -------------------------------------------------------------------------------

    def attention(self, site: AttentionSite) -> None:
        bundle = self.bundles.get(site.name)
        H, dq, dv = site.num_heads, site.head_dim, site.v_dim
        kv_of = site.kv_of_head
        K = max(kv_of) + 1
        one = sympy.Integer(1)
        g = [one] * H
        z, Dv, Dq = [one] * K, [sympy.Integer(dv)] * K, [sympy.Integer(dq)] * K
        if isinstance(bundle, AttentionGates):
            key = f"{site.name}."
            if bundle.head is not None:
                g = [self._symbol(f"{key}h{h}", gate_key(site.name, "head"), "unit", h, False) for h in range(H)]
            if bundle.head_dim is not None:
                self.group_sizes[gate_key(site.name, "head_dim")] = dv
                z = [self._symbol(f"{key}z{k}", gate_key(site.name, "head_dim"), "any", k, False) for k in range(K)]
                Dv = [self._symbol(f"{key}v{k}", gate_key(site.name, "head_dim"), "count", k, True) for k in range(K)]
            if bundle.qk_dim is not None:
                self.group_sizes[gate_key(site.name, "qk_dim")] = dq
                Dq = [self._symbol(f"{key}q{k}", gate_key(site.name, "qk_dim"), "count", k, True) for k in range(K)]
        live = [g[h] * z[kv_of[h]] for h in range(H)]
        group_on = [one - sympy.Mul(*[one - g[h] for h in range(H) if kv_of[h] == k]) for k in range(K)]
        # finalize pads every live head to the widest kept width of the layer (one kernel call):
        # q/k/v rows, output columns and kernel work are (live heads) x (widest width)
        heads_live = sympy.Add(*live)
        kv_live = sympy.Add(*[z[k] * group_on[k] for k in range(K)])
        wq = padded_width(live, [Dq[kv_of[h]] for h in range(H)], dq)
        wv = padded_width(live, [Dv[kv_of[h]] for h in range(H)], dv)
        self._cut(site.q.weight, 0, H * dq, heads_live * wq)
        self._cut(site.k.weight, 0, K * dq, kv_live * wq)
        self._cut(site.v.weight, 0, K * dv, kv_live * wv)
        self._cut(site.out.weight, 1, H * dv, heads_live * wv)
        if site.out_gate is not None:  # the gate rows follow the value dims of each live head
            self._cut(site.out_gate.weight, 0, H * dv, heads_live * wv)
        for t in site.side:
            # mixers run on the logits and are sliced; per-head bias tables (and the MLPs that
            # make them) keep their size: finalize selects the live heads where they enter
            if t.kind != "head_bias":
                kept = sympy.Add(*[live[u] if u >= 0 else one for u in t.index])
                self._cut(t.param, t.axis, len(t.index), kept)
        self.site_alive[site.name] = one - sympy.Mul(*[one - x for x in live])
        for role, count, alive in (("q", H, heads_live), ("k", K, kv_live), ("v", K, kv_live)):
            # work on a whole-head operand path after its projection (MViTv2's pooling of each
            # head's q/k/v): the dense work per head times the live heads
            if getattr(site, role).dims_mixed:
                for step in operand_path(self.nodes, site, role):
                    if measured_macs(step) and step.name not in self.kernels and not self._weight_is_cut(step):
                        self.kernels[step.name] = (count, alive, "heads", -1)
        for term_node in term_nodes(self.cg, self.nodes, site):
            # computed again from the live heads' q/k (a relative-position term): its work
            # is the dense work per head times the live heads
            if measured_macs(term_node):
                self.kernels[term_node.name] = (H, heads_live, "heads", -1)
        q_shape = tensor_shape(self.nodes[site.core_nodes[0]].args[0])
        nk = site.kv_tokens or site.tokens
        if site.transposed:
            # channel attention: the kernel's tokens are the head dims (never cut) and the
            # tokens are contracted; its work is the dense work per head times the live heads
            rows, n = math.prod(q_shape) // (H * site.tokens * q_shape[-1]), q_shape[-1]
            term = NodeTerm("sdpa", heads=heads_live, qk_width=sympy.Integer(n), v_width=sympy.Integer(n),
                            dims=(rows, H, site.tokens, nk, n, n))
            roles = [(site.core_nodes[0], "sdpa")] if site.kind == "sdpa" else \
                [(site.core_nodes[0], "qk"), (site.core_nodes[-1], "av")]
            for node, kind in roles:
                self.kernels[node] = (H, heads_live, "heads", -1)
                self.terms[node] = dataclasses.replace(term, kind=kind)
            return
        dims = (math.prod(q_shape[:-1]) // max(1, H * site.tokens), H, site.tokens, nk, dq, dv)
        term = NodeTerm("sdpa", heads=heads_live, qk_width=wq, v_width=wv, dims=dims)
        if site.kind == "sdpa":
            # equal q/k and v head dims stay equal (zero padding): CPU flash attention needs them
            kw = kernel_width(wq, wv, dq) if dq == dv else None
            work = heads_live * (2 * kw if kw is not None else wq + wv)
            self.kernels[site.core_nodes[0]] = (H, work, "sdpa", site.layout.k_token_axis)
            self.terms[site.core_nodes[0]] = term
        else:
            self.kernels[site.core_nodes[0]] = (H, heads_live * wq, "qk", -1)
            self.kernels[site.core_nodes[-1]] = (H, heads_live * wv, "av", -1)
            self.terms[site.core_nodes[0]] = dataclasses.replace(term, kind="qk")
            self.terms[site.core_nodes[-1]] = dataclasses.replace(term, kind="av")

    def ffn(self, site: FFNSite) -> None:
        bundle = self.bundles.get(site.name)
        b, M = sympy.Integer(1), sympy.Integer(site.hidden)
        if isinstance(bundle, FFNGates):
            key = f"{site.name}."
            if bundle.block is not None:
                b = self._symbol(f"{key}on", gate_key(site.name, "ffn"), "unit", 0, False)
            if bundle.neuron is not None:
                self.group_sizes[gate_key(site.name, "neuron")] = site.hidden
                M = self._symbol(f"{key}n", gate_key(site.name, "neuron"), "count", 0, True)
        self.site_alive[site.name] = b
        for p in site.inputs:
            self._cut(p.weight, 0, site.hidden, b * M)
        self._cut(site.out.weight, 1, site.hidden, b * M)
        for t in site.side:
            units = sorted(u for u in t.index if u >= 0)
            if units != list(range(site.hidden)):
                raise HiapError(f"{site.name}: side parameter {t.param} does not hold each of the "
                                f"{site.hidden} neurons exactly once; cannot cost neuron removal. "
                                "Prepare with PruneConfig(neurons=False) to gate only whole blocks")
            self._cut(t.param, t.axis, len(t.index), b * M + (len(t.index) - site.hidden))

    def _cut(self, param: str, axis: int, size: int, kept: sympy.Expr) -> None:
        self.cuts[(param, axis)].append((size, kept))

    # --- nodes -------------------------------------------------------------------------------

    def node_expr(self, n: fx.Node) -> Optional[sympy.Expr]:
        dense = measured_macs(n)
        if not dense:
            return None
        name = op_name(n)
        dep = n.name in self.cg.input_dependent
        if node_shape(n) is None:  # a region returning several values (export's grad-mode
            # wrapper around a rotary table): MACs we do not model, a constant term
            if n.name in self.kernels:
                raise HiapError(f"internal: attention kernel {n.name} returns no single tensor; "
                                "please report this model")
            return self.rows(dense, dep)
        out = tensor_shape(n)
        if node_macs(n) != dense:  # an op whose MACs we do not model: a constant term
            if n.name in self.kernels or self._weight_is_cut(n):
                raise HiapError(f"internal: node {n.name} of a gated site has {dense} MACs by the "
                                f"counter but {node_macs(n)} by its shapes; please report this model")
            return self.rows(dense, dep)
        if n.name in self.kernels:
            return self._kernel_expr(n, dep)
        if name in ("linear", "conv1d", "conv2d", "conv3d"):
            w = arg_node(n, 1)
            w_shape = tensor_shape(w)
            rows = math.prod(out[:-1]) if name == "linear" else out[0] * math.prod(out[2:])
            param = str(w.target) if w.op == "get_attr" else None
            factors = []
            for axis, size in enumerate(w_shape):
                cuts = self.cuts.get((param, axis), []) if param else []
                factors.append(sympy.Integer(size) - sympy.Add(*[s - k for s, k in cuts]))
            expr = self.rows(rows, dep) * sympy.Mul(*factors)
            if any(f.free_symbols for f in factors):
                self.terms[n.name] = NodeTerm("weighted", factors=tuple(factors))
            if sum(1 for f in factors if f.free_symbols) > 1:
                expr = self._idempotent(sympy.expand(expr))
            return expr
        if name == "matmul":
            a = tensor_shape(n.args[0])
            return self.rows(math.prod(out[:-1]), dep) * out[-1] * a[-1]
        return self.rows(dense, dep)  # other MAC ops: fixed per sample

    def _weight_is_cut(self, n: fx.Node) -> bool:
        w = n.args[1] if len(n.args) > 1 else None
        return isinstance(w, fx.Node) and w.op == "get_attr" and any(
            p == str(w.target) for p, _ in self.cuts)

    def _kernel_expr(self, n: fx.Node, dep: bool) -> sympy.Expr:
        heads, head_sum, role, key_axis = self.kernels[n.name]
        if role == "heads":  # the dense work of one head, times the live heads
            return self.rows(measured_macs(n) // heads, dep) * head_sum
        a = tensor_shape(n.args[0])
        if role == "sdpa":  # rows of q per head x key tokens
            rows, keys = math.prod(a[:-1]), tensor_shape(n.args[1])[key_axis]
        else:
            out = tensor_shape(n)  # q @ k^T: key tokens are out[-1]; p @ v: they are contracted
            rows, keys = math.prod(out[:-1]), (out[-1] if role == "qk" else a[-1])
        return self.rows(rows // heads, dep) * self.tok(keys) * head_sum

    def _idempotent(self, expr: sympy.Expr) -> sympy.Expr:
        """Replace u**k by u for 0/1 unit symbols (exact for hard values and for expectations)."""
        return expr.replace(lambda e: e.is_Pow and e.base in self.unit_symbols and e.exp.is_Integer,
                            lambda e: e.base)


def operand_path(nodes: Mapping[str, fx.Node], site: AttentionSite, role: str) -> set[fx.Node]:
    """The nodes from a q/k/v projection (excluded) to the kernel's operand of that role."""
    core, av = nodes[site.core_nodes[0]], nodes[site.core_nodes[-1]]
    operand = {"q": arg_node(core, 0), "k": arg_node(core, 1),
               "v": arg_node(av, 1) if site.kind == "manual" else arg_node(core, 2)}[role]
    return region_between({nodes[getattr(site, role).node]}, operand)


def term_nodes(cg: CapturedGraph, nodes: Mapping[str, fx.Node], site: AttentionSite) -> set[fx.Node]:
    """The nodes of the site's logits-side terms computed from q or k (relative positions)."""
    core = nodes[site.core_nodes[0]]
    dependent = lambda n: n.name in cg.input_dependent  # noqa: E731
    sources = scaling_chain(arg_node(core, 0), dependent) | scaling_chain(arg_node(core, 1), dependent)
    found: set[fx.Node] = set()
    for name in site.logits_terms:
        found |= region_between(sources, nodes[name])
    return found


def output_stats(nodes: Mapping[str, fx.Node], site: AttentionSite) -> set[fx.Node]:
    """Width statistics between the kernel output and the output projection (a sub-norm's):
    they go with the attention (finalize computes them from its compact output)."""
    av, out = nodes[site.core_nodes[-1]], nodes[site.out.node]
    return {n for n in region_between([av], out) if in_family(op_name(n), "width_stat")}


def padded_width(live: list[sympy.Expr], kept: list[sympy.Expr], full: int) -> sympy.Expr:
    """The width every live head is padded to: the widest kept count among live heads (the full
    width when the count is not gated; with no live head the head count is 0 anyway)."""
    if not any(isinstance(k, sympy.Symbol) for k in kept):
        return sympy.Integer(full)
    return Widest(*[x * k for x, k in zip(live, kept)])


def kernel_width(wq: sympy.Expr, wv: sympy.Expr, full: int) -> sympy.Expr:
    """The one head width of a fused kernel whose q/k and v widths are padded to the wider."""
    if wq == full or wv == full:
        return sympy.Integer(full)
    return Widest(wq, wv)


def measured_macs(n: fx.Node) -> int:
    """MACs of a node as the reference counter measured them (propagate with ``count=True``),
    or from its shapes when it was not measured."""
    measured = recorded_macs(n)
    return measured if measured is not None else node_macs(n)


def build_cost_model(cg: CapturedGraph, plan: Plan, bundles: Mapping[str, nn.Module]) -> CostModel:
    """The cost model of the gated graph of ``cg`` (shapes recorded by the propagate pass)."""
    b = _Builder(cg, plan, bundles)
    for site in plan.attention:
        b.attention(site)
    for ffn_site in plan.ffn:
        b.ffn(ffn_site)
    node_exprs: dict[str, sympy.Expr] = {}
    owners = _dies_with(cg, plan)
    factored: set[str] = set()
    for n in cg.gm.graph.nodes:
        e = b.node_expr(n)
        if e is not None:
            if n.name in owners:  # dies with the sites it feeds (a bias-table MLP, a block's
                # attention inside the branch of its FFN); kept factored: a product over heads
                # would expand into 2^heads terms
                e = e * sympy.Mul(*[b.site_alive[s] for s in owners[n.name]])
                factored.add(n.name)
            node_exprs[n.name] = e
    model = CostModel(expr=sympy.Add(*node_exprs.values()), node_exprs=node_exprs, sources=b.sources,
                      batch=b.batch, tokens=b.tokens, example_batch=b.b0, example_tokens=b.t0,
                      group_sizes=b.group_sizes, factored_nodes=factored, terms=b.terms,
                      site_alive=b.site_alive)
    _check_dense(model, cg)
    return model


def _dies_with(cg: CapturedGraph, plan: Plan) -> dict[str, list[str]]:
    """MAC nodes that die with sites other than their own: nodes whose results reach the model
    output only through one site (a per-head bias MLP, a spatial-reduction conv feeding only
    k/v), and, for a site on a residual branch (which leaves the graph when it closes), every
    node all of whose paths to the output pass through its output projection (a whole attention
    inside the residual branch of the FFN after it, as in EdgeNeXt's blocks). Returns node name
    -> those sites."""
    order = list(cg.gm.graph.nodes)
    own: dict[str, set[str]] = {}
    outs: dict[str, str] = {}
    nodes = {n.name: n for n in order}
    for s in plan.attention:
        own[s.name] = {s.q.node, s.k.node, s.v.node, s.out.node, *s.core_nodes,
                       *([s.out_gate.node] if s.out_gate else []),
                       *(n.name for n in term_nodes(cg, nodes, s)),
                       *(n.name for n in output_stats(nodes, s))}
        if s.residual is not None:
            outs[s.name] = s.out.node
    for f in plan.ffn:
        own[f.name] = {p.node for p in f.inputs} | {f.out.node}
        if f.residual is not None:
            outs[f.name] = f.out.node
    owners: dict[str, list[str]] = {n: [s] for n, s in _exclusive_nodes(cg, own).items()}
    for s in plan.attention:
        if s.passthrough and s.residual is not None:
            # the projection also reads features passed through: it still runs with no head
            # live, until the whole branch leaves with the last head
            owners[s.out.node] = [s.name]
    for site, out in outs.items():
        dead = {out}
        for n in reversed(order):
            if n.name != out and n.op != "output" and n.users and all(u.name in dead for u in n.users):
                dead.add(n.name)
        for n in order:
            if n.name in dead and n.name not in own[site] and measured_macs(n) and \
                    site not in owners.get(n.name, []):
                owners.setdefault(n.name, []).append(site)
    return owners


def _exclusive_nodes(cg: CapturedGraph, own: dict[str, set[str]]) -> dict[str, str]:
    """MAC nodes outside the sites (``own``: site -> its nodes) whose results reach the model
    output only through one site. Returns node name -> site name."""
    site_of = {n: site for site, nodes in own.items() for n in nodes}
    owner: dict[str, str] = {}
    for n in cg.gm.graph.nodes:
        if n.name in site_of or not measured_macs(n):
            continue
        sites: set[str] = set()
        todo, seen, escapes = [n], {n}, False
        while todo and not escapes:
            cur = todo.pop()
            for u in cur.users:
                if u.name in site_of:
                    sites.add(site_of[u.name])
                elif u.op == "output":
                    escapes = True
                elif u not in seen:
                    seen.add(u)
                    todo.append(u)
        if not escapes and len(sites) == 1:
            owner[n.name] = sites.pop()
    return owner


def _check_dense(model: CostModel, cg: CapturedGraph) -> None:
    """Every node's expression must give its measured MACs with all units on."""
    subs = {s.symbol: v for s, v in zip(model.sources, model.dense_values())}
    subs[model.batch] = model.example_batch
    if model.tokens is not None:
        subs[model.tokens] = model.example_tokens
    nodes = {n.name: n for n in cg.gm.graph.nodes}
    for name, e in model.node_exprs.items():
        got, want = e.xreplace(subs), measured_macs(nodes[name])
        if got != want:
            raise HiapError(f"internal: the cost expression of node {name} gives {got} MACs on the "
                            f"dense model, the counter measured {want}; please report this model")
