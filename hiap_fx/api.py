"""Public entry points: prepare(), inspect() and finalize() (the pipeline itself is in
:mod:`hiap_fx.passes.pipeline`)."""

from __future__ import annotations

from typing import Any, Optional

from torch import nn

from hiap_fx.config import PruneConfig
from hiap_fx.gated.prepared import PreparedModel
from hiap_fx.passes.pipeline import finalize_model, prepare_model
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
    prepared = prepare_model(model, example_inputs, config or PruneConfig())
    return prepared.train(model.training)


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
    ``HiapError``. Low-precision weights are compared in their own dtype with a tolerance of
    8 machine epsilons when that is looser than ``rtol`` (bf16: 6.3e-2, fp16: 7.8e-3); MACs
    exactly. ``prepared`` is not modified.
    """
    from hiap_fx.errors import InputError

    if not isinstance(prepared, PreparedModel):
        inner = getattr(prepared, "module", None)  # DistributedDataParallel / DataParallel
        hint = (" (unwrap it: finalize(ddp_model.module))" if isinstance(inner, PreparedModel)
                else "; pass the model hiap_fx.prepare returned (or PruneResult.prepared)")
        raise InputError(f"finalize() needs a hiap_fx.PreparedModel, got {type(prepared).__name__}{hint}")
    return finalize_model(prepared, verify=verify, rtol=rtol)
