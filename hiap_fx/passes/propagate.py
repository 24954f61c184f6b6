"""Propagate: run the example inputs through the graph and record what every node produced.

Shapes, dtypes and MACs are recorded on each node (``hiap_fx.graph.ir.record_facts``; read them
with ``node_shape`` / ``node_dtype`` / ``recorded_macs``); values that do not depend on the model
input (constants, buffers, index tables, sizes), small input-dependent values and integer or
boolean ones go into ``CapturedGraph.values`` for the passes that need concrete arguments.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx
from torch.utils import _pytree as pytree

from hiap_fx.graph.ir import CapturedGraph, record_facts

#: input-dependent float tensors larger than this (elements) are recorded by shape only (index
#: flow reads off-path float values as sentinels anyway; integer and boolean ones, such as
#: masks and index tables computed from the input, are kept)
_KEEP_LIMIT = 1 << 12


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, cg: CapturedGraph, counter: Any = None) -> None:
        super().__init__(gm)
        self.cg = cg
        self.counter = counter

    def run_node(self, n: fx.Node) -> Any:
        before = self.counter.get_total_flops() if self.counter is not None else 0
        out = super().run_node(n)
        macs = int(self.counter.get_total_flops() - before) // 2 if self.counter is not None else None
        dependent = n.op == "placeholder" or (not _is_size(n, out) and any(
            a.name in self.cg.input_dependent for a in n.all_input_nodes))
        if dependent:
            self.cg.input_dependent.add(n.name)
        record_facts(n, _shape_of(out), out.dtype if isinstance(out, torch.Tensor) else None, macs)
        if _holds_meta(out):
            return out  # a shape-only run: the value recorded by the real run (if any) stays
        if not isinstance(out, torch.Tensor) or not dependent or out.numel() <= _KEEP_LIMIT \
                or not out.is_floating_point():
            self.cg.values[n.name] = out
        return out


def _holds_meta(value: Any) -> bool:
    return any(isinstance(v, torch.Tensor) and v.is_meta for v in pytree.tree_leaves(value))


def _to_meta(value: Any) -> Any:
    return pytree.tree_map_only(torch.Tensor, lambda t: t if t.is_meta else t.to("meta"), value)


class _MetaRecorder(_Recorder):
    """A recording run on meta tensors from the input on: what depends on the input is computed
    as shapes alone (real weights and values it reads are viewed on the meta device), what does
    not runs for real."""

    def call_function(self, target: Any, args: Any, kwargs: Any) -> Any:
        if _holds_meta((args, kwargs)):
            args, kwargs = _to_meta((args, kwargs))
        return super().call_function(target, args, kwargs)

    def call_method(self, target: Any, args: Any, kwargs: Any) -> Any:
        if _holds_meta((args, kwargs)):
            args, kwargs = _to_meta((args, kwargs))
        return super().call_method(target, args, kwargs)

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        if not _holds_meta((args, kwargs)):
            return super().call_module(target, args, kwargs)
        module = self.fetch_attr(target)
        state = {k: v.to("meta") for k, v in [*module.named_parameters(), *module.named_buffers()]}
        return torch.func.functional_call(module, state, _to_meta(args), _to_meta(kwargs))


def _is_size(n: fx.Node, out: Any) -> bool:
    """Shape queries (x.shape, x.size(), sizes derived from them) and dtype or device reads
    (``cos.to(x.dtype)`` of rotary tables) depend on shapes and types, not values."""
    if isinstance(out, (torch.Size, torch.dtype, torch.device)) or isinstance(out, int) and not isinstance(out, bool):
        return True
    return isinstance(out, (tuple, list)) and all(isinstance(v, int) for v in out)


def _shape_of(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, (tuple, list)) and value and all(isinstance(v, torch.Tensor) for v in value):
        return [tuple(v.shape) for v in value]
    return None


def propagate(cg: CapturedGraph, count: bool = False) -> CapturedGraph:
    """Record shapes, dtypes and (small or constant) values of every node on the example inputs;
    with ``count``, also each node's MACs by the reference counter (``recorded_macs``). Without
    ``count``, facts a recording run already left on this very graph (``cg.facts_fresh``: the
    capture check records them) are kept and nothing runs."""
    if not count and cg.facts_fresh:
        return cg
    recording_run(cg, count)
    return cg


def recording_run(cg: CapturedGraph, count: bool = False) -> Any:
    """Run the example inputs through ``cg.gm`` recording every node's facts (see
    :func:`propagate`); returns the graph's output, so one run both checks and records."""
    from hiap_fx.graph.counting import reference_counter

    cg.values.clear()
    cg.input_dependent.clear()
    with torch.no_grad():
        if count:
            with reference_counter() as counter:
                out = _Recorder(cg.gm, cg, counter).run(*cg.example_inputs)
        else:
            out = _Recorder(cg.gm, cg).run(*cg.example_inputs)
    cg.facts_fresh = True
    return out


def count(cg: CapturedGraph) -> CapturedGraph:
    """Record every node's MACs (and the shapes of nodes added since the last recording run) on
    meta tensors: the input is meta, so everything computed from it runs on shapes alone, while
    constants, weights and index tables computed from them run for real and are recorded. Values
    of input-dependent nodes recorded by the last real run stay (rewrites such as ``normalise``
    keep what a node computes; finalize carries prepare's into its copy of the graph, whose nodes
    keep their names). A graph that meta tensors cannot run (a data-dependent op, a tensor made
    inside a module) gets a real counting run instead."""
    from hiap_fx.graph.counting import reference_counter

    if not cg.input_dependent:  # no real run recorded yet what is computed from the input
        return propagate(cg, count=True)
    live = {n.name for n in cg.gm.graph.nodes}
    cg.input_dependent.clear()
    try:
        with torch.no_grad(), reference_counter() as counter:
            _MetaRecorder(cg.gm, cg, counter).run(*(x.to("meta") for x in cg.example_inputs))
    except Exception:  # noqa: BLE001 - an op meta tensors cannot run: count on real tensors
        return propagate(cg, count=True)
    for name in [k for k in cg.values if k not in live]:
        del cg.values[name]
    cg.facts_fresh = True
    return cg
