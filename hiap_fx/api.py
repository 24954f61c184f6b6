"""Public entry points: prepare() and inspect()."""

from __future__ import annotations

from typing import Any, Optional

from torch import nn

from hiap_fx.config import PruneConfig
from hiap_fx.gated.prepared import PreparedModel
from hiap_fx.graph.ir import CapturedGraph
from hiap_fx.passes.cost import build_cost_model
from hiap_fx.passes.gate import insert_gates
from hiap_fx.passes.pipeline import analyse
from hiap_fx.plan import Plan


def prepare(model: nn.Module, example_inputs: Any, config: Optional[PruneConfig] = None) -> PreparedModel:
    """Capture ``model`` (a deep copy; the original is not modified), find its attention and FFN
    sites, insert the HiAP gates, derive the symbolic cost model, and return a
    :class:`PreparedModel` with the same forward signature, in the model's train/eval mode.

    Args:
        model: any ``nn.Module`` holding a vision transformer.
        example_inputs: a tensor or a tuple of positional tensors at the size you will train at.
        config: a :class:`PruneConfig`; ``None`` means defaults.
    Raises:
        NoAttentionError: no attention was found; CaptureError: the model could not be captured.
    """
    config = config or PruneConfig()
    cg, plan = analyse(model, example_inputs, config)
    prepared = gate_and_cost(cg, plan, config)
    check_reachable(prepared)
    return prepared.train(model.training)


def check_reachable(prepared: PreparedModel) -> None:
    """Raise ``BudgetError`` when a ``target_macs`` the user set is below what closing every gate
    reaches (the default target only warns: ``inspect`` and the own loop may not use it)."""
    import warnings

    from hiap_fx.errors import BudgetError, HiapWarning

    config = prepared.config
    if config.target_macs is None:
        return
    floor = prepared.min_macs() / prepared.dense_macs
    if config.target_macs >= floor - 1e-9:
        return
    message = (f"target_macs={config.target_macs} cannot be reached: {100 * floor:.1f}% of the dense "
               f"MACs ({prepared.min_macs():,} of {prepared.dense_macs:,}) stay whatever the gates "
               "decide (patch embedding, classifier head and what hiap_fx cannot cut). Choose "
               f"target_macs >= {floor:.3f}")
    if "target_macs" in config.model_fields_set:
        raise BudgetError(message)
    warnings.warn(f"the default {message}", HiapWarning, stacklevel=3)


def gate_and_cost(cg: CapturedGraph, plan: Plan, config: PruneConfig,
                  record_notes: bool = True) -> PreparedModel:
    """The last stages of ``prepare`` on an analysed graph (shapes and MACs propagated): insert
    the gates, derive and compile the cost model. ``record_notes=False`` keeps ``plan.notes`` as
    they are (rebuilding a stored prepared model whose plan already holds them)."""
    notes = list(plan.notes)
    bundles = insert_gates(cg.gm, plan, config)
    if not record_notes:
        plan.notes[:] = notes
    cost_model = build_cost_model(cg, plan, bundles).compile()
    return PreparedModel(cg.gm, plan, cg.example_inputs, cost_model, config, captured=cg)


def inspect(model: nn.Module, example_inputs: Any, config: Optional[PruneConfig] = None,
            show: bool = True) -> Plan:
    """Find the prunable structure of ``model`` and (when ``show``) print it as a table followed
    by its MAC formula, one sympy expression per site.

    Returns the :class:`Plan`; raises ``NoAttentionError`` when the model has no attention.
    """
    from hiap_fx.gated.cost_model import format_cost

    prepared = prepare(model, example_inputs, config)
    if show:
        print(prepared.plan.summary())
        print()
        print(format_cost(prepared.cost_model))
    return prepared.plan


def finalize(prepared: PreparedModel, verify: bool = True, rtol: float = 1e-4) -> nn.Module:
    """The compact model: closed heads, dims, neurons and whole sub-layers physically removed.

    Units are kept exactly as eval mode decides (logit > 0 and parent macro gate on). The result
    is an ordinary ``fx.GraphModule`` (no gates, trainable, picklable, any batch size) in eval
    mode. With ``verify`` (default) its output on the example inputs is checked against
    ``prepared.eval()`` and its counted MACs against ``prepared.hard_macs()``; a mismatch raises
    ``HiapError``. ``prepared`` is not modified.
    """
    from hiap_fx.errors import InputError
    from hiap_fx.passes.pipeline import compile_compact
    from hiap_fx.passes.verify import verify_compact

    if not isinstance(prepared, PreparedModel):
        inner = getattr(prepared, "module", None)  # DistributedDataParallel / DataParallel
        hint = (" (unwrap it: finalize(ddp_model.module))" if isinstance(inner, PreparedModel)
                else "; pass the model hiap_fx.prepare returned (or PruneResult.prepared)")
        raise InputError(f"finalize() needs a hiap_fx.PreparedModel, got {type(prepared).__name__}{hint}")
    compact = compile_compact(prepared.captured, prepared.decisions())
    compact.eval()
    if verify:
        verify_compact(compact, prepared, prepared.example_inputs, rtol=rtol)
    return compact
