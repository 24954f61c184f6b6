"""Kernel output rearranged before the output projection: replay those ops on the compact heads.

Many hybrid and windowed attentions do not feed ``(attn @ v)`` straight into the output
projection: the token axis is reshaped into H x W, windows or grids are reversed, or the output
is made sequence-first, and only then comes the projection. Heads stay a separate axis until
they are merged into the channel axis, so the compact kernel output (live heads, padded width)
can go through the *same* ops (element-wise ones too: LeViT's activation before its projection;
padded slots meet zero columns of the projection). Their size arguments may name the head count or the head width
(``reshape(B, H, W, heads * dim)``), or sizes that merely equal them (a window of 8 beside 8
heads): which occurrences to rewrite is decided by trying, smallest change first, and accepting
the first replay that provably moves every token where the original did and yields one
permutation of the compact channels at every position (index flow on the recorded values).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Callable, Collection, Iterator, Optional, cast

import torch
from torch import fx
from torch.fx.node import map_aggregate

from hiap_fx.errors import HiapError
from hiap_fx.graph.flow import SENTINEL, IndexFlow, feature_index
from hiap_fx.graph.ir import is_tensor_node, node_shape, tensor_shape
from hiap_fx.graph.ops import SIZE_KWARGS, in_family, op_kind, op_name
from hiap_fx.graph.queries import data_ancestors, descendants, width_stat_source

#: At most this many size occurrences are tried in combination (2**n replays at worst).
MAX_CHOICES = 6

Choice = tuple[fx.Node, Any]  # (node, argument position or kwarg name)


@dataclass
class OutputReplay:
    """How the compact kernel output becomes the output projection's input."""

    chain: list[fx.Node]  # original movement ops from the kernel output to the projection input
    rewrite: dict[Choice, dict[int, int]]  # size occurrences to rewrite, and how
    order: list[tuple[int, int]]  # projection input channel -> (live head position, slot), or
    # (PASSED, channel of the dense projection input) for a feature concatenated on the way


#: head position of an ``OutputReplay.order`` entry that is a passed-through feature
PASSED = -1


def moves_only(name: str) -> bool:
    """Whether canonical op ``name`` only moves, casts or copies data."""
    return in_family(name, "movement") or in_family(name, "cast") or name in (
        "contiguous", "clone", "dropout", "identity")


def output_chain(av: fx.Node, proj_input: fx.Node, modules: dict[str, Any],
                 carried: Collection[fx.Node] = (), passed: Collection[fx.Node] = ()) -> list[fx.Node]:
    """The data-path nodes from the kernel output ``av`` to ``proj_input``, in graph order; every
    one must move data or act element-wise (else :class:`HiapError`), and meets no other
    activation than those in ``carried`` (the queries of a residual pooling or a gate multiplying
    the output, which finalize rebuilds for the live heads) or, in a concatenation, in ``passed`` (features that pass
    through unchanged); ``modules`` names the graph module's submodules."""
    if proj_input is av:
        return []
    path = descendants(av) & (data_ancestors(proj_input) | {proj_input})
    graph = av.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    # shape queries of the kernel output or of the chain come along (they follow the new sizes)
    chain = sorted(path, key=order.__getitem__)
    for n in chain:
        if not is_tensor_node(n):
            continue
        name = op_name(n, modules)
        if not (moves_only(name) or in_family(name, "unary") or in_family(name, "activation")
                or in_family(name, "width_stat")
                or name in ("add", "mul") and any(a in carried for a in n.all_input_nodes)
                or name == "mul" and any(a in path and width_stat_source(a) is not None for a in n.all_input_nodes)):
            raise HiapError(f"{n.name} ({name}) between the kernel output {av.name} and the output "
                            f"projection input {proj_input.name} neither moves data nor acts "
                            "element-wise")
        other = [a for a in n.all_input_nodes if a not in path and a is not av and a not in carried
                 and a.op != "get_attr" and is_tensor_node(a) and not (name == "cat" and (
                     a in passed or 0 in (node_shape(a) or ())))]  # an empty operand adds nothing
        if other and not in_family(name, "cast"):
            raise HiapError(f"{n.name} ({name}) combines the kernel output {av.name} with "
                            f"{other[0].name} before the output projection")
    return chain


