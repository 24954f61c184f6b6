"""Index flow: follow feature indices through the graph by executing data-movement ops.

The discovery passes need to know, for example, which output row of a fused qkv projection ends
up as dimension ``d`` of head ``h`` of the query that reaches the attention kernel, whatever
mix of reshape/permute/unbind/chunk/transpose the model uses. Instead of one rule per op, we
*run* the ops: a float64 tensor holding each element's source index is fed in place of the real
activation, movement ops are executed on it (their other arguments take the values recorded on
the example inputs), element-wise ops pass indices through unchanged, and anything that mixes
features (a matmul, a linear) stops the flow and is reported as "reached".
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, cast

import torch
from torch import fx
from torch.fx.node import map_aggregate

from hiap_fx.graph.ir import SHAPE_KEY, CapturedGraph
from hiap_fx.graph.ops import in_family, op_name

SENTINEL = -1.0


@dataclass
class FlowEvent:
    """Something notable the flow passed through (a mixing, a gating product, a side parameter)."""

    kind: str  # "mix" | "data_binary" | "norm" | "softmax" | "channel_op" | "channel_pool" | "const_binary"
    node: fx.Node
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class FlowResult:
    """Index tensors at on-path nodes, the ops where the flow stopped, and events on the way."""

    index: dict[fx.Node, Any]
    reached: list[tuple[fx.Node, int, torch.Tensor]]  # (consumer, arg position, index at that arg)
    events: list[FlowEvent]

    def reached_nodes(self) -> set[fx.Node]:
        return {n for n, _, _ in self.reached}


def varies_along(index: torch.Tensor, axis: int) -> bool:
    """Whether an index tensor holds different values at different positions along ``axis``."""
    return not torch.equal(index, index.narrow(axis, 0, 1).expand_as(index))


def axis_of_size(index: torch.Tensor, size: int) -> Optional[int]:
    """The one axis with ``size`` entries along which ``index`` varies; ``None`` when there is no
    such axis or more than one."""
    axes = [a for a in range(index.dim()) if index.shape[a] == size and varies_along(index, a)]
    return axes[0] if len(axes) == 1 else None


def axes_of_size(flow: "FlowResult", nodes: Iterable[fx.Node], size: int) -> dict[fx.Node, int]:
    """For the ``nodes`` the flow reached with an index of their recorded shape: the one output
    axis of ``size`` entries along which it varies (:func:`axis_of_size`), where there is one."""
    found: dict[fx.Node, int] = {}
    for n in nodes:
        at, shape = flow.index.get(n), n.meta.get(SHAPE_KEY)
        if isinstance(at, torch.Tensor) and isinstance(shape, tuple) and tuple(at.shape) == shape:
            axis = axis_of_size(at, size)
            if axis is not None:
                found[n] = axis
    return found


def feature_index(shape: tuple[int, ...], axis: int = -1) -> torch.Tensor:
    """A tensor of ``shape`` whose value is each element's coordinate along ``axis``."""
    axis = axis % len(shape)
    view = [1] * len(shape)
    view[axis] = shape[axis]
    return torch.arange(shape[axis], dtype=torch.float64).reshape(view).expand(shape).clone()


