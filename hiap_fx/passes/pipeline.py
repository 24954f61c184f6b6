"""The compiler's pipeline: every pass in order, in one place.

A pass is a function ``CapturedGraph -> CapturedGraph`` (the shared IR: graph module, example
inputs, recorded shapes and values, the plan once discovered). ``prepare`` runs

    capture (front end: torch.fx, else torch.export)
    -> ANALYSIS: propagate, normalise, count, discover, shared_weights, sliceable
    -> gate (insert the HiAP gates) -> cost (derive and compile the sympy cost model)

and ``finalize`` runs COMPILE on a copy of the gated graph:

    strip_gates, propagate, slice, cleanup, fuse, package -> verify

Users extend the pipeline at named points with :func:`hiap_fx.register_pass` (a graph rewrite
of their own, e.g. after ``capture``: their op or module turned into the canonical ops that
discovery knows). Module rewrites (before capture), trace hooks (during capture) and attention
kernels / op families (read by normalise and discover) are the specialised registrations of the
same system; see ``docs/extending.md``.
"""

from __future__ import annotations

import logging
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch
from torch import fx, nn

from hiap_fx.config import PruneConfig
from hiap_fx.errors import CaptureError, HiapWarning, NoAttentionError
from hiap_fx.gated.bundles import GATES_ATTR
from hiap_fx.gated.prepared import PreparedModel
from hiap_fx.graph.editing import eliminate_dead_code, tree_copy, unshare
from hiap_fx.graph.ir import CapturedGraph
from hiap_fx.passes.capture import capture, remove_assertions
from hiap_fx.passes.cost import build_cost_model
from hiap_fx.passes.discover import discover
from hiap_fx.passes.discover.opaque import opaque_calls
from hiap_fx.passes.discover.shared import refuse_shared_weights
from hiap_fx.passes.fuse import fuse_sibling_linears
from hiap_fx.passes.gate import insert_gates, strip_gates
from hiap_fx.passes.latency import build_latency_model
from hiap_fx.passes.normalise import normalise
from hiap_fx.passes.propagate import count, propagate
from hiap_fx.passes.slice import slice_sites
from hiap_fx.passes.slice.checks import drop_unsliceable
from hiap_fx.passes.verify import verify_compact
from hiap_fx.plan import Plan
from hiap_fx.registry import GRAPH_PASSES

GraphPass = Callable[[CapturedGraph], Optional[CapturedGraph]]


@dataclass(frozen=True)
class Stage:
    """One named pass of the pipeline."""

    name: str
    run: GraphPass
    summary: str


def _normalise(cg: CapturedGraph) -> CapturedGraph:
    normalise(cg)
    return cg


def _discover(cg: CapturedGraph) -> CapturedGraph:
    cg.plan = discover(cg, model_name=cg.model_name)
    return cg


def _shared_weights(cg: CapturedGraph) -> CapturedGraph:
    refuse_shared_weights(cg, _plan(cg))
    return cg


def _sliceable(cg: CapturedGraph) -> CapturedGraph:
    drop_unsliceable(cg, _plan(cg))
    return cg


def _plan(cg: CapturedGraph) -> Plan:
    assert cg.plan is not None, "the discover stage sets the plan"
    return cg.plan


#: analysis, after capture: from a raw graph to the plan of sites
ANALYSIS: tuple[Stage, ...] = (
    Stage("propagate", propagate, "record shapes, dtypes and constant values on the example inputs"),
    Stage("normalise", _normalise, "canonical ops: module calls to functions, pinned sdpa scales"),
    Stage("count", count, "record every node's MACs (on meta tensors)"),
    Stage("discover", _discover, "attention and FFN sites by graph pattern and index flow"),
    Stage("shared_weights", _shared_weights, "refuse sites whose weights are used elsewhere"),
    Stage("sliceable", _sliceable, "report attention that finalize could not rebuild"),
)

#: the points where user passes may run (after each of these)
PASS_POINTS: tuple[str, ...] = ("capture", *(s.name for s in ANALYSIS))