def _is_shape(node: Any) -> bool:
    """``x.shape`` or ``x.size()``."""
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_function" and node.target is getattr:
        return len(node.args) == 2 and bool(node.args[1] == "shape")
    return op_name(node) == "size" and len(node.args) == 1


def _shape_axes(node: fx.Node) -> Optional[list[int]]:
    """The axes of the shape queries a size node is computed from (``x.shape[i]``,
    ``x.size(i)``, arithmetic on them); ``None`` for anything else."""
    axes: list[int] = []
    todo, seen = [node], set()
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        name = op_name(n)
        if name == "size" and len(n.args) > 1 and isinstance(n.args[1], int):
            base, axis = n.args[0], n.args[1]
        elif name == "getitem" and isinstance(n.args[1], int) and _is_shape(n.args[0]):
            base, axis = cast(fx.Node, n.args[0]).args[0], n.args[1]
        elif n.op == "call_function" and not is_tensor_node(n) and n.all_input_nodes:
            todo.extend(n.all_input_nodes)  # integer arithmetic on sizes
            continue
        else:
            return None
        if not isinstance(base, fx.Node) or node_shape(base) is None:
            return None
        axes.append(axis % len(tensor_shape(base)))
    return axes


def _recorded_int(flow: IndexFlow, v: Any) -> Optional[int]:
    """The value of a size argument: an int, or a node whose recorded value is an int and that
    is computed from no axis 0 of a shape (axis 0 carries the batch: never baked in)."""
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, fx.Node):
        axes = _shape_axes(v)
        if axes is None or 0 in axes:
            return None
        try:
            val = flow.value(v)
        except KeyError:
            return None
        return val if isinstance(val, int) and not isinstance(val, bool) else None
    return None


def _size_choices(flow: IndexFlow, chain: list[fx.Node],
                  pairs: list[tuple[int, int]]) -> list[tuple[Choice, int, int]]:
    """Every (node, arg, old, new) whose size arguments hold the ``old`` of one of the ``pairs``,
    as a literal or as a node recorded with that value (``C`` of ``B, N, C = x.shape``); an
    occurrence may name either of two equal sizes (head count = head width): both are offered."""
    found: list[tuple[Choice, int, int]] = []

    inside = set(chain)

    def values(v: Any) -> Iterator[int]:
        if isinstance(v, (list, tuple)):
            for x in v:
                yield from values(x)
        elif v not in inside and (i := _recorded_int(flow, v)) is not None:
            yield i

    for n in chain:
        where = op_kind(op_name(n)).size_args
        if not is_tensor_node(n) and op_name(n) in ("mul", "add", "sub", "floordiv", "truediv"):
            where = "all"  # integer arithmetic on sizes (``t.shape[-1] * num_heads``)
        if where is None:
            continue
        positions: list[Any] = list(range(len(n.args))) if where == "all" else \
            list(range(1, len(n.args))) if where == "rest" else [
                p for p in where if isinstance(p, int) and p < len(n.args)]
        positions += [k for k in n.kwargs if k in SIZE_KWARGS]
        for p in positions:
            arg = n.args[p] if isinstance(p, int) else n.kwargs[p]
            held = set(values(arg))
            found.extend(((n, p), old, new) for old, new in pairs if old in held)
    return found


