"""Build the latency cost model of a prepared model: calibrate (or read the cache), then fit.

latency(decisions) = constant + sum over gated MAC nodes of their table at the kept sizes
                     + per-site overhead x (site runs)
The constant, a scale on the tables and the per-site overhead (norms, activations, adds of a
removed sub-layer) come from timing three whole compact models on this machine (every unit kept,
half of every gate's units kept, every gate closed); the model reproduces the three timings.
The user's dense model is timed in the same run: budget fractions refer to it.
"""

from __future__ import annotations

import functools
import json
import math
from typing import Any, Callable, Optional

import sympy
import torch

from hiap_fx.errors import InputError
from hiap_fx.files.atomic import write_text
from hiap_fx.gated.bundles import GATES_ATTR
from hiap_fx.gated.cost_model import CostModel, NodeTerm, symbol_values
from hiap_fx.gated.decisions import gate_key
from hiap_fx.graph.ir import CapturedGraph, node_shape
from hiap_fx.graph.ops import op_name
from hiap_fx.passes.latency.tables import (
    Points,
    kernel_call,
    kernel_tables,
    piecewise,
    weighted_call,
    weighted_table,
    width_symbol,
)
from hiap_fx.passes.latency.timing import alternating_medians, cache_path, machine_id

FORMAT = "hiap_fx.latency/1"


def deploy_inputs(inputs: tuple[torch.Tensor, ...], batch: int) -> tuple[torch.Tensor, ...]:
    """The example inputs at ``batch`` (the first example repeated along the batch axis)."""
    b0 = int(inputs[0].shape[0]) if inputs and inputs[0].dim() else 1
    if batch == b0:
        return inputs
    if any(t.dim() == 0 or t.shape[0] != b0 for t in inputs):
        raise InputError(f"latency_batch={batch}: the example inputs do not all have the batch "
                          f"size {b0} on their first axis, so hiap_fx cannot build inputs of another "
                          "batch size; pass example inputs at the batch size you deploy with")
    return tuple(t[:1].expand(batch, *t.shape[1:]).contiguous() for t in inputs)


def build_latency_model(cost: CostModel, captured: CapturedGraph, compile_compact: Callable,
                        batch: int, align: int = 1, min_time: float = 0.02,
                        reference: Optional[torch.nn.Module] = None) -> CostModel:
    """The latency model (seconds at ``batch``) of the gated graph whose MAC model is ``cost``.
    ``compile_compact(captured, decisions)`` builds a compact model (the finalize pipeline);
    ``reference`` (the user's dense model) is timed too: budget fractions refer to it."""
    cg = captured
    params: dict[str, torch.Tensor] = dict(cg.gm.named_parameters())
    params.update(dict(cg.gm.named_buffers()))
    device = next(iter(params.values())).device if params else torch.device("cpu")
    dtype = next((p.dtype for p in params.values() if p.is_floating_point()), torch.get_default_dtype())
    nodes = {n.name: n for n in cg.gm.graph.nodes}
    key = {"format": FORMAT, "machine": machine_id(device), "batch": batch, "align": align,
           "graph": cg.gm.code, "shapes": {k: list(v.shape) for k, v in params.items()},
           "gates": sorted({s.gate for s in cost.sources})}
    path = cache_path(key)
    cached: dict[str, Any] = {}
    if path.exists():
        try:
            cached = json.loads(path.read_text())
            if cached.get("key") != key:
                cached = {}
        except (OSError, ValueError):
            cached = {}
    tables: dict[str, Any] = cached.get("tables", {})
    by_signature: dict[str, dict] = {}  # blocks of one shape share their tables
    exprs: dict[str, sympy.Expr] = {}
    for name, term in cost.terms.items():
        node = nodes[name]
        dependent = name in cg.input_dependent
        signature = _signature(node, term, dependent)
        known = tables.get(name) or by_signature.get(signature)
        if term.kind == "weighted":
            expr, table = _weighted(node, term, params, batch, cost.example_batch, dependent, align,
                                    min_time, known)
        else:
            expr, table = _kernel(node, term, batch, cost.example_batch, align, min_time, known,
                                  device, dtype)
        if expr is not None:
            exprs[name] = expr
            tables[name] = by_signature[signature] = table
    measured: dict[str, float] = {k: cached[k] for k in ("dense_s", "empty_s", "half_s", "reference_s")
                                  if k in cached}
    if "dense_s" not in measured or (reference is not None and "reference_s" not in measured):
        measured = _whole_models(cost, captured, compile_compact, batch, reference)
    node_exprs = _fit(cost, exprs, measured, gate_sizes(cg))
    if any(measured.get(k) != cached.get(k) for k in measured) or "tables" not in cached:
        write_text(path, json.dumps({"key": key, "tables": tables, **measured}))
    return CostModel(expr=sympy.Add(*node_exprs.values()), node_exprs=node_exprs, sources=cost.sources,
                     batch=cost.batch, tokens=None, example_batch=batch, example_tokens=cost.example_tokens,
                     group_sizes=cost.group_sizes, terms=cost.terms, site_alive=cost.site_alive,
                     unit="seconds", reference=measured.get("reference_s"))


