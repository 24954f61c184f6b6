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
        if not isinstance(out, torch.Tensor) or not dependent or out.numel() <= _KEEP_LIMIT \
                or not out.is_floating_point():
            self.cg.values[n.name] = out
        return out


def _is_size(n: fx.Node, out: Any) -> bool:
    """Shape queries (x.shape, x.size(), sizes derived from them) depend on shapes, not values."""
    if isinstance(out, torch.Size) or isinstance(out, int) and not isinstance(out, bool):
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
    with ``count``, also each node's MACs by the reference counter (``recorded_macs``)."""
    from hiap_fx.graph.counting import reference_counter

    cg.values.clear()
    cg.input_dependent.clear()
    with torch.no_grad():
        if count:
            with reference_counter() as counter:
                _Recorder(cg.gm, cg, counter).run(*cg.example_inputs)
        else:
            _Recorder(cg.gm, cg).run(*cg.example_inputs)
    return cg
