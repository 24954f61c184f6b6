"""The state of one slicing run and the operand layouts it rebuilds attention into."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Sequence, cast

import torch
from torch import fx
from torch.fx.node import map_aggregate

from hiap_fx.errors import HiapError
from hiap_fx.gated.decisions import Decisions
from hiap_fx.graph.batch_shapes import shapes_at_batch
from hiap_fx.graph.editing import Params
from hiap_fx.graph.flow import IndexFlow, feature_index, varies_along
from hiap_fx.graph.ir import CapturedGraph, is_tensor_node, node_shape, tensor_shape
from hiap_fx.graph.ops import in_family, op_name
from hiap_fx.graph.queries import ancestors, data_ancestors, descendants, queried_axes, shape_query
from hiap_fx.plan import AttentionSite, Plan


@dataclass
class OperandLayout:
    """How to build an operand at its boundary node from a linear's output [lead..., heads*dims]."""

    boundary: fx.Node
    perm: list[int]  # boundary axis i (new axes left out) <- axis perm[i] of [lead..., head, dim]
    has_head_axis: bool
    new_axes: list[int]  # size-1 axes of the boundary that come from no source axis
    merges: list[tuple[int, int]]  # runs of lead axes flattened into one (last run first)
    splits: list[tuple[int, tuple[int, ...]]]  # then lead axes unflattened into sizes (last first)
    replay: list[fx.Node]  # original path nodes after the boundary, in graph order
    operand: fx.Node
    prefix: list[fx.Node] = field(default_factory=list)  # per-row ops replayed on the new rows first
    fold: Optional[int] = None  # perm[fold] (the batch) and perm[fold + 1] (the heads) are one
    # boundary axis: heads folded into the batch axis, flattened after the permute
    pointwise: list[fx.Node] = field(default_factory=list)  # element-wise ops with scalar
    # operands between the prefix and the boundary (IFormer's sigmoid after a movedim): applied
    # to the rebuilt operand at the boundary (they commute with moving and selecting rows)
    kv_repeat: Optional[fx.Node] = None  # grouped-query k/v whose boundary holds one slot per kv
    # head (normalised and rotated per kv head before this ``repeat_interleave`` to the query
    # heads): rebuilt for the live kv heads, the repeat replaced by a selection of the live ones