def _rewritten(flow: IndexFlow, n: fx.Node, rewrite: dict[Choice, dict[int, int]],
               inside: set[fx.Node]) -> tuple[tuple, dict]:
    """``n``'s arguments with the chosen size occurrences replaced by their new ints (sizes
    queried from the chain itself are left to follow the new shapes)."""
    def sub(v: Any, table: dict[int, int]) -> Any:
        if isinstance(v, (list, tuple)):
            return type(v)(sub(x, table) for x in v)
        if isinstance(v, fx.Node) and v in inside:
            return v
        i = _recorded_int(flow, v)
        return table[i] if i is not None and i in table else v

    args, kwargs = list(n.args), dict(n.kwargs)
    for (node, p), table in rewrite.items():
        if node is not n:
            continue
        if isinstance(p, int):
            args[p] = sub(args[p], table)
        else:
            kwargs[p] = sub(kwargs[p], table)
    return tuple(args), kwargs


def _without_dropped(n: fx.Node, name: str, env: dict[fx.Node, Any], args: tuple) -> Optional[tuple]:
    """``n``'s mapped ``args`` when some of its inputs were dropped (mapped to ``None``: the
    kernel output when no head is live): a concatenation loses those operands; any other op is
    dropped itself (``None``, as is a concatenation left with nothing). ``args`` unchanged when
    nothing was dropped."""
    if not any(a in env and env[a] is None for a in n.all_input_nodes):
        return args
    if name != "cat" or not isinstance(args[0], (list, tuple)):
        return None
    kept = [a for a in args[0] if a is not None]
    return (kept, *args[1:]) if kept else None


def _execute(flow: IndexFlow, chain: list[fx.Node], start: fx.Node, value: Optional[torch.Tensor],
             rewrite: dict[Choice, dict[int, int]],
             passed: Optional[dict[fx.Node, torch.Tensor]] = None) -> Optional[torch.Tensor]:
    """Run ``chain`` on ``value`` in place of ``start`` (off-path arguments as recorded, the
    ``passed`` features as given; ``value=None``: the kernel output is dropped, see
    :func:`_without_dropped`)."""
    env: dict[fx.Node, Any] = {**(passed or {}), start: value}
    inside = set(chain) | {start}
    for n in chain:
        name = op_name(n, flow.modules)
        if in_family(name, "width_stat"):  # per-position statistics: no features of their own
            env[n] = None if any(env.get(a, 0) is None for a in n.all_input_nodes) else \
                torch.full(tensor_shape(n), SENTINEL, dtype=torch.float64)
            continue
        if is_tensor_node(n) and not moves_only(name):  # element-wise: indices pass through (a
            # dropped input stays dropped)
            on_path = [a for a in n.args if isinstance(a, fx.Node) and a in env and width_stat_source(a) is None]
            env[n] = env[on_path[0]] if on_path else value
            continue
        def arg(a: Any) -> Any:
            if isinstance(a, fx.Node):
                return env[a] if a in env else flow.value(a)
            return a
        node_args, node_kwargs = _rewritten(flow, n, rewrite, inside)
        kept = _without_dropped(n, name, env, cast(tuple, map_aggregate(node_args, arg)))
        if kept is None:
            env[n] = None
            continue
        args, kwargs = kept, cast(dict, map_aggregate(node_kwargs, arg))
        try:
            if n.op == "call_function":
                env[n] = cast(Callable[..., Any], n.target)(*args, **kwargs)
            elif n.op == "call_method":
                env[n] = getattr(args[0], str(n.target))(*args[1:], **kwargs)
            else:
                env[n] = flow.modules[str(n.target)](*args, **kwargs)
        except Exception:  # noqa: BLE001 - a size that does not fit: this rewrite is not it
            return None
    out = env[chain[-1]] if chain else value
    return out if isinstance(out, torch.Tensor) else None


def _passed_codes(passed: Collection[fx.Node]) -> dict[fx.Node, torch.Tensor]:
    """A distinct negative code for every element of the passed-through features."""
    codes: dict[fx.Node, torch.Tensor] = {}
    start = 2.0
    for p in passed:
        shape = tensor_shape(p)
        n = math.prod(shape)
        codes[p] = -(start + torch.arange(n, dtype=torch.float64)).reshape(shape)
        start += n
    return codes


