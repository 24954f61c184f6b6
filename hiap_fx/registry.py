"""Registries through which architecture knowledge enters hiap_fx (the core stays generic).

* module rewrites: replace a module the tracer cannot see into (e.g. ``nn.MultiheadAttention``)
  by an equivalent module it can, before capture;
* trace hooks: extra leaf-module predicates and autowrap functions for a model family
  (e.g. timm's helper functions that branch on shapes);
* graph passes: a function over the captured graph run at a named point of the pipeline
  (``hiap_fx.passes.pipeline``), the general form of the registrations below;
* attention kernels: a function that computes attention in one call (a fused or custom kernel),
  kept as one node by the tracer and treated by discovery, gating, cost and slicing like
  ``scaled_dot_product_attention``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn


@dataclass(frozen=True)
class ModuleRewrite:
    """Replace every submodule for which ``matches`` is true by ``build(module)``."""

    name: str
    matches: Callable[[nn.Module], bool]
    build: Callable[[Any], nn.Module]


@dataclass(frozen=True)
class TraceHook:
    """Tracing help for a family of models, active when ``applies(model)`` is true."""

    name: str
    applies: Callable[[nn.Module], bool]
    autowrap_functions: Callable[[], Iterable[Callable]] = field(default=lambda: ())
    autowrap_modules: Callable[[], Iterable[object]] = field(default=lambda: ())


@dataclass(frozen=True)
class AttentionKernel:
    """A function computing ``softmax(q k^T * scale) v`` independently for every head, called with
    q, k, v as its first three positional arguments (extra arguments pass through unchanged).

    Args:
        name: a label for reports.
        function: the Python function the model calls (auto-wrapped: the fx front end keeps each
            call as one node) or a custom operator (``torch.library.custom_op``, ``torch.ops.x.y``),
            which both front ends keep as one node.
        layout: ``"BHND"`` (heads before tokens, like sdpa) or ``"BNHD"`` (tokens before heads,
            like flash-attn / xformers); the last axis always holds the head dims.
        scale_arg: keyword through which the kernel takes its softmax scale. hiap_fx pins it to
            ``q.shape[-1] ** -0.5`` of the dense model when the call does not pass it, so cutting
            q/k dims keeps the dense scale. ``None``: the kernel derives its scale itself, so
            only whole heads and value dims are cut (q/k dims are left whole).
    """

    name: str
    function: Callable
    layout: str = "BHND"
    scale_arg: Optional[str] = None

    def __post_init__(self) -> None:
        if self.layout not in ("BHND", "BNHD"):
            raise ValueError(f"AttentionKernel {self.name!r}: layout must be 'BHND' or 'BNHD', "
                             f"not {self.layout!r}")

    @property
    def token_axis(self) -> int:
        """Axis of q, k and v that holds the tokens (counted from the end)."""
        return -2 if self.layout == "BHND" else -3


@dataclass(frozen=True)
class GraphPass:
    """A user pass ``function(captured_graph) -> captured_graph`` run after the pipeline stage
    ``after`` (see ``hiap_fx.passes.pipeline.PASS_POINTS``)."""

    name: str
    function: Callable[[Any], Any]
    after: str = "capture"


MODULE_REWRITES: list[ModuleRewrite] = []
GRAPH_PASSES: list[GraphPass] = []
#: functions hiap_fx itself puts into graphs (allowed in stored graphs)
SAFE_FUNCTIONS: list[Callable] = []
#: leaf-module classes a stored graph may instantiate, by qualified name (class or lazy loader)
SAFE_MODULES: dict[str, Callable[[], type]] = {}
TRACE_HOOKS: list[TraceHook] = []
ATTENTION_KERNELS: dict[Callable, AttentionKernel] = {}


def register_module_rewrite(rewrite: ModuleRewrite) -> ModuleRewrite:
    """Add a module rewrite (applied outermost-first, before tracing)."""
    MODULE_REWRITES.append(rewrite)
    return rewrite


def register_trace_hook(hook: TraceHook) -> TraceHook:
    """Add a trace hook (e.g. autowrap functions of a model library)."""
    TRACE_HOOKS.append(hook)
    return hook


def register_attention_kernel(kernel: AttentionKernel) -> AttentionKernel:
    """Teach hiap_fx an attention kernel (see :class:`AttentionKernel`): a Python function (it is
    auto-wrapped for the fx tracer) or a custom operator (``torch.library.custom_op`` or an
    ``torch.ops`` overload / packet: one node under both fx and torch.export)."""
    fn = kernel.function
    targets = [fn]
    overload = getattr(fn, "_opoverload", None)  # torch.library.custom_op
    if overload is not None:
        targets.append(overload)
    if isinstance(fn, torch._ops.OpOverloadPacket):
        targets += [getattr(fn, name) for name in fn.overloads()]
    is_python_function = inspect.isfunction(fn)
    if is_python_function and fn not in ATTENTION_KERNELS:
        register_trace_hook(TraceHook(name=f"attention kernel {kernel.name}", applies=lambda m: True,
                                      autowrap_functions=lambda: (fn,)))
    for target in targets:
        ATTENTION_KERNELS[target] = kernel
    return kernel


def register_pass(function: Callable[[Any], Any], after: str = "capture",
                  name: Optional[str] = None) -> Callable[[Any], Any]:
    """Run ``function`` on the shared IR (a ``CapturedGraph``: ``.gm`` is the fx.GraphModule) after
    the pipeline stage ``after``: ``"capture"`` (the raw graph, before normalisation: the place
    for rewriting an op or module of your own into ops discovery knows), ``"normalise"``,
    ``"discover"`` (the plan is set), ... It may edit ``cg.gm`` in place and return ``cg`` (or
    None); the pipeline lints and recompiles the graph after it. ``prepare`` refuses an unknown
    point (``hiap_fx.passes.pipeline.PASS_POINTS``). Usable as a decorator."""
    GRAPH_PASSES.append(GraphPass(str(name or getattr(function, "__name__", "pass")), function, after))
    return function


def register_safe_module(cls: Any, name: Optional[str] = None) -> Any:
    """Allow ``hiap_fx.load`` to rebuild leaf modules of class ``cls`` (an ``nn.Module`` subclass
    whose forward is plain code and whose state is tensors plus plain attributes) from a file.

    ``cls`` may also be a qualified name with a loader (``name`` given, ``cls`` a zero-argument
    callable returning the class), so that the library defining it is imported only when a file
    names it. Usable as a class decorator.
    """
    if isinstance(cls, type):
        if not issubclass(cls, nn.Module):
            raise TypeError(f"register_safe_module: {cls!r} is not an nn.Module subclass")
        key = name or f"{cls.__module__}.{cls.__qualname__}"
        SAFE_MODULES[key] = lambda: cls
    else:
        if name is None:
            raise TypeError("register_safe_module: give the class, or a loader and its name")
        SAFE_MODULES[name] = cls
    return cls


def safe_module_class(name: str) -> Optional[type]:
    """The registered safe module class called ``name``, or None."""
    loader = SAFE_MODULES.get(name)
    if loader is None:
        return None
    try:
        return loader()
    except ImportError:
        return None


def attention_kernel(node: Any) -> Optional[AttentionKernel]:
    """The registered kernel a graph node calls, if any."""
    target = getattr(node, "target", None)
    if getattr(node, "op", None) != "call_function":
        return None
    try:
        return ATTENTION_KERNELS.get(target) if target is not None else None
    except TypeError:  # an unhashable target
        return None