class SliceContext:
    """One slicing run over ``cg`` (shapes and values propagated) for ``decisions``; with no
    decisions it only reads the graph (the prepare-time sliceability check)."""

    def __init__(self, cg: CapturedGraph, plan: Plan, decisions: dict[str, torch.Tensor]) -> None:
        self.cg, self.gm, self.graph = cg, cg.gm, cg.gm.graph
        self.plan, self.decisions = plan, Decisions(decisions)
        self.flow = IndexFlow(cg)
        self.nodes = {n.name: n for n in self.graph.nodes}
        self.params = Params(cg.gm)
        self._batch2: Optional[dict[str, tuple[int, ...]]] = None
        self.rebuilt: dict[fx.Node, fx.Node] = {}  # operand-path node -> its rebuilt copy

    def read_batch_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every node's shape at a batch of two (empty when fake tensors cannot run the graph);
        read once, before any weight is cut."""
        if self._batch2 is None:
            self._batch2 = shapes_at_batch(self.cg, 2) or {}
        return self._batch2

    def batch_first(self, node: fx.Node) -> bool:
        """Whether ``node``'s axis 0 is the batch axis of the first input and every other axis
        keeps its size at another batch (compared with its shapes at a batch of two)."""
        first = self.cg.example_inputs[0] if self.cg.example_inputs else None
        s1 = node_shape(node)
        if first is None or first.dim() == 0 or not s1 or s1[0] != first.shape[0]:
            return False
        s2 = self.read_batch_shapes().get(node.name)
        return s2 is not None and len(s1) == len(s2) and s2[0] == 2 and s2[1:] == s1[1:] != () \
            and (first.shape[0] != 2 or s1[0] == 2)

    def fixed_or_batch(self, node: fx.Node, axes: set[int], batch: bool = True) -> bool:
        """Whether every one of ``axes`` of ``node`` keeps its size at another batch, or (with
        ``batch``) is axis 0 holding the batch of the first input alone."""
        s1, s2 = node_shape(node), self.read_batch_shapes().get(node.name)
        if s1 is None or s2 is None or len(s1) != len(s2):
            return False
        return all(s1[a] == s2[a] or batch and a == 0 and self.batch_first(node) for a in axes)

    def folded_axis(self, node: fx.Node) -> Optional[int]:
        """The axis of ``node`` that holds the batch and more (heads folded into the batch axis,
        ``reshape(B * heads, N, d)``): recorded at a batch of one, the only axis that doubles at
        a batch of two and was not of size 1; ``None`` if there is none (or batch > 1)."""
        first = self.cg.example_inputs[0] if self.cg.example_inputs else None
        shape = node_shape(node)
        if first is None or first.dim() == 0 or first.shape[0] != 1 or not shape or shape[0] == 1:
            return None  # (a leading axis of 1 is the batch, alone: nothing to run)
        s1, s2 = node_shape(node), self.read_batch_shapes().get(node.name)
        if s1 is None or s2 is None or len(s1) != len(s2):
            return None
        grown = [i for i in range(len(s1)) if s1[i] != s2[i]]
        if len(grown) == 1 and s1[grown[0]] > 1 and s2[grown[0]] == 2 * s1[grown[0]]:
            return grown[0]
        return None


def kernel_operand(ctx: SliceContext, site: AttentionSite, role: str) -> fx.Node:
    """The node the kernel reads as its ``role`` ("q", "k" or "v") operand; for "out_gate", the
    gate the kernel output is multiplied by (``AttentionSite.out_gate_mul``)."""
    if role == "out_gate":
        mul, av = ctx.nodes[cast(str, site.out_gate_mul)], ctx.nodes[site.core_nodes[-1]]
        below = descendants(av) | {av}
        return next(a for a in mul.all_input_nodes if a not in below)
    core = ctx.nodes[site.core_nodes[0]]
    O = core.args[{"q": 0, "k": 1, "v": 2}[role]] if site.kind == "sdpa" or role != "v" else \
        ctx.nodes[site.core_nodes[-1]].args[1]
    return cast(fx.Node, O)


def operand_layout(ctx: SliceContext, site: AttentionSite, role: str) -> OperandLayout:
    """Find the deepest pure-movement node between a projection and the kernel operand that has
    the operand's head/dim structure, so the operand can be rebuilt there from kept rows."""
    proj = getattr(site, role)
    P = ctx.nodes[proj.node]
    O = kernel_operand(ctx, site, role)
    full_path = (descendants(P) & (data_ancestors(O) | {O})) | {O}
    # shape queries (x.size(0), x.shape) are not data; those after the boundary are replayed
    path = {n for n in full_path if is_tensor_node(n)}
    chain: list[fx.Node] = []
    prefix_run: set[fx.Node] = set()
    late: list[fx.Node] = []  # element-wise ops further on (see OperandLayout.pointwise)
    cur = P
    while True:
        nxt = [u for u in cur.users if u in path and reads_data(u, cur)]
        # element-wise ops right after the projection (a clamp) are replayed on the new rows;
        # later ones are simply replayed after the boundary
        pointwise = len(nxt) == 1 and scalar_pointwise(ctx, nxt[0], cur)
        leading = pointwise and (cur is P or cur in prefix_run)
        if len(nxt) != 1 or not (in_family(op_name(nxt[0]), "movement") or row_op(ctx, nxt[0]) or pointwise):
            break
        if leading:
            prefix_run.add(nxt[0])
        elif pointwise:
            late.append(nxt[0])
        cur = nxt[0]
        chain.append(cur)
    prefix, start = row_prefix(ctx, site, P, chain, late)
    candidates = ([start] if prefix else []) + chain[len(prefix):]
    p_shape = tensor_shape(P)
    table = torch.tensor(proj.index, dtype=torch.float64)
    order = {n: i for i, n in enumerate(ctx.graph.nodes)}
    # a boundary before the first late element-wise op replays it (and anything reading the
    # operand there, like a relative-position term) as it is; only past it when none fits
    first_late = candidates.index(late[0]) if late and late[0] in candidates else len(candidates)
    repeat = kv_repeat(ctx, site, role, full_path)
    for B in [*reversed(candidates[:first_late]), *reversed(candidates[first_late:])]:
        perm = boundary_perm(ctx, start, p_shape, B, table)
        kv_slots = perm is None and repeat is not None and B in ancestors(repeat)
        if kv_slots:  # one slot per kv head: the table's rows of the first query head of each
            perm = boundary_perm(ctx, start, p_shape, B, kv_table(site, table))
        if perm is None:
            continue
        after = descendants(B) & full_path
        before = ancestors(B)
        if any(n not in after and n is not B and n not in before for n in path):
            continue
        if B is start and prefix:
            after = after - set(prefix)
        return OperandLayout(B, perm[0], perm[1], perm[2], perm[3], perm[4],
                             sorted(after, key=order.__getitem__), O, prefix, perm[5],
                             [n for n in late if n in before or n is B], repeat if kv_slots else None)
    raise HiapError(f"{site.name}: cannot rebuild the {role} operand of {site.core_nodes[0]}: no "
                    f"point between {P.name} and the kernel holds its heads and dims as separate "
                    "axes. Prepare with PruneConfig(heads=False, head_dims=False) to keep this "
                    "attention whole, or report the model")


