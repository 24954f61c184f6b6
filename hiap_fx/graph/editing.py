"""Editing a GraphModule: parameters read and replaced (``Params``), size arguments rewritten,
dead code removed (keeping in-place ops and registered guards)."""

from __future__ import annotations

import heapq
import operator
from typing import Any, TypeVar, cast

import torch
from torch import fx, nn

from hiap_fx.graph.ops import SIZE_KWARGS, op_kind, op_name

ModuleT = TypeVar("ModuleT", bound=nn.Module)


def map_ints(value: Any, table: dict[int, int]) -> Any:
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return table.get(value, value)
    if isinstance(value, (list, tuple)):
        return type(value)(map_ints(v, table) for v in value)
    return value


def rewrite_sizes(node: fx.Node, table: dict[int, int]) -> None:
    """Rewrite size arguments (never axis arguments) of ``node`` whose value is in ``table``."""
    where = op_kind(op_name(node)).size_args
    if where is None or not table:
        return
    args = list(node.args)
    positions = range(1, len(args)) if where == "rest" else [p for p in where if isinstance(p, int) and p < len(args)]
    for p in positions:
        args[p] = map_ints(args[p], table)
    node.args = tuple(args)
    node.kwargs = {k: (map_ints(v, table) if k in SIZE_KWARGS else v) for k, v in node.kwargs.items()}


def tensors_of(module: nn.Module) -> list[torch.Tensor]:
    """Every parameter and buffer of ``module`` (each once)."""
    return list({id(t): t for t in [*module.parameters(), *module.buffers()]}.values())


def tree_copy(module: ModuleT) -> ModuleT:
    """A copy of ``module``'s tree (new module objects, attributes, graphs) that shares its
    parameters and buffers: no weight is copied. Changing the copy's structure (replacing a
    parameter, rewriting a graph) leaves ``module`` alone; writing into a shared tensor in place
    would not, so the passes replace tensors, never write into them."""
    import copy

    memo: dict[int, Any] = {id(t): t for t in tensors_of(module)}
    return copy.deepcopy(module, memo)


def unshare(module: nn.Module, other: nn.Module) -> None:
    """Give ``module`` its own copy of every parameter and buffer it still shares with ``other``
    (tensor by tensor: the peak is one tensor, not one model)."""
    theirs = {t.untyped_storage().data_ptr() for t in tensors_of(other) if t.numel()}
    for owner in module.modules():
        for name, p in list(owner.named_parameters(recurse=False)):
            if p.numel() and p.untyped_storage().data_ptr() in theirs:
                setattr(owner, name, nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad))
        for name, b in list(owner.named_buffers(recurse=False)):
            if b is not None and b.numel() and b.untyped_storage().data_ptr() in theirs:
                owner.register_buffer(name, b.detach().clone(), persistent=name not in owner._non_persistent_buffers_set)


