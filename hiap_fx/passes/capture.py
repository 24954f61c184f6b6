"""Capture: turn any model into an ordinary fx.GraphModule, by torch.fx or by torch.export.

The user's model is never touched: capture works on deep copies. Modules the tracer cannot see
into are first replaced through the registered module rewrites (see ``hiap_fx.registry``).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import warnings
from collections import Counter
from typing import Any, Optional, Sequence

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from hiap_fx.errors import CaptureError, InputError
from hiap_fx.graph.editing import tree_copy
from hiap_fx.graph.ir import CapturedGraph, as_input_tuple
from hiap_fx.handlers import ensure_builtin_handlers
from hiap_fx.passes.arguments import pin_fixed_arguments
from hiap_fx.passes.propagate import recording_run
from hiap_fx.registry import MODULE_REWRITES, TRACE_HOOKS

_ASSERT_TARGETS = {"_assert", "_assert_is_none", "_assert_scalar", "_assert_tensor_metadata",
                   "sym_constrain_range_for_size", "sym_constrain_range", "_assert_async"}


def apply_module_rewrites(model: nn.Module) -> list[str]:
    """Replace, in place on ``model`` (a private copy), every module a registered rewrite matches."""
    done: list[str] = []

    def visit(parent: nn.Module, prefix: str) -> None:
        for name, child in list(parent.named_children()):
            path = f"{prefix}{name}"
            for rw in MODULE_REWRITES:
                if rw.matches(child):
                    setattr(parent, name, rw.build(child))
                    done.append(f"{path}: {rw.name}")
                    child = getattr(parent, name)
                    break
            visit(child, path + ".")

    visit(model, "")
    return done


def _switches_on_training(module: nn.Module) -> bool:
    """A parameter-free module whose forward branches on ``self.training`` (e.g. DropPath)."""
    if any(True for _ in module.parameters()) or type(module).__module__.startswith("torch."):
        return False
    try:
        src = inspect.getsource(type(module).forward)
    except (OSError, TypeError):
        return False
    hides_compute = any(tok in src for tok in ("softmax", "matmul", "@", "scaled_dot_product", "linear"))
    return "self.training" in src and not hides_compute


class HiapTracer(fx.Tracer):
    """fx tracer: torch.nn leaves plus training-switch modules as leaves; library autowraps."""

    def __init__(self, autowrap_functions: Sequence[Any] = ()) -> None:
        super().__init__(autowrap_modules=(math,), autowrap_functions=tuple(autowrap_functions))

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as exc:
            if not hasattr(exc, "hiap_module"):
                try:
                    path = self.path_of_module(m)
                except Exception:
                    path = "?"
                exc.hiap_module = f"{path or '<root>'} ({type(m).__name__})"  # type: ignore[attr-defined]  # tagging the exception for the message
            raise

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if _switches_on_training(m):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def default_concrete_args(model: nn.Module, n_inputs: int,
                          user: Optional[dict[str, Any]]) -> dict[str, Any]:
    """The fixed forward parameters, in signature order: those the example inputs do not cover,
    at the value ``user`` (``PruneConfig.concrete_args``) gives or else their default."""
    user = dict(user or {})
    concrete: dict[str, Any] = {}
    params = [p for p in inspect.signature(model.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    for p in params[n_inputs:]:
        if p.name in user:
            concrete[p.name] = user.pop(p.name)
        elif p.default is not p.empty:
            concrete[p.name] = p.default
    concrete.update(user)  # names forward does not list (e.g. taken by **kwargs)
    return concrete


def trace_fx(model: nn.Module, inputs: tuple[torch.Tensor, ...],
             concrete_args: Optional[dict[str, Any]] = None) -> fx.GraphModule:
    """torch.fx symbolic trace of ``model`` (already a private copy, in eval mode)."""
    autowrap: list[Any] = []
    for hook in TRACE_HOOKS:
        if hook.applies(model):
            autowrap.extend(hook.autowrap_functions())
    tracer = HiapTracer(autowrap)
    concrete = default_concrete_args(model, len(inputs), concrete_args)
    graph = tracer.trace(model, concrete_args=concrete or None)
    name = f"{type(model).__name__}Graph"
    return fx.GraphModule(tracer.root, graph, class_name=name)


def _structure_node(graph: fx.Graph, obj: Any) -> Any:
    """Re-create an output structure (tuples, dicts, namedtuples, dataclasses) as graph args."""
    if isinstance(obj, fx.Node):
        return obj
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return graph.call_function(type(obj), tuple(_structure_node(graph, v) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_structure_node(graph, v) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        items = obj.items() if hasattr(obj, "items") else (
            (f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj))
        return graph.call_function(type(obj), (), {k: _structure_node(graph, v) for k, v in items})
    if isinstance(obj, dict):
        return {k: _structure_node(graph, v) for k, v in obj.items()}
    return obj


class BatchSpecialised(Exception):
    """torch.export fixed the batch size of an input (the model used it as a Python int)."""


def export_graph(model: nn.Module, inputs: tuple[torch.Tensor, ...],
                 kwargs: Optional[dict[str, Any]] = None) -> fx.GraphModule:
    """torch.export front end, converted back into a plain, picklable fx.GraphModule. The batch
    axis stays dynamic; ``BatchSpecialised`` when the model forces a fixed batch size."""
    ex = tuple(t.expand(2, *t.shape[1:]).clone() if t.dim() and t.shape[0] == 1 else t for t in inputs)
    dyn = tuple({0: torch.export.Dim.AUTO} if t.dim() else None for t in ex)
    kwargs = dict(kwargs or {})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = torch.export.export(model, ex, kwargs=kwargs or None,
                                 dynamic_shapes=(*dyn, *([None] * len(kwargs))) if kwargs else dyn,
                                 strict=False)
    _check_dynamic_batch(ep, ex)
    if _mutates(ep.graph):
        # in-place writes into views (``attn[:, :, 1:] = ...`` is a copy_ into a slice) hide data
        # flow from the graph: functionalised, they become slice_scatter and friends
        ep = ep.run_decompositions({})
    egm = ep.module()
    graph = copy.deepcopy(egm.graph)
    out_spec = ep.call_spec.out_spec
    graph._codegen = fx.graph.CodeGen()
    graph._tracer_cls = None
    for node in list(graph.nodes):
        if node.op == "call_module" and str(node.target).startswith("_guards"):
            graph.erase_node(node)
    output = next(n for n in graph.nodes if n.op == "output")
    flat = list(output.args[0]) if isinstance(output.args[0], (list, tuple)) else [output.args[0]]
    with graph.inserting_before(output):
        structured = _structure_node(graph, pytree.tree_unflatten(flat, out_spec))
    output.args = (structured,)
    gm = fx.GraphModule(egm, graph, class_name=f"{type(model).__name__}Graph")
    return gm


_VIEW_OPS = {"slice", "select", "view", "reshape", "transpose", "permute", "expand", "as_strided",
             "unsqueeze", "squeeze", "alias", "diagonal", "narrow", "t", "unfold", "split", "chunk",
             "unbind", "getitem"}


def _mutates(graph: fx.Graph) -> bool:
    """Whether a node writes in place into a tensor that something else reads too: a view of
    another tensor (``attn[:, :, 1:] = ...`` copies into a slice), or one with other users (an
    in-place op on a tensor nothing else reads, ``relu_(conv(x))``, hides no data flow)."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    for n in graph.nodes:
        if not (n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)
                and n.target._schema.is_mutable and n.args and isinstance(n.args[0], fx.Node)):
            continue
        target = n.args[0]
        base = target.target.__name__.split(".")[0] if callable(target.target) else str(target.target)
        if base in _VIEW_OPS or any(u is not n and order[u] > order[n] for u in target.users):
            return True
    return False


