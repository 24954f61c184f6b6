"""hiap_fx: HiAP pruning of any Vision Transformer, compiled on its torch.fx graph.

Importing this package is light: timm and transformers are imported only when a model of
theirs is handled.
"""

from __future__ import annotations

from typing import Any

from hiap_fx.errors import (
    BudgetError,
    CaptureError,
    ConfigError,
    DataError,
    DiscoveryError,
    FileError,
    HiapError,
    HiapWarning,
    InputError,
    NoAttentionError,
    StateError,
)

__version__ = "0.1.0"

_LAZY = {
    "prepare": ("api", "prepare"),
    "inspect": ("api", "inspect"),
    "finalize": ("api", "finalize"),
    "prune": ("training.prune", "prune"),
    "PruneResult": ("training.prune", "PruneResult"),
    "PruneReport": ("training.report", "PruneReport"),
    "save": ("io", "save"),
    "load": ("io", "load"),
    "count_macs": ("graph.counting", "count_macs"),
    "PruneConfig": ("config", "PruneConfig"),
    "PreparedModel": ("gated.prepared", "PreparedModel"),
    "Plan": ("plan", "Plan"),
    "register_module_rewrite": ("registry", "register_module_rewrite"),
    "register_trace_hook": ("registry", "register_trace_hook"),
    "register_attention_kernel": ("registry", "register_attention_kernel"),
    "register_safe_module": ("registry", "register_safe_module"),
    "register_pass": ("registry", "register_pass"),
    "AttentionKernel": ("registry", "AttentionKernel"),
    "register_op_family": ("graph.ops", "register_op_family"),
}

__all__ = ["HiapError", "CaptureError", "ConfigError", "DiscoveryError", "InputError",
           "NoAttentionError", "StateError", "FileError", "DataError", "BudgetError", "HiapWarning",
           *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(f".{module}", __name__), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hiap_fx' has no attribute {name!r}")