class Params:
    """Reads parameters of the graph module and registers sliced replacements."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.counter = 0

    def get(self, target: str) -> torch.Tensor:
        mod_path, _, name = target.rpartition(".")
        return getattr(self.gm.get_submodule(mod_path) if mod_path else self.gm, name)

    def replace(self, target: str, value: torch.Tensor) -> None:
        mod_path, _, name = target.rpartition(".")
        mod = self.gm.get_submodule(mod_path) if mod_path else self.gm
        old = getattr(mod, name)
        if isinstance(old, nn.Parameter):
            setattr(mod, name, nn.Parameter(value.detach().clone(), requires_grad=old.requires_grad))
        else:
            mod.register_buffer(name, value.detach().clone())

    def constant(self, graph: fx.Graph, name: str, value: torch.Tensor) -> fx.Node:
        """A buffer on the root (it moves with ``.to(device)``) and a get_attr node for it."""
        self.counter += 1
        attr = f"{name}_{self.counter}"
        while hasattr(self.gm, attr):
            self.counter += 1
            attr = f"{name}_{self.counter}"
        self.gm.register_buffer(attr, value)
        return graph.get_attr(attr)

    def add(self, graph: fx.Graph, like: str, suffix: str, value: torch.Tensor) -> fx.Node:
        """A new parameter next to ``like`` (same module, same kind) and a get_attr node for it."""
        mod_path, _, name = like.rpartition(".")
        mod = self.gm.get_submodule(mod_path) if mod_path else self.gm
        old = getattr(mod, name)
        new_name = f"{name}_{suffix}"
        while hasattr(mod, new_name):
            self.counter += 1
            new_name = f"{name}_{suffix}{self.counter}"
        if isinstance(old, nn.Parameter):
            mod.register_parameter(new_name, nn.Parameter(value.detach().clone(), requires_grad=old.requires_grad))
        else:
            mod.register_buffer(new_name, value.detach().clone())
        return graph.get_attr(f"{mod_path}.{new_name}" if mod_path else new_name)


def mutates(node: fx.Node) -> bool:
    target = node.target
    if node.op == "call_method":
        return str(target).endswith("_") and not str(target).startswith("_")
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.is_mutable
    name = getattr(target, "__name__", "")
    return name.endswith("_") and not name.startswith("_")


def eliminate_dead_code(gm: fx.GraphModule) -> None:
    """Remove unused nodes; unlike fx's own DCE this also drops ops fx calls impure only because
    they may draw random numbers (sdpa with dropout, dropout), but keeps in-place ops."""
    changed = True
    while changed:
        changed = False
        for node in reversed(list(gm.graph.nodes)):
            if node.op in ("placeholder", "output") or node.users or mutates(node) or is_guard(node):
                continue
            gm.graph.erase_node(node)
            changed = True


def is_guard(node: fx.Node) -> bool:
    """A call made for its check alone (registered with ``torch.fx.node.has_side_effect``, e.g. the
    fixed-argument guard); runtime asserts of the tracer are removed separately."""
    from torch.fx.node import _side_effectful_functions

    return node.op == "call_function" and node.target in _side_effectful_functions \
        and not is_tracer_assert(node)


def is_tracer_assert(node: fx.Node) -> bool:
    name = getattr(node.target, "__name__", "") or ""
    return "assert" in name or "sym_constrain" in name


def rewrite_axis_size(node: fx.Node, axis: int, old: int, new: int) -> None:
    """Set the size argument of output ``axis`` of a reshape/view/expand node from old to new
    (also where the size is computed as ``batch * old``, torch.export's spelling of a folded
    ``-1``: a new product is inserted)."""

    def swap(size: Any) -> Any:
        if size == old:
            return new
        if isinstance(size, fx.Node) and size.op == "call_function" and size.target is operator.mul \
                and len(size.args) == 2 and old in size.args and not isinstance(size.args[0], bool):
            other = size.args[1] if size.args[0] == old else size.args[0]
            with node.graph.inserting_before(node):
                return node.graph.call_function(operator.mul, (other, new))
        return size

    args = list(node.args)
    if len(args) == 2 and isinstance(args[1], (list, tuple)):
        sizes = list(args[1])
        sizes[axis] = swap(sizes[axis])
        args[1] = type(args[1])(sizes)
    elif 1 + axis < len(args):
        args[1 + axis] = swap(args[1 + axis])
    elif "shape" in node.kwargs or "size" in node.kwargs:
        key = "shape" if "shape" in node.kwargs else "size"
        sizes = list(cast(Any, node.kwargs[key]))
        sizes[axis] = swap(sizes[axis])
        node.kwargs = {**node.kwargs, key: tuple(sizes)}
    node.args = tuple(args)


def restore_order(graph: fx.Graph) -> None:
    """Move nodes, in place, into an order where every node comes after its inputs, keeping the
    present order wherever the inputs allow it (a stable topological sort; nothing moves when
    the order is already valid). Edits that let an earlier node read a later one (a shape
    query redirected to a rebuilt operand) call it before the graph is linted."""
    nodes = list(graph.nodes)
    position = {n: i for i, n in enumerate(nodes)}
    if all(position[a] < position[n] for n in nodes for a in n.all_input_nodes):
        return
    waiting = {n: len(set(n.all_input_nodes)) for n in nodes}
    ready = [(position[n], n.name) for n in nodes if waiting[n] == 0]
    by_name = {n.name: n for n in nodes}
    heapq.heapify(ready)
    order: list[fx.Node] = []
    while ready:
        _, name = heapq.heappop(ready)
        node = by_name[name]
        order.append(node)
        for user in node.users:
            waiting[user] -= 1
            if waiting[user] == 0:
                heapq.heappush(ready, (position[user], user.name))
    if len(order) != len(nodes):
        raise ValueError("the graph has a cycle")
    for before, node in zip(order, order[1:]):
        if node.prev is not before:
            before.append(node)


def sole_parameter(gm: fx.GraphModule, node: object) -> tuple[nn.Module, str, nn.Parameter] | None:
    """(holder module, attribute, parameter) read by the get_attr ``node``, when no other node
    reads it (so a rewrite may replace it); ``None`` otherwise."""
    if not isinstance(node, fx.Node) or node.op != "get_attr" or len(node.users) != 1 or \
            sum(n.op == "get_attr" and n.target == node.target for n in node.graph.nodes) != 1:
        return None
    path, _, attr = str(node.target).rpartition(".")
    holder = gm.get_submodule(path) if path else gm
    value = getattr(holder, attr, None)
    return (holder, attr, value) if isinstance(value, nn.Parameter) else None


def add_parameter(gm: fx.GraphModule, holder: nn.Module, name: str, value: torch.Tensor,
                  like: torch.Tensor) -> str:
    """Register ``value`` (in ``like``'s dtype, trainable when it is) on ``holder`` under
    ``name`` or the first free ``name_<i>``; returns its dotted path in ``gm`` for a get_attr."""
    base, i = name, 1
    while hasattr(holder, name):
        name, i = f"{base}_{i}", i + 1
    holder.register_parameter(name, nn.Parameter(value.detach().to(like.dtype).clone(),
                                                 requires_grad=like.requires_grad))
    for path, mod in gm.named_modules():
        if mod is holder:
            return f"{path}.{name}" if path else name
    raise KeyError(f"{name}: its module is not part of the graph module")