def _fit(cost: CostModel, exprs: dict[str, sympy.Expr], measured: dict[str, float],
         sizes: dict[str, int]) -> dict[str, sympy.Expr]:
    """latency = fixed + scale x (sum of node tables) + overhead x (sites that run), solved from
    the three whole-model timings (every unit kept, half of every gate's units kept, every gate
    closed): the scale absorbs how ops timed alone differ from ops inside the model, the
    overhead the norms, activations and adds that go with a removed sub-layer."""
    sites = [s for s, alive in cost.site_alive.items() if alive.free_symbols]
    dense, empty, half = (_values(cost, which, sizes) for which in ("dense", "empty", "half"))

    def tables_at(values: dict) -> float:
        return sum(float(e.xreplace(values)) for e in exprs.values())

    p_dense, p_empty, p_half = tables_at(dense), tables_at(empty), tables_at(half)
    t_dense, t_empty, t_half = measured["dense_s"], measured["empty_s"], measured["half_s"]
    scale = (t_dense - t_half) / (p_dense - p_half) if p_dense - p_half > 1e-12 else 1.0
    overhead = (t_dense - t_empty - scale * (p_dense - p_empty)) / len(sites) if sites else 0.0
    if not 0.0 < scale < 10.0 or overhead < 0.0:
        # noise beyond what three points can resolve: reproduce dense and empty only, with the
        # tables scaled to fit when they alone over-predict the difference
        saved, table_saved = t_dense - t_empty, p_dense - p_empty
        scale = 1.0 if table_saved <= saved or table_saved <= 0 else max(0.0, saved) / table_saved
        overhead = (saved - scale * table_saved) / len(sites) if sites else 0.0
    node_exprs = {name: sympy.Float(scale) * e for name, e in exprs.items()}
    for site in sites:
        node_exprs[f"site overhead {site}"] = sympy.Float(overhead) * cost.site_alive[site]
    node_exprs["fixed"] = sympy.Float(t_dense - scale * p_dense - overhead * len(sites))
    return node_exprs


def _signature(node, term: NodeTerm, dependent: bool) -> str:
    """What a node's timing depends on: its op, operand shapes and the gated axis or widths."""
    shapes = [node_shape(a) for a in node.args if hasattr(a, "meta")]
    scalars = [a for a in node.args if isinstance(a, (int, float, tuple, list))]
    gated = [bool(f.free_symbols) for f in term.factors]
    widths = [bool(term.qk_width.free_symbols), bool(term.v_width.free_symbols)]
    return json.dumps([term.kind, op_name(node), shapes, repr(scalars), gated, widths, list(term.dims),
                       dependent, repr(sorted(node.kwargs.items()))])