def kv_table(site: AttentionSite, table: torch.Tensor) -> torch.Tensor:
    """A per-query-head k/v row table reduced to one row per kv head (its first query head)."""
    if table.shape[0] != site.num_heads:
        return table
    first = {kv: h for h, kv in reversed(list(enumerate(site.kv_of_head)))}
    return table[[first[kv] for kv in range(site.num_kv_heads)]]


def kv_repeat(ctx: SliceContext, site: AttentionSite, role: str, path: set[fx.Node]) -> Optional[fx.Node]:
    """The ``repeat_interleave`` on ``role``'s path that turns the kv heads of grouped-query
    attention into the query heads (recorded shapes: kv heads along its ``dim`` in, query heads
    out), if there is one."""
    if role not in ("k", "v") or site.num_kv_heads >= site.num_heads:
        return None
    for n in path:
        if op_name(n) != "repeat_interleave" or not n.args or not isinstance(n.args[0], fx.Node):
            continue
        dim = n.kwargs.get("dim", n.args[2] if len(n.args) > 2 else None)
        s_in, s_out = node_shape(n.args[0]), node_shape(n)
        if isinstance(dim, int) and s_in is not None and s_out is not None and len(s_in) == len(s_out) \
                and s_in[dim] == site.num_kv_heads and s_out[dim] == site.num_heads:
            return n
    return None


def _split_order(at: torch.Tensor, axes: list[int], size: int) -> Optional[list[int]]:
    """The order (major to minor) in which ``axes`` of a boundary hold the row-major split of one
    source axis of ``size`` whose coordinate ``at`` carries; ``None`` if they do not."""
    shape = tuple(at.shape)
    if math.prod(shape[i] for i in axes) != size:
        return None
    for order in itertools.permutations(axes):
        code = torch.zeros(shape, dtype=torch.float64)
        for i in order:
            code = code * shape[i] + feature_index(shape, i)
        if torch.equal(at, code):
            return list(order)
    return None


SizeFix = Literal["copy", "detach"]