def plan_output_replay(flow: IndexFlow, av: fx.Node, proj_input: fx.Node, head_axis: Optional[int],
                       heads: int, width: int, dim_axis: int = -1,
                       carried: Collection[fx.Node] = (), passed: Collection[fx.Node] = ()) -> OutputReplay:
    """Find how the kernel output, cut to ``heads`` live heads of ``width`` values each (on
    ``dim_axis``), reaches the projection input through the original ops (see the module
    docstring; ``carried``, ``passed``: see :func:`output_chain`; the passed features must land
    in the compact projection input exactly as they did in the dense one)."""
    chain = output_chain(av, proj_input, flow.modules, carried, passed)
    codes = _passed_codes(passed)
    dense = tensor_shape(av)
    proj_shape = tensor_shape(proj_input)
    rank = len(dense)
    h_axis = head_axis % rank if head_axis is not None else None
    d_axis = dim_axis % rank
    H, D = (dense[h_axis] if h_axis is not None else 1), dense[d_axis]
    compact = list(dense)
    compact[d_axis] = width
    if h_axis is not None:
        compact[h_axis] = heads
    # which size each occurrence names is not known: a head count equal to the head width offers both
    pairs = [(H, heads), (D, width), (H * D, heads * width)] if h_axis is not None else [(D, width)]
    extra = proj_shape[-1] - H * D  # passed-through channels: a size naming the whole width
    if extra > 0:
        pairs.append((H * D + extra, heads * width + extra))
    pairs = list(dict.fromkeys((old, new) for old, new in pairs if old != new))
    lead_axes = [a for a in range(rank) if a not in (h_axis, d_axis)]

    def lead_code(shape: list[int]) -> torch.Tensor:
        code = torch.zeros(shape, dtype=torch.float64)
        for a in lead_axes:
            code = code * shape[a] + feature_index(tuple(shape), a)
        return code

    dense_lead = _execute(flow, chain, av, lead_code(list(dense)), {}, codes)
    if dense_lead is None or tuple(dense_lead.shape) != tuple(proj_shape):
        raise HiapError(f"cannot replay the ops from the kernel output {av.name} to "
                        f"{proj_input.name} on index values; please report the model")
    own = _own_columns(dense_lead)
    if own is None or not own.any():
        raise HiapError(f"the features of the kernel output {av.name} and those concatenated with "
                        f"it change places from token to token before {proj_input.name}")
    want = dense_lead[..., int(own.nonzero()[0])]
    dense_passed = dense_lead[..., ~own].flatten(0, -2)
    where_passed = {float(c): j for c, j in zip(dense_passed[0].tolist(), (~own).nonzero().flatten().tolist())}
    channel = feature_index(tuple(compact), d_axis)
    if h_axis is not None:
        channel = channel + feature_index(tuple(compact), h_axis) * width
    choices = _size_choices(flow, chain, pairs)[:MAX_CHOICES]
    for k in range(len(choices) + 1):
        for picked in itertools.combinations(choices, k):
            rewrite: dict[Choice, dict[int, int]] = {}
            for where, old, new in picked:
                rewrite.setdefault(where, {}).setdefault(old, new)
            if sum(len(m) for m in rewrite.values()) < len(picked):
                continue  # one occurrence given two new values
            lead = _execute(flow, chain, av, lead_code(compact) if heads * width else None, rewrite, codes)
            if lead is None or tuple(lead.shape[:-1]) != tuple(proj_shape[:-1]) \
                    or lead.shape[-1] != heads * width + extra:
                continue
            mine = _own_columns(lead)
            if mine is None or int(mine.sum()) != heads * width:
                continue
            ours = lead[..., mine]
            if ours.shape[-1] and not (torch.equal(ours[..., 0], want)
                                       and torch.equal(ours, ours[..., :1].expand_as(ours))):
                continue  # tokens moved elsewhere, or the channel axis mixes token positions
            order = _passed_order(lead[..., ~mine].flatten(0, -2), dense_passed, where_passed, (~own).nonzero())
            if order is None:
                continue
            if not heads * width:  # no head live: only the passed features remain
                return OutputReplay(chain, rewrite, [(PASSED, j) for j in order])
            ch = _execute(flow, chain, av, channel, rewrite, codes)
            if ch is None or (ch == SENTINEL).any():
                continue
            flat = ch[..., mine].reshape(-1, heads * width)
            if not torch.equal(flat, flat[:1].expand_as(flat)) or \
                    sorted(flat[0].long().tolist()) != list(range(heads * width)):
                continue
            kernel = iter(divmod(int(c), width) for c in flat[0].long().tolist())
            passed_order = iter(order)
            full = [next(kernel) if m else (PASSED, next(passed_order)) for m in mine.tolist()]
            return OutputReplay(chain, rewrite, full)
    raise HiapError(f"the kernel output {tuple(dense)} of {av.name} is rearranged before "
                    f"{proj_input.name} {tuple(proj_shape)} in a way hiap_fx cannot replay for fewer "
                    "heads or dims; prepare with PruneConfig(heads=False, head_dims=False) to keep "
                    "this attention whole, or report the model")