def _values(cost: CostModel, which: str, sizes: dict[str, int]) -> dict[sympy.Symbol, float]:
    """Symbol values of the dense, empty or half decisions (:func:`calibration_decisions`)."""
    decisions = {k: v.double() for k, v in calibration_decisions(cost, which, sizes).items()}
    values = symbol_values(cost.sources, decisions, cost.group_sizes) if decisions else torch.zeros(0)
    return {s.symbol: float(v) for s, v in zip(cost.sources, values.tolist())}


def calibration_decisions(cost: CostModel, which: str, sizes: dict[str, int]) -> dict[str, torch.Tensor]:
    """Decisions of every gate: all kept (``dense``), none (``empty``) or, per gate group, the
    first half of the units (``half``; block gates stay on)."""
    out = {}
    for key, n in sizes.items():
        if which != "half":
            out[key] = torch.full((n,), which == "dense", dtype=torch.bool)
            continue
        group = cost.group_sizes.get(key, n)
        keep = (torch.arange(n) % group) < max(1, (group + 1) // 2)
        out[key] = keep if n > 1 else torch.ones(n, dtype=torch.bool)
    return out


def _weighted(node, term: NodeTerm, params: dict[str, torch.Tensor], batch: int, example_batch: int,
              dependent: bool, align: int, min_time: float, table: Optional[dict]
              ) -> tuple[Optional[sympy.Expr], dict]:
    cut = [a for a, f in enumerate(term.factors) if f.free_symbols]
    weight = params.get(str(node.args[1].target))
    make = weighted_call(node, weight, batch, example_batch, dependent) if weight is not None else None
    if len(cut) != 1 or make is None or weight is None:
        return None, {}  # not timed alone: part of the constant (see build_latency_model)
    axis = cut[0]
    if table is None:
        table = {"axis": axis, "points": weighted_table(make, axis, int(weight.shape[axis]), align, min_time)}
    return piecewise(term.factors[axis], _points(table["points"])), table


def _kernel(node, term: NodeTerm, batch: int, example_batch: int, align: int, min_time: float,
            table: Optional[dict], device: torch.device, dtype: torch.dtype) -> tuple[sympy.Expr, dict]:
    if table is None:
        scale = node.kwargs.get("scale") or 1.0 / math.sqrt(term.dims[4])
        make = kernel_call(term, float(scale), batch, example_batch, device, dtype)
        by_heads, by_width = kernel_tables(term, make, align, min_time)
        table = {"heads": by_heads, "width": by_width}
    expr = piecewise(term.heads, _points(table["heads"]))
    x = width_symbol(term)
    if x is not None and table["width"]:
        width = _points(table["width"])
        expr = expr * piecewise(x, width) / sympy.Float(width[-1][1])
    return expr, table


def _points(raw: list) -> Points:
    return [(float(a), float(b)) for a, b in raw]


def _whole_models(cost: CostModel, captured: CapturedGraph, compile_compact: Callable, batch: int,
                  reference: Optional[torch.nn.Module]) -> dict[str, float]:
    """Seconds per call of the compact model with every unit kept, half of them and every gate
    closed (and of ``reference``, the user's model, when given), timed in turn."""
    sizes = gate_sizes(captured)
    models = {f"{which}_s": compile_compact(captured, calibration_decisions(cost, which, sizes)).eval()
              for which in ("dense", "half", "empty")}
    inputs = deploy_inputs(captured.example_inputs, batch)
    was_training = reference.training if reference is not None else False
    if reference is not None:
        models["reference_s"] = reference.eval()
    try:
        with torch.no_grad():
            times = alternating_medians([functools.partial(m, *inputs) for m in models.values()])
    finally:
        if reference is not None:
            reference.train(was_training)
    return dict(zip(models, times))


def gate_sizes(captured: CapturedGraph) -> dict[str, int]:
    """Units per gate, by gate key, of the gated graph."""
    bundles = getattr(captured.gm, GATES_ATTR)
    out: dict[str, int] = {}
    for bundle in bundles.values():
        out.update({gate_key(bundle.site, kind): gate.logits.numel() for kind, gate in bundle.gates().items()})
    return out