def shape_queries(ctx: SliceContext, site: AttentionSite) -> dict[fx.Node, Optional[SizeFix]]:
    """Shape queries of nodes on the site's q/k/v paths (LowFormer's ``N, _, h, w = y.size()``
    of the projection output, Hiera's ``H, W = q.shape[1:3]`` after pooling), each with how its
    readers outside the operands (an output reshape) keep their values without keeping the dense
    operand alive: ``"copy"``, read the operand's rebuilt copy; ``"detach"``, the sizes as
    recorded and the batch from the first input (:func:`detach_sizes`); ``None``: neither (it
    reads an axis that carries projection features, or a batch axis not first). Read before any
    edit (index flow on the recorded graph)."""
    found: dict[fx.Node, Optional[SizeFix]] = {}
    for role in ("q", "k", "v"):
        P = ctx.nodes[getattr(site, role).node]
        shape = node_shape(P)
        if shape is None:
            continue
        operand = kernel_operand(ctx, site, role)
        on_path = descendants(P) & (data_ancestors(operand) | {operand})
        queries = [n for n in on_path if shape_query(n) and n.args[0] in on_path]
        if not queries:
            continue
        lay = operand_layout(ctx, site, role)
        rebuilt = {lay.boundary, *lay.replay}  # the nodes finalize copies for the live heads
        index = ctx.flow.run({P: feature_index(shape, -1)}).index
        for n in queries:
            x = cast(fx.Node, n.args[0])
            axes, at = queried_axes(n), index.get(x)
            fix: Optional[SizeFix] = None
            if axes is not None and isinstance(at, torch.Tensor) and not any(varies_along(at, a) for a in axes):
                fix = "copy" if x in rebuilt else "detach" if ctx.fixed_or_batch(x, axes) else None
            found[n] = fix if found.get(n, fix) == fix else None
    return found


def detach_sizes(ctx: SliceContext, query: fx.Node) -> None:
    """Give the readers of a shape query (see :func:`shape_queries`) the recorded sizes, and the
    batch as the first input's ``size(0)``, so that the queried operand can die."""
    g = ctx.graph
    x = cast(fx.Node, query.args[0])
    shape = tensor_shape(x)
    first = next(n for n in g.nodes if n.op == "placeholder")

    def size(axis: int) -> Any:
        if ctx.fixed_or_batch(x, {axis}) and not ctx.fixed_or_batch(x, {axis}, batch=False):
            with g.inserting_before(query):
                return g.call_method("size", (first, 0))
        return shape[axis]

    def swap(user: fx.Node, value: Any) -> None:
        user.replace_all_uses_with(value) if isinstance(value, fx.Node) else _substitute(user, value)

    if op_name(query) == "size":
        swap(query, size(cast(int, query.args[1] if len(query.args) > 1 else query.kwargs["dim"]) % len(shape)))
        return
    for user in list(query.users):
        key = user.args[1]
        value = size(key % len(shape)) if isinstance(key, int) else \
            tuple(size(a) for a in range(len(shape))[cast(slice, key)])
        swap(user, value)


def _substitute(node: fx.Node, value: Any) -> None:
    """Replace every use of ``node`` by the constant ``value``."""
    for user in list(node.users):
        user.args = map_aggregate(user.args, lambda a: value if a is node else a)
        user.kwargs = map_aggregate(user.kwargs, lambda a: value if a is node else a)


def from_safe_queries(node: fx.Node, queries: dict[fx.Node, Optional[SizeFix]]) -> bool:
    """Whether a size value is computed only from shape queries that :func:`shape_queries`
    can serve without the dense operand (and constants)."""
    roots = [a for a in ancestors(node) | {node} if a in queries]
    return bool(roots) and all(queries[r] is not None for r in roots)


def reads_data(user: fx.Node, node: fx.Node) -> bool:
    """Whether ``user`` reads ``node``'s values (``y.reshape_as(node)`` reads only its shape)."""
    if op_name(user) in ("reshape_as", "view_as", "expand_as", "type_as") and user.args[0] is not node:
        return False
    return True


def row_op(ctx: SliceContext, node: fx.Node) -> bool:
    """A per-row op after a projection: a batch norm over the rows of a (tokens, rows) matrix,
    or of (tokens, rows, 1, 1) (LeViT's linear + BatchNorm1d, ConvNorm), whose statistics and
    affine are sliced with the rows."""
    name = op_name(node, ctx.flow.modules)
    x = node.args[0] if node.args else None
    if not in_family(name, "channel_norm") or not isinstance(x, fx.Node):
        return False
    shape = node_shape(x)
    if node.op == "call_function" and not all(  # an exported batch norm: tensors by argument
            isinstance(a, fx.Node) and a.op == "get_attr" for a in node.args[1:5] if a is not None):
        return False
    return node.op in ("call_module", "call_function") and shape is not None and len(shape) >= 2 \
        and all(s == 1 for s in shape[2:]) and node_shape(node) == shape


