"""timm: honour its autowrap (no-trace) functions; never use its leaf modules (they hide attention)."""

from __future__ import annotations

import sys
from typing import Callable, Iterable

from torch import nn

from hiap_fx.registry import TraceHook, register_trace_hook


def _is_timm_model(model: nn.Module) -> bool:
    return any(type(m).__module__.startswith("timm.") for m in model.modules())


def _timm_autowrap_functions() -> Iterable[Callable]:
    fx_mod = sys.modules.get("timm.layers._fx")
    if fx_mod is None:
        import timm.layers._fx as fx_mod  # the model is a timm model, so timm is importable
    assert fx_mod is not None
    return list(fx_mod.get_notrace_functions())


register_trace_hook(
    TraceHook(name="timm", applies=_is_timm_model, autowrap_functions=_timm_autowrap_functions)
)