def _check_dynamic_batch(ep: Any, inputs: tuple[torch.Tensor, ...]) -> None:
    names = set(ep.graph_signature.user_inputs)
    user = [n for n in ep.graph.nodes if n.op == "placeholder" and n.name in names]
    for i, (node, t) in enumerate(zip(user, inputs)):
        val = node.meta.get("val")
        size = val.shape[0] if isinstance(val, torch.Tensor) and t.dim() else None
        # a SymInt whose expression became a number was specialised (guarded) by the trace
        if size is not None and str(size).lstrip("-").isdigit():
            raise BatchSpecialised(
                f"torch.export fixed the batch size of input {i} to {size}: the model uses the "
                "batch size as a Python int (e.g. len(x), int(x.shape[0]) or a loop over the batch), "
                "so the captured graph would fail at every other batch size. Write x.shape[0] "
                "instead of len(x) (e.g. cls_token.expand(x.shape[0], -1, -1)), or make the model "
                "traceable by torch.fx")


def restore_output_structure(gm: fx.GraphModule, reference: Any) -> bool:
    """Give the graph's output the container types of the model's own output (a tracer may turn a
    ``ModelOutput`` or dataclass into a plain dict). Returns whether the output was rebuilt."""
    want = pytree.tree_structure(reference)
    output = next(n for n in gm.graph.nodes if n.op == "output")
    flat, _ = pytree.tree_flatten(output.args[0])
    if type(output.args[0]) is type(reference) or len(flat) != want.num_leaves:
        return False
    with gm.graph.inserting_before(output):
        output.args = (_structure_node(gm.graph, pytree.tree_unflatten(flat, want)),)
    gm.recompile()
    return True


def remove_assertions(gm: fx.GraphModule) -> int:
    """Drop runtime guard/assert nodes (they break re-tracing after save/load), then DCE."""
    removed = 0
    for node in reversed(list(gm.graph.nodes)):
        if node.op == "call_function":
            name = getattr(node.target, "__name__", "")
            if isinstance(node.target, torch._ops.OpOverload):
                name = node.target._schema.name.split("::")[-1]
            if name in _ASSERT_TARGETS and not node.users:
                gm.graph.erase_node(node)
                removed += 1
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return removed


