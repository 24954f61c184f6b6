"""Fixed forward arguments: keep their names and defaults, and refuse other values at call time.

Capture fixes every forward parameter that the example inputs do not cover (its default, or the
value given in ``PruneConfig.concrete_args``): the graph holds the branch that value selects.
This pass gives each such parameter its own name and the fixed value as default in the graph's
signature, and a guard node that raises ``InputError`` when a call passes anything else, so
``prepared(x, pre_logits=True)`` or ``compact(x, True)`` never silently computes the default's
branch. The guard survives finalize, ``hiap_fx.save``/``load`` and pickling.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import fx

from hiap_fx.errors import InputError
from hiap_fx.registry import SAFE_FUNCTIONS


@fx.node.has_side_effect
def check_fixed_argument(value: Any, fixed: Any, name: str) -> Any:
    """Raise ``InputError`` unless ``value`` is the value ``name`` was fixed to at capture."""
    if isinstance(value, fx.Proxy):  # re-traced (e.g. unpickling a GraphModule): stay one node
        return value.tracer.create_proxy("call_function", check_fixed_argument, (value, fixed, name), {})
    if value is fixed:
        return None
    numbers = isinstance(value, (int, float)) and isinstance(fixed, (int, float)) \
        and not isinstance(value, bool) and not isinstance(fixed, bool)
    try:
        same = not isinstance(value, torch.Tensor) and (type(value) is type(fixed) or numbers) \
            and bool(value == fixed)
    except Exception:
        same = False
    if not same:
        raise InputError(f"forward argument {name!r} was fixed to {fixed!r} when the model was "
                         f"captured, got {_short(value)}: the graph holds only the computation for "
                         f"{fixed!r}. Prepare again with PruneConfig(concrete_args={{{name!r}: ...}}) "
                         "for the value you need")
    return None


SAFE_FUNCTIONS.append(check_fixed_argument)


def _short(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def pin_fixed_arguments(gm: fx.GraphModule, fixed: dict[str, Any], n_inputs: int) -> list[str]:
    """Give the placeholders of the fixed parameters (all after the first ``n_inputs``) their
    parameter names and fixed values as defaults, drop the tracer's own guards on them, and add
    one :func:`check_fixed_argument` guard each. Returns the parameter names pinned."""
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    by_name: dict[str, fx.Node] = {}
    for node in placeholders[n_inputs:]:
        name = _parameter_of(str(node.target), fixed)
        if name is None or name in by_name:
            continue
        _drop_guards(graph, node)
        if not node.users:  # a used value (a flag fed to an op) stays an ordinary input
            by_name[name] = node
    anchor = placeholders[n_inputs - 1] if 0 < n_inputs <= len(placeholders) else None
    if anchor is None:
        return []
    for name, value in fixed.items():  # signature order; parameters export left out are added
        node = by_name.get(name)
        if node is None:
            if any(_parameter_of(str(p.target), {name: None}) for p in placeholders[n_inputs:]):
                continue  # present but used: leave it
            with graph.inserting_after(anchor):
                node = graph.placeholder(name)
        taken = next((n for n in graph.nodes if n.name == name and n is not node), None)
        if taken is not None:
            taken._rename(f"{name}_node")
        node._rename(name)
        node.target = name
        node.args = (value,)
        anchor.append(node)  # placeholders in signature order
        anchor = node
        by_name[name] = node
    last = [n for n in graph.nodes if n.op == "placeholder"][-1]
    for name, node in by_name.items():
        with graph.inserting_after(last):
            last = graph.call_function(check_fixed_argument, (node, fixed[name], name))
    graph.lint()
    gm.recompile()
    return list(by_name)


def _parameter_of(target: str, fixed: dict[str, Any]) -> str | None:
    """The fixed parameter a placeholder stands for (fx may have suffixed ``_1``)."""
    if target in fixed:
        return target
    base = re.sub(r"_\d+$", "", target)
    return base if base in fixed else None


def _drop_guards(graph: fx.Graph, node: fx.Node) -> None:
    """Remove the checks a tracer attached to a fixed placeholder (``x == v`` + ``_assert``,
    ``_assert_is_none``): they are replaced by :func:`check_fixed_argument`."""
    for user in list(node.users):
        for inner in list(user.users):
            if inner.op == "call_function" and not inner.users and _is_assert(inner):
                graph.erase_node(inner)
        if not user.users and (_is_assert(user) or user.target is torch.eq or
                               getattr(user.target, "__name__", "") == "eq"):
            graph.erase_node(user)


def _is_assert(node: fx.Node) -> bool:
    name = getattr(node.target, "__name__", "") or ""
    return "assert" in name