def scalar_pointwise(ctx: SliceContext, node: fx.Node, x: fx.Node) -> bool:
    """An element-wise op on ``x`` whose other operands are plain numbers or one-element
    constants (Gemma4's clipped linears: ``clamp(y, lo, hi)``): it acts on each row alike, so
    it is replayed on the kept rows."""
    name = op_name(node, ctx.flow.modules)
    if not (in_family(name, "unary") or in_family(name, "cast") or in_family(name, "binary")):
        return False
    others = [a for a in node.all_input_nodes if a is not x]
    return all(a.name not in ctx.cg.input_dependent and (s := node_shape(a)) is not None
               and math.prod(s) == 1 for a in others) and node_shape(node) == node_shape(x)


def layout_op(ctx: SliceContext, node: fx.Node, x: fx.Node) -> bool:
    """An op between a projection and its operand layout that is replayed on the new rows."""
    return row_op(ctx, node) or scalar_pointwise(ctx, node, x)


def row_prefix(ctx: SliceContext, site: AttentionSite, P: fx.Node, chain: list[fx.Node],
               late: Sequence[fx.Node] = ()) -> tuple[list[fx.Node], fx.Node]:
    """The chain up to the first node from the last per-row op on that holds P's values in P's
    layout again (``bn(y.flatten(0, 1)).reshape_as(y)``, or a clamp itself), and that node;
    ``([], P)`` without per-row ops. ``late`` element-wise ops (after a layout change) are not
    per-row ops of the prefix: they are applied at the boundary."""
    rows = [i for i, n in enumerate(chain) if n not in late and layout_op(ctx, n, chain[i - 1] if i else P)]
    if not rows:
        return [], P
    p_shape = tensor_shape(P)
    code = torch.arange(math.prod(p_shape), dtype=torch.float64).reshape(p_shape)
    at = ctx.flow.run({P: code}).index
    for i in range(rows[-1], len(chain)):
        q = at.get(chain[i])
        if isinstance(q, torch.Tensor) and torch.equal(q, code):
            return chain[:i + 1], chain[i]
    raise HiapError(f"{site.name}: {chain[rows[-1]].name} normalises the rows of {P.name}, but no "
                    "later point holds them in the projection's layout again; prepare with "
                    "PruneConfig(heads=False, head_dims=False) to keep this attention whole, or "
                    "report the model")


Perm = tuple[list[int], bool, list[int], list[tuple[int, int]], list[tuple[int, tuple[int, ...]]],
             Optional[int]]