def outputs_match(a: Any, b: Any, rtol: float = 1e-5) -> tuple[bool, float]:
    """Whether two output structures hold the same tensors (max abs diff relative to scale)."""
    la, lb = pytree.tree_leaves(a), pytree.tree_leaves(b)
    ta = [x for x in la if isinstance(x, torch.Tensor)]
    tb = [x for x in lb if isinstance(x, torch.Tensor)]
    if len(ta) != len(tb) or not ta:
        return False, float("inf")
    worst = 0.0
    for x, y in zip(ta, tb):
        if x.shape != y.shape:
            return False, float("inf")
        x, y = x.detach().double(), y.detach().double()
        scale = max(float(x.abs().max()) if x.numel() else 0.0, 1e-12)
        worst = max(worst, float((x - y).abs().max()) / scale if x.numel() else 0.0)
    return worst <= rtol, worst


def _check_dtype_and_device(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
    """Weights and inputs on different devices, or float inputs in another dtype than the
    weights (bf16 weights, float32 images): refused up front, with the fix. Any weight dtype is
    prepared; gates, the controller and the cost model stay float32 next to them."""
    tensors = list(model.parameters()) + list(model.buffers())
    devices = {t.device for t in tensors} | {t.device for t in inputs}
    if len(devices) > 1:
        where = ", ".join(sorted(str(d) for d in devices))
        raise InputError(f"{type(model).__name__}'s weights and the example inputs are on different "
                         f"devices ({where}); move both to one device (model.to(x.device))")
    counts = Counter(p.dtype for p in model.parameters() if p.is_floating_point())
    if not counts:
        return
    weights = counts.most_common(1)[0][0]
    for i, t in enumerate(inputs):
        if t.is_floating_point() and t.dtype != weights:
            raise InputError(f"example input {i} is {t.dtype}, the model's weights are {weights}; "
                             f"pass example inputs in the weights' dtype (x.to({weights}))")


def capture(model: nn.Module, example_inputs: Any, frontend: str = "auto",
            concrete_args: Optional[dict[str, Any]] = None, check: bool = True) -> CapturedGraph:
    """Capture ``model`` as a GraphModule (fx first, torch.export when fx cannot)."""
    ensure_builtin_handlers()
    if not isinstance(model, nn.Module):
        raise InputError(f"prepare() needs a torch.nn.Module, got {type(model).__name__}")
    inputs = as_input_tuple(example_inputs)
    _check_dtype_and_device(model, inputs)
    work = copy.deepcopy(model).eval()
    rewrites = apply_module_rewrites(work)
    fixed = default_concrete_args(work, len(inputs), concrete_args)
    with torch.no_grad():
        try:
            reference = work(*inputs, **dict(concrete_args or {}))
        except Exception as exc:  # the model itself rejects the inputs
            raise InputError(f"the model fails on example_inputs of shapes "
                             f"{[tuple(t.shape) for t in inputs]}: {type(exc).__name__}: {exc}. "
                             "Pass inputs the model accepts") from exc
    failures: list[str] = []
    for kind in (["fx", "export"] if frontend == "auto" else [frontend]):
        try:
            # tracing may write into module caches (attributes): trace a copy of the tree,
            # sharing the weights of ``work``, the one copy of the user's weights
            subject = tree_copy(work).eval()
            gm = (trace_fx(subject, inputs, concrete_args) if kind == "fx"
                  else export_graph(subject, inputs, concrete_args))
            remove_assertions(gm)
            pin_fixed_arguments(gm, fixed, len(inputs))
            restore_output_structure(gm, reference)
            gm.eval()
            cg = CapturedGraph(gm=gm, example_inputs=inputs, frontend=kind)
            if check:
                # the check's run records every node's facts: the propagate stage reuses them
                got = recording_run(cg)
                ok, err = outputs_match(reference, got)
                if not ok:
                    failures.append(f"{kind}: captured graph differs from the model (rel. error {err:.2e})")
                    continue
                if type(got) is not type(reference):
                    failures.append(f"{kind}: the captured graph returns {type(got).__name__}, the "
                                    f"model {type(reference).__name__}")
                    continue
            cg.notes.extend(f"rewritten before capture: {r}" for r in rewrites)
            cg.notes.extend(f"front end {f.split(':')[0]} failed, fell back: {f}" for f in failures)
            return cg
        except CaptureError:
            raise
        except BatchSpecialised as exc:
            failures.append(f"{kind}: {exc}")
        except Exception as exc:
            where = getattr(exc, "hiap_module", None)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            failures.append(f"{kind}: {type(exc).__name__}" + (f" in module {where}" if where else "")
                            + f": {first[:300]}")
    raise CaptureError(
        f"could not capture {type(model).__name__}: " + "; ".join(failures) + ". Remedies: pass "
        "concrete_args in PruneConfig for forward arguments that steer control flow, choose "
        "PruneConfig(frontend='export'), or register a module rewrite for the untraceable module "
        "(hiap_fx.registry.register_module_rewrite)")