def check_pass_points() -> None:
    """Refuse user passes registered at a point the pipeline does not have."""
    from hiap_fx.errors import InputError

    for registered in GRAPH_PASSES:
        if registered.after not in PASS_POINTS:
            raise InputError(f"pass {registered.name!r} is registered after {registered.after!r}, "
                             f"which is not a pipeline point; choose one of {', '.join(PASS_POINTS)}")


#: each stage's seconds, at DEBUG level: ``logging.getLogger("hiap_fx.timing")``, record
#: arguments (stage name, seconds); benchmarks/memory.py reads them
TIMING = logging.getLogger("hiap_fx.timing")


@contextmanager
def timed(stage: str) -> Iterator[None]:
    """Log the seconds the block takes under ``stage`` (``hiap_fx.timing``, DEBUG)."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        TIMING.debug("%s %.4f", stage, time.perf_counter() - t0)


def run_stages(stages: tuple[Stage, ...], cg: CapturedGraph) -> CapturedGraph:
    """Run ``stages`` in order, each followed by the user passes registered after it."""
    for stage in stages:
        with timed(stage.name):
            cg = stage.run(cg) or cg
        cg = run_user_passes(stage.name, cg)
    return cg


def run_user_passes(point: str, cg: CapturedGraph) -> CapturedGraph:
    """The passes registered with ``register_pass(..., after=point)``, in registration order."""
    for registered in GRAPH_PASSES:
        if registered.after == point:
            cg = registered.function(cg) or cg
            cg.facts_fresh = False  # the user's pass may have edited the graph
            cg.gm.graph.lint()
            cg.gm.recompile()
    return cg


def analyse(model: nn.Module, example_inputs: Any, config: Optional[PruneConfig] = None,
            require_attention: bool = True) -> tuple[CapturedGraph, Plan]:
    """Capture, normalise and discover; raise NoAttentionError when nothing prunable is found."""
    config = config or PruneConfig()
    cg, plan = _capture_and_discover(model, example_inputs, config, config.frontend)
    opaque = opaque_calls(cg) if not plan.attention else []
    if opaque and config.frontend == "auto" and cg.frontend == "fx":
        # fx kept library functions whole (torch.fx.wrap, e.g. torchvision's shifted-window
        # attention); torch.export traces through them
        try:
            cg2, plan2 = _capture_and_discover(model, example_inputs, config, "export")
        except CaptureError:
            pass
        else:
            if plan2.attention:
                cg, plan = cg2, plan2
                plan.notes.append(f"fx kept {', '.join(opaque)} whole (no attention visible); "
                                  "captured with torch.export instead")
    rejected = [u for u in plan.unclaimed if u.what.startswith(("attention", "softmax"))]
    if require_attention and not plan.attention and plan.ffn and rejected:
        # the model has attention hiap_fx cannot cut exactly; its FFNs still can be: go on, loudly
        why = "; ".join(f"{u.node}: {u.reason}" for u in rejected[:3])
        message = (f"{type(model).__name__}: none of its {len(rejected)} attention(s) can be pruned "
                   f"exactly ({why}); only its {len(plan.ffn)} FFN sites are gated. The reasons are "
                   "in plan.unclaimed")
        plan.notes.append(message)
        warnings.warn(message, HiapWarning, stacklevel=3)
    elif require_attention and not plan.attention:
        first = sorted(plan.unclaimed, key=lambda u: not u.what.startswith("attention"))
        why = "; ".join(f"{u.node}: {u.reason}" for u in first[:5])
        raise NoAttentionError(
            f"no prunable attention found in {type(model).__name__} (graph of {len(cg.gm.graph.nodes)} "
            f"nodes, front end {cg.frontend})" + (f"; candidates rejected: {why}" if why else "") +
            (f"; opaque calls the tracer kept whole: {', '.join(opaque)} (if one is an attention "
             "kernel, register it with hiap_fx.register_attention_kernel)" if opaque else "")
            + (". These are attention hiap_fx cannot cut exactly (the reasons above); teach hiap_fx "
               "your attention with a registered kernel or a graph pass of your own "
               "(hiap_fx.register_pass; see docs/extending.md), or report the model" if rejected else
               ". hiap_fx prunes attention heads; for a model without attention use a channel "
               "pruner, or teach hiap_fx your attention with a registered kernel or a graph pass of "
               "your own (hiap_fx.register_pass; see docs/extending.md)"))
    return cg, plan


def _capture_and_discover(model: nn.Module, example_inputs: Any, config: PruneConfig,
                          frontend: str) -> tuple[CapturedGraph, Plan]:
    check_pass_points()
    with timed("capture"):
        cg = capture(model, example_inputs, frontend=frontend,
                     concrete_args=config.concrete_args, check=config.check_capture)
    cg.model_name = type(model).__name__
    cg = run_user_passes("capture", cg)
    cg = run_stages(ANALYSIS, cg)
    return cg, _plan(cg)


# ----------------------------------------------------------------------------------------------
# prepare: analysis, then gate and cost
# ----------------------------------------------------------------------------------------------


def prepare_model(model: nn.Module, example_inputs: Any, config: PruneConfig) -> PreparedModel:
    """capture -> ANALYSIS -> gate -> cost, and the budget check: the ``PreparedModel``."""
    cg, plan = analyse(model, example_inputs, config)
    prepared = gate_and_cost(cg, plan, config, reference=model)
    check_reachable(prepared)
    return prepared


def gate_and_cost(cg: CapturedGraph, plan: Plan, config: PruneConfig, record_notes: bool = True,
                  reference: Optional[nn.Module] = None) -> PreparedModel:
    """The last stages of ``prepare`` on an analysed graph (shapes and MACs propagated): insert
    the gates, derive and compile the cost model (and, with ``cost="latency"``, the latency
    model; ``reference`` is the user's model, timed as what latency fractions refer to).
    ``record_notes=False`` keeps ``plan.notes`` as they are (rebuilding a stored prepared model
    whose plan already holds them)."""
    notes = list(plan.notes)
    with timed("gate"):
        bundles = insert_gates(cg.gm, plan, config)
    if not record_notes:
        plan.notes[:] = notes
    with timed("cost"):
        cost_model = build_cost_model(cg, plan, bundles).compile()
    latency_model = None
    if config.cost == "latency":
        batch = config.latency_batch or cost_model.example_batch
        grid = config.unit_alignment(1 << 20)  # table points at multiples of the alignment
        latency_model = build_latency_model(cost_model, cg, compile_compact, batch, grid,
                                            reference=reference).compile()
    return PreparedModel(cg.gm, plan, cg.example_inputs, cost_model, config, captured=cg,
                         latency_model=latency_model)


def check_reachable(prepared: PreparedModel) -> None:
    """Raise ``BudgetError`` when a target the user set (``target_macs`` or ``target_latency``)
    is below what closing every gate reaches (the default target only warns: ``inspect`` and
    the own loop may not use it)."""
    import warnings

    from hiap_fx.errors import BudgetError, HiapWarning

    config = prepared.config
    target = config.budget_fraction
    if target is None:
        return
    floor = prepared.min_budget_ratio()
    if target >= floor - 1e-9:
        return
    field = "target_latency" if config.cost == "latency" and config.target_latency is not None else "target_macs"
    if config.cost == "latency":
        stays = (f"{100 * floor:.1f}% of the dense latency ({1e3 * floor * prepared.dense_latency:.2f} of "
                 f"{1e3 * prepared.dense_latency:.2f} ms as calibrated)")
    else:
        stays = (f"{100 * floor:.1f}% of the dense MACs ({prepared.min_macs():,} of "
                 f"{prepared.dense_macs:,})")
    message = (f"{field}={target} cannot be reached: {stays} stay whatever the gates decide (patch "
               "embedding, classifier head and what hiap_fx cannot cut). Choose "
               f"{field} >= {floor:.3f}")
    if field in config.model_fields_set:
        raise BudgetError(message)
    warnings.warn(f"the default {message}", HiapWarning, stacklevel=3)


# ----------------------------------------------------------------------------------------------
# compile (finalize)
# ----------------------------------------------------------------------------------------------


def _cleanup(cg: CapturedGraph) -> CapturedGraph:
    remove_assertions(cg.gm)
    eliminate_dead_code(cg.gm)
    return cg


def _fuse(cg: CapturedGraph) -> CapturedGraph:
    fuse_sibling_linears(cg.gm)
    return cg


def _package(cg: CapturedGraph) -> CapturedGraph:
    # a fresh module tree holding only what the graph uses: parameters in plain containers (no
    # stale Linear/attention attributes such as in_features or num_heads), leaf modules as is
    cg.gm = fx.GraphModule(cg.gm, cg.gm.graph, class_name="CompactModel")
    cg.gm.recompile()
    return cg


def compile_stages(decisions: dict[str, torch.Tensor]) -> tuple[Stage, ...]:
    """The compile pipeline for these hard decisions (``gate key -> bool per unit``)."""

    def strip(cg: CapturedGraph) -> CapturedGraph:
        strip_gates(cg.gm)
        cg.gm.recompile()
        return cg

    return (
        Stage("strip_gates", strip, "remove the gate bundles and mask multiplies"),
        Stage("propagate", count, "shapes of the trained, gate-free graph on meta tensors (values "
              "computed from weights recomputed, those computed from the input carried from prepare)"),
        Stage("slice", lambda cg: slice_sites(cg, _plan(cg), decisions), "cut closed units out"),
        Stage("cleanup", _cleanup, "runtime asserts and dead nodes removed (guards kept)"),
        Stage("fuse", _fuse, "sibling linears on one input become one matmul"),
        Stage("package", _package, "a fresh module tree with only what the graph uses"),
    )


def compile_compact(captured: CapturedGraph, decisions: dict[str, torch.Tensor]) -> fx.GraphModule:
    """The compact graph module of a prepared model's captured graph (``captured.gm`` is the gated
    graph; it is never changed) for the given hard decisions. The compile stages run on a copy
    of its tree that shares the weights (slicing replaces tensors, never writes into them); the
    compact model then gets its own copy of what it still shares, tensor by tensor."""
    cg = CapturedGraph(gm=tree_copy(captured.gm), example_inputs=captured.example_inputs,
                       frontend=captured.frontend, model_name=captured.model_name, plan=captured.plan,
                       values=dict(captured.values),  # the copy keeps the node names
                       input_dependent=set(captured.input_dependent))
    compact = run_stages(compile_stages(decisions), cg).gm
    unshare(compact, captured.gm)
    return compact


def precision_tolerance(prepared: PreparedModel, rtol: float) -> float:
    """``rtol``, or 8 machine epsilons of the model's lowest-precision weights when that is
    looser (bf16: 6.3e-2, fp16: 7.8e-3): the compact model sums in another order (padded heads,
    gathered rows) and rounds differently. MACs are still compared exactly."""
    dtypes = {p.dtype for n, p in prepared.named_parameters() if p.is_floating_point() and GATES_ATTR not in n}
    eps = max((torch.finfo(d).eps for d in dtypes), default=0.0)
    return max(rtol, 8 * eps)


def finalize_model(prepared: PreparedModel, verify: bool = True, rtol: float = 1e-4) -> fx.GraphModule:
    """COMPILE on a copy of the prepared model's IR, then verify (output and MACs) unless told not to."""
    compact = compile_compact(prepared.captured, prepared.decisions())
    compact.eval()
    if verify:
        folded = any(site.layout.batch_folded for site in prepared.plan.attention)
        with timed("verify"):
            verify_compact(compact, prepared, prepared.example_inputs, rtol=precision_tolerance(prepared, rtol),
                           batch_of_two=folded)
    return compact
