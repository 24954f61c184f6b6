"""Graph queries: reachability over fx nodes (descendants, ancestors, data ancestors)."""

from __future__ import annotations

from typing import Callable, Iterable

from torch import fx

from hiap_fx.graph.ops import op_name


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