def boundary_perm(ctx: SliceContext, P: fx.Node, p_shape: tuple[int, ...], B: fx.Node,
                   table: torch.Tensor) -> Optional[Perm]:
    """How boundary ``B`` holds the axes of projection output ``P`` ([lead..., heads*dims], the
    rows read through ``table``): see :class:`OperandLayout` (perm, has_head_axis, new_axes,
    merges, splits, fold); ``None`` if it holds them in no way the rebuild can reproduce."""
    b_shape = node_shape(B)
    if b_shape is None or p_shape is None:
        return None
    idx = ctx.flow.run({P: feature_index(p_shape, -1)}).index.get(B)
    if not isinstance(idx, torch.Tensor) or tuple(idx.shape) != b_shape:
        return None
    lead_axes = len(p_shape) - 1
    target: dict[int, int] = {}  # lead axis of P (size > 1) -> the axis of B it lands on
    split_to: dict[int, list[int]] = {}  # lead axis of P split over several axes of B
    for a in range(lead_axes):
        if p_shape[a] == 1:
            continue
        at = ctx.flow.run({P: feature_index(p_shape, a)}).index.get(B)
        if not isinstance(at, torch.Tensor):
            return None
        varying = [i for i in range(len(b_shape)) if b_shape[i] > 1 and varies_along(at, i)]
        if len(varying) == 1:
            target[a] = varying[0]
            continue
        # a token axis split into windows or a grid (never the batch axis, axis 0)
        order = _split_order(at, varying, p_shape[a]) if varying and a > 0 else None
        if order is None:
            return None
        split_to[a] = order
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
    # after the merges, split axes are unflattened: lead axis m starts at start[m]
    start: dict[int, int] = {}
    extra = 0
    for m in range(lead):
        start[m] = m + extra
        split = next((a for a in split_to if merged_index[a] == m), None)
        if split is not None:
            extra += len(split_to[split]) - 1
    splits = [(merged_index[a], tuple(b_shape[i] for i in order)) for a, order in split_to.items()]
    lead_total = lead + extra
    source = {t: start[merged_index[a]] for a, t in target.items()}
    for a, order in split_to.items():
        source.update({i: start[merged_index[a]] + j for j, i in enumerate(order)})
    rest = [i for i in range(len(b_shape)) if i not in source]
    heads, dims = table.shape
    # (None, d): no head axis; with several heads, they are merged into axis d head-major (a
    # gate multiplying the merged output, IFormer), which the new rows reproduce as they are
    options = [(h, d) for h in rest for d in rest if h != d] + [(None, d) for d in rest]
    # size-1 axes fit several roles (a batch of 1, one head, head dim 1), which index flow
    # cannot tell apart: of the layouts that fit, take the one closest to the source order
    # (fewest inversions; a head axis where one fits), so that a batch of 1 stays axis 0 and k^T
    # keeps its dims before its tokens
    fits: list[tuple[tuple[bool, int], Any]] = []
    unplaced = sorted({start[merged_index[a]] for a in range(lead_axes)
                       if a not in target and a not in split_to})  # size 1
    # heads folded into the batch axis: the batch (size 1 here) lives inside the head axis
    folded = ctx.folded_axis(B)
    batch_src = start[merged_index[0]] if lead_axes and 0 not in target and 0 not in split_to else None
    for head_axis, dim_axis in options:
        ones = [i for i in rest if i not in (head_axis, dim_axis)]
        if any(b_shape[i] != 1 for i in ones) or len(ones) < len(unplaced) - (
                folded is not None and folded == head_axis and batch_src is not None):
            continue
        t = idx.movedim(dim_axis, -1)
        if head_axis is None:
            if t.shape[-1] != heads * dims:
                continue
            t = t.unflatten(-1, (heads, dims))
        else:
            t = t.movedim(head_axis if head_axis < dim_axis else head_axis - 1, -2)
        if tuple(t.shape[-2:]) != (heads, dims):
            continue
        flat = t.reshape(-1, heads, dims)
        if not torch.equal(flat, table.expand_as(flat)):
            continue
        fold = folded is not None and folded == head_axis and batch_src is not None
        left = [u for u in unplaced if not (fold and u == batch_src)]
        # size-1 lead axes take the first size-1 axes of B, in order; the rest are new axes
        placed = dict(source)
        placed.update(zip(ones, left))
        new_axes = [i for i in ones if i not in placed]
        # source axes: [lead..., head, dim] (or [lead..., dim] without a head axis)
        dim_src = lead_total + 1 if head_axis is not None else lead_total
        perm: list[int] = []
        for i in range(len(b_shape)):
            if i in new_axes:
                continue
            if i == head_axis and fold and batch_src is not None:
                perm.append(batch_src)
            perm.append(placed[i] if i in placed else (lead_total if i == head_axis else dim_src))
        if sorted(perm) != list(range(dim_src + 1)):
            continue
        inversions = sum(a > b for i, a in enumerate(perm) for b in perm[i + 1:])
        at = perm.index(batch_src) if fold and batch_src is not None else None
        fits.append(((head_axis is None, inversions), (perm, head_axis is not None, new_axes, sorted(merges, reverse=True),
                                  sorted(splits, reverse=True), at)))
    return min(fits, key=lambda f: f[0])[1] if fits else None
