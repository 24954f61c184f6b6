"""Graph queries: reachability over fx nodes (descendants, ancestors, data ancestors)."""

from __future__ import annotations

import math
from typing import Callable, Iterable

from torch import fx

from hiap_fx.graph.ir import is_tensor_node, node_shape
from hiap_fx.graph.ops import in_family, op_name


def reach(node: fx.Node, step: Callable[[fx.Node], Iterable[fx.Node]]) -> set[fx.Node]:
    """Every node reached from ``node`` by repeating ``step`` (``node`` itself excluded)."""
    seen: set[fx.Node] = set()
    todo = [node]
    while todo:
        for nxt in step(todo.pop()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def descendants(node: fx.Node) -> set[fx.Node]:
    return reach(node, lambda n: n.users)


def ancestors(node: fx.Node) -> set[fx.Node]:
    return reach(node, lambda n: n.all_input_nodes)


def data_ancestors(node: fx.Node) -> set[fx.Node]:
    """Ancestors through data arguments (``x.type_as(other)`` reads only the dtype of ``other``)."""

    def inputs(n: fx.Node) -> list[fx.Node]:
        if op_name(n) == "type_as" and isinstance(n.args[0], fx.Node):
            return [n.args[0]]
        return n.all_input_nodes

    return reach(node, inputs)


def data_descendants(node: fx.Node) -> set[fx.Node]:
    """Descendants through data arguments: not through shape, dtype or device reads (a tensor
    built from ``x.shape`` alone does not carry ``x``'s values)."""

    def users(n: fx.Node) -> list[fx.Node]:
        return [u for u in n.users if not (shape_query(u) or op_name(u) in ("dim", "numel") or (
            u.op == "call_function" and u.target is getattr and len(u.args) == 2
            and u.args[1] in ("dtype", "device", "shape", "ndim")))]

    return reach(node, users)


def region_between(sources: Iterable[fx.Node], target: fx.Node) -> set[fx.Node]:
    """The nodes on paths from any of ``sources`` to ``target`` (``target`` included, the sources
    not); empty when no source reaches it."""
    up = ancestors(target)
    region: set[fx.Node] = set()
    for src in sources:
        if src in up:
            region |= descendants(src) & up
    return region | {target} if region or any(s in up for s in sources) else set()


def scaling_chain(operand: fx.Node, dependent: Callable[[fx.Node], bool]) -> set[fx.Node]:
    """``operand`` and the nodes it is computed from by scalings (``q * scale``: one input that
    ``dependent`` holds to depend on the model input, the others one-element constants)."""
    chain = {operand}
    cur = operand
    while op_name(cur) in ("mul", "div"):
        data = [a for a in cur.all_input_nodes if dependent(a) and is_tensor_node(a)]
        consts = [node_shape(a) for a in cur.all_input_nodes if a not in data and is_tensor_node(a)]
        if len(data) != 1 or any(s is None or math.prod(s) != 1 for s in consts):
            break
        cur = data[0]
        chain.add(cur)
    return chain


def shape_query(node: fx.Node) -> bool:
    """``x.shape`` or ``x.size(...)``: a node that reads only its tensor's shape."""
    if node.op == "call_function" and node.target is getattr:
        return len(node.args) == 2 and bool(node.args[1] == "shape")
    return op_name(node) == "size" and node.op in ("call_method", "call_function")


def queried_axes(query: fx.Node) -> set[int] | None:
    """The axes of its tensor a :func:`shape_query` reads (``x.size(i)``, ``x.shape[i]``,
    ``x.shape[a:b]``, counted from 0); ``None`` when it may read every axis (``x.size()``,
    ``x.shape`` used whole)."""
    x = query.args[0]
    shape = node_shape(x) if isinstance(x, fx.Node) else None
    if shape is None:
        return None
    rank = len(shape)
    if op_name(query) == "size":
        dim = query.args[1] if len(query.args) > 1 else query.kwargs.get("dim")
        return {dim % rank} if isinstance(dim, int) else None
    axes: set[int] = set()
    for user in query.users:
        if op_name(user) != "getitem" or len(user.args) != 2:
            return None
        key = user.args[1]
        if isinstance(key, int):
            axes.add(key % rank)
        elif isinstance(key, slice):
            axes.update(range(rank)[key])
        else:
            return None
    return axes


def width_stat_source(node: object) -> fx.Node | None:
    """The width-statistics node (op family ``width_stat``) ``node`` is read from through data
    movement (``stats[..., 0:1]``), or ``None``."""
    while isinstance(node, fx.Node):
        name = op_name(node)
        if in_family(name, "width_stat"):
            return node
        if not in_family(name, "movement") or not node.args:
            return None
        node = node.args[0]
    return None
