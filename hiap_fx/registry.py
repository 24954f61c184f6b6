"""Registries through which architecture knowledge enters hiap_fx (the core stays generic).

* module rewrites: replace a module the tracer cannot see into (e.g. ``nn.MultiheadAttention``)
  by an equivalent module it can, before capture;
* trace hooks: extra leaf-module predicates and autowrap functions for a model family
  (e.g. timm's helper functions that branch on shapes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

from torch import nn


@dataclass(frozen=True)
class ModuleRewrite:
    """Replace every submodule for which ``matches`` is true by ``build(module)``."""

    name: str
    matches: Callable[[nn.Module], bool]
    build: Callable[[nn.Module], nn.Module]


@dataclass(frozen=True)
class TraceHook:
    """Tracing help for a family of models, active when ``applies(model)`` is true."""

    name: str
    applies: Callable[[nn.Module], bool]
    autowrap_functions: Callable[[], Iterable[Callable]] = field(default=lambda: ())
    autowrap_modules: Callable[[], Iterable[object]] = field(default=lambda: ())


MODULE_REWRITES: list[ModuleRewrite] = []
TRACE_HOOKS: list[TraceHook] = []


def register_module_rewrite(rewrite: ModuleRewrite) -> ModuleRewrite:
    """Add a module rewrite (applied outermost-first, before tracing)."""
    MODULE_REWRITES.append(rewrite)
    return rewrite


def register_trace_hook(hook: TraceHook) -> TraceHook:
    """Add a trace hook (e.g. autowrap functions of a model library)."""
    TRACE_HOOKS.append(hook)
    return hook


def _load_builtin_handlers() -> None:
    from .handlers import timm_hooks, torch_nn  # noqa: F401  (registration side effects)


_load_builtin_handlers_done = False


def ensure_builtin_handlers() -> None:
    """Register the built-in handlers once (they import nothing heavy)."""
    global _load_builtin_handlers_done
    if not _load_builtin_handlers_done:
        _load_builtin_handlers_done = True
        _load_builtin_handlers()