def _own_columns(lead: torch.Tensor) -> Optional[torch.Tensor]:
    """Which channels of a replayed projection input hold the kernel output (non-negative
    codes; the passed features carry negative ones), the same at every position; else ``None``."""
    mine = (lead >= 0).flatten(0, -2)
    if mine.numel() == 0 or not torch.equal(mine, mine[:1].expand_as(mine)):
        return None
    return mine[0]


def _passed_order(got: torch.Tensor, dense: torch.Tensor, where: dict[float, int],
                  dense_cols: torch.Tensor) -> Optional[list[int]]:
    """The dense channel of every passed-through channel of the compact replay, when each holds
    exactly the values of one dense channel at every position (``None`` otherwise)."""
    order: list[int] = []
    cols = dense_cols.flatten().tolist()
    for j in range(got.shape[-1]):
        dense_j = where.get(float(got[0, j]))
        if dense_j is None or not torch.equal(got[:, j], dense[:, cols.index(dense_j)]):
            return None
        order.append(dense_j)
    return order if len(set(order)) == len(order) == dense.shape[-1] else None


def replay_output(flow: IndexFlow, graph: fx.Graph, replay: OutputReplay, av: fx.Node,
                  new_out: Optional[fx.Node], carried: Optional[dict[fx.Node, fx.Node]] = None) -> fx.Node:
    """Copy the replay's chain onto ``new_out`` (inserted at the graph's current point;
    ``None``: no head is live, only the concatenated features remain); ``carried``: original
    activation -> its rebuilt copy for the live heads."""
    mapping: dict[fx.Node, Optional[fx.Node]] = {**(carried or {}), av: new_out}
    inside = set(replay.chain) | {av}
    for n in replay.chain:
        args, kwargs = _rewritten(flow, n, replay.rewrite, inside)
        def remap(a: Any) -> Any:
            return mapping.get(a, a) if isinstance(a, fx.Node) else a

        new_args = _without_dropped(n, op_name(n, flow.modules), mapping, cast(tuple, map_aggregate(args, remap)))
        if new_args is None:
            mapping[n] = None
            continue
        new = graph.create_node(n.op, n.target, new_args, cast(dict, map_aggregate(kwargs, remap)))
        new.meta = dict(n.meta)
        mapping[n] = new
    for n in replay.chain:  # statistics read after the projection too (a sub-norm's correction)
        if in_family(op_name(n, flow.modules), "width_stat") and mapping.get(n) is not None:
            n.replace_all_uses_with(cast(fx.Node, mapping[n]), delete_user_cb=lambda u: u not in inside)
    out = mapping[replay.chain[-1]] if replay.chain else new_out
    if out is None:
        raise HiapError(f"nothing of the output of {av.name} reaches the projection when no head is live")
    return out