class IndexFlow:
    """Runs index tensors forward from source nodes through a captured graph."""

    def __init__(self, cg: CapturedGraph) -> None:
        self.cg = cg
        self.modules = dict(cg.gm.named_modules())
        self.order = {n: i for i, n in enumerate(cg.gm.graph.nodes)}

    # -- helpers ------------------------------------------------------------------------------
    def value(self, node: fx.Node) -> Any:
        """Recorded value of an off-path node (float tensors become sentinels in movement ops)."""
        if node.name in self.cg.values:
            return self.cg.values[node.name]
        shape = node.meta.get(SHAPE_KEY)
        if isinstance(shape, tuple):
            return torch.full(shape, SENTINEL, dtype=torch.float64)
        raise KeyError(f"no recorded value for node {node.name}")

    def _off_path_arg(self, node: fx.Node, for_movement: bool) -> Any:
        val = self.value(node)
        if for_movement and isinstance(val, torch.Tensor) and val.is_floating_point():
            return torch.full(val.shape, SENTINEL, dtype=torch.float64)
        return val

    def execute(self, node: fx.Node, index: dict[fx.Node, Any], movement: bool) -> Any:
        """Run ``node`` with ``index`` values for its on-path inputs and recorded values for the
        rest (float ones replaced by sentinels when ``movement``)."""
        def arg(a: Any) -> Any:
            if isinstance(a, fx.Node):
                return index[a] if a in index else self._off_path_arg(a, movement)
            return a
        args = map_aggregate(node.args, arg)
        kwargs = map_aggregate(node.kwargs, arg)
        if node.op == "call_function":
            return cast(Callable[..., Any], node.target)(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], str(node.target))(*args[1:], **kwargs)
        if node.op == "call_module":
            return self.modules[str(node.target)](*args, **kwargs)
        raise TypeError(node.op)

    @staticmethod
    def _is_index_value(v: Any) -> bool:
        if isinstance(v, torch.Tensor):
            return v.dtype == torch.float64
        if isinstance(v, (tuple, list)) and v:  # integer members: a reduction's indices
            return all(isinstance(t, torch.Tensor) and (t.dtype == torch.float64 or not t.is_floating_point())
                       for t in v) and any(isinstance(t, torch.Tensor) and t.dtype == torch.float64 for t in v)
        return False

    # -- main ---------------------------------------------------------------------------------
    def run(self, sources: dict[fx.Node, torch.Tensor],
            data_binary: tuple[str, ...] = (),
            stop: Optional[Callable[[fx.Node], bool]] = None) -> FlowResult:
        """Propagate index tensors from ``sources`` until every path stops.

        ``data_binary`` lists element-wise binary ops (e.g. ``("mul",)``) that may pass indices
        through when their other operand is another input-dependent tensor (a gating product);
        otherwise such an op stops the flow. ``stop(node)`` can stop it at extra nodes.
        """
        index: dict[fx.Node, Any] = dict(sources)
        reached: list[tuple[fx.Node, int, torch.Tensor]] = []
        events: list[FlowEvent] = []
        heap: list[tuple[int, str]] = []
        seen: set[fx.Node] = set()
        by_name = {n.name: n for n in self.order}

        def push_users(n: fx.Node) -> None:
            for u in n.users:
                if u not in seen:
                    seen.add(u)
                    heapq.heappush(heap, (self.order[u], u.name))

        for s in sources:
            push_users(s)
        while heap:
            _, name = heapq.heappop(heap)
            node = by_name[name]
            out = self._step(node, index, data_binary, stop, reached, events)
            if out is not None and self._is_index_value(out):
                index[node] = out
                push_users(node)
        return FlowResult(index=index, reached=reached, events=events)

    def _step(self, node: fx.Node, index: dict[fx.Node, Any], data_binary: tuple[str, ...],
              stop: Optional[Callable[[fx.Node], bool]], reached: list, events: list) -> Any:
        on_path = [a for a in node.all_input_nodes if a in index]
        name = op_name(node, self.modules)

        def stop_here() -> None:
            for i, a in enumerate(node.args):
                if isinstance(a, fx.Node) and a in index:
                    reached.append((node, i, index[a]))
            for k, a in node.kwargs.items():
                if isinstance(a, fx.Node) and a in index:
                    reached.append((node, -1, index[a]))
            return None

        if node.op == "output" or (stop is not None and stop(node)):
            return stop_here()
        source = node.args[0] if node.args else None
        if name == "getattr" and len(node.args) == 2 and node.args[1] == "values" \
                and isinstance(source, fx.Node) and source in index:
            return getattr(index[source], "values", None)  # ``x.max(dim).values``
        if name in ("getattr", "size", "dim", "numel", "sym_size"):
            return None  # sizes: not data
        if in_family(name, "cast") or name in ("dropout", "identity", "contiguous", "clone", "detach"):
            x = node.args[0] if node.args else None
            return index[x] if isinstance(x, fx.Node) and x in index else stop_here()
        if in_family(name, "movement"):
            try:
                out = self.execute(node, index, movement=True)
                if name == "pad":  # padded positions hold no feature (not feature 0)
                    out = self._padded(node, index, out)
                return out
            except Exception:
                return stop_here()
        if in_family(name, "unary"):
            return index[on_path[0]] if len(on_path) == 1 else stop_here()
        if in_family(name, "binary"):
            return self._binary(node, name, on_path, index, data_binary, events, stop_here)
        if in_family(name, "norm") or in_family(name, "softmax"):
            x = node.args[0]
            if isinstance(x, fx.Node) and x in index and on_path == [x]:
                events.append(FlowEvent("norm" if in_family(name, "norm") else "softmax", node))
                return index[x]
            return stop_here()
        if in_family(name, "channel_norm") or self.is_channel_conv(node, name):
            x = node.args[0]
            if not (isinstance(x, fx.Node) and on_path == [x]):
                return stop_here()
            # "channel_pool": one filter per channel shared by the slices of the batch axis
            # (heads folded into it, MViTv2's pooling): the channels are dims of every head
            shared = index[x].dim() > 1 and index[x].shape[0] > 1 and varies_along(index[x], 0)
            if node.meta.get(SHAPE_KEY) == x.meta.get(SHAPE_KEY):
                events.append(FlowEvent("channel_pool" if shared else "channel_op", node))
                return index[x]
            pooled = self._spatially_pooled(index[x], node.meta.get(SHAPE_KEY))
            if pooled is None:
                return stop_here()
            events.append(FlowEvent("channel_pool", node))
            return pooled
        if in_family(name, "matmul_like") or in_family(name, "width_stat"):
            return stop_here()
        return self._opaque(node, on_path, index, stop_here)

    def _padded(self, node: fx.Node, index: dict[fx.Node, Any], out: Any) -> Any:
        """``pad``'s index output with the padding marked SENTINEL: the same pad of a tensor of
        ones tells which positions came from the input."""
        x = node.args[0]
        if not isinstance(out, torch.Tensor) or not isinstance(x, fx.Node) or x not in index:
            return out
        ones = dict(index)
        ones[x] = torch.ones_like(index[x])
        came = self.execute(node, ones, movement=True)
        return torch.where(came == 1, out, torch.full_like(out, SENTINEL))

    def _binary(self, node, name, on_path, index, data_binary, events, stop_here) -> Any:
        out_shape = node.meta.get(SHAPE_KEY)
        if not isinstance(out_shape, tuple):
            return stop_here()
        data_args = [a for a in node.all_input_nodes if a.name in self.cg.input_dependent and a not in index]
        idx = [index[a] for a in on_path]
        try:
            idx = [torch.broadcast_to(t, out_shape) for t in idx]
        except RuntimeError:
            return stop_here()
        if len(idx) == 2 and not torch.equal(idx[0], idx[1]):
            events.append(FlowEvent("mix", node, {"a": idx[0], "b": idx[1]}))
        if data_args:
            if name not in data_binary:
                return stop_here()
            events.append(FlowEvent("data_binary", node, {"other": data_args}))
        const_args = [a for a in node.all_input_nodes if a not in index and a not in data_args]
        if const_args:
            events.append(FlowEvent("const_binary", node, {"other": const_args}))
        return idx[0]

    @staticmethod
    def _spatially_pooled(idx: torch.Tensor, out_shape: Any) -> Optional[torch.Tensor]:
        """The indices after a strided or padded depthwise convolution (one filter per channel,
        the spatial axes resized): each channel keeps its index, when that is the same at every
        spatial position; ``None`` otherwise."""
        if not isinstance(out_shape, tuple) or len(out_shape) != idx.dim() or idx.dim() < 3 \
                or tuple(out_shape[:2]) != tuple(idx.shape[:2]):
            return None
        first = idx
        for axis in range(2, idx.dim()):
            first = first.narrow(axis, 0, 1)
        if not torch.equal(first.expand_as(idx), idx):
            return None
        return first.expand(out_shape).clone()

    def is_channel_conv(self, node: fx.Node, name: str) -> bool:
        """Whether ``node`` is a depthwise convolution (one filter per channel)."""
        if name not in ("conv1d", "conv2d", "conv3d"):
            return False
        w = node.args[1] if len(node.args) > 1 else None
        groups = node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)
        wv = self.cg.values.get(w.name) if isinstance(w, fx.Node) else None
        return bool(isinstance(wv, torch.Tensor) and wv.shape[1] == 1 and groups == wv.shape[0])

    def _opaque(self, node: fx.Node, on_path: list, index: dict, stop_here) -> Any:
        """An op hiap_fx has no name for: accept it only if it provably just moves indices."""
        if len(on_path) != 1 or node.op == "call_module" and any(
                True for _ in self.modules[str(node.target)].parameters()):
            return stop_here()
        src = index[on_path[0]]
        try:
            out = self.execute(node, index, movement=True)
        except Exception:
            return stop_here()
        outs = out if isinstance(out, (tuple, list)) else [out]
        allowed = torch.unique(torch.cat([src.flatten(), torch.tensor([SENTINEL], dtype=torch.float64)]))
        floats = 0
        for t in outs:
            if isinstance(t, torch.Tensor) and not t.is_floating_point() and isinstance(out, (tuple, list)):
                continue  # the indices beside a reduction's values (``max(dim)``): not features
            if not isinstance(t, torch.Tensor) or t.dtype != torch.float64:
                return stop_here()
            if not torch.isin(torch.unique(t), allowed).all():
                return stop_here()
            floats += 1
        return out if floats else stop_here()
