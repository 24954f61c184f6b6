"""The analysis pipeline shared by ``prepare`` and ``inspect``: capture -> normalise -> discover."""

from __future__ import annotations

import warnings
from typing import Any, Optional

from torch import fx, nn

from .config import PruneConfig
from .errors import CaptureError, DiscoveryError, HiapWarning, NoAttentionError
from .ir import CapturedGraph
from .passes.capture import capture
from .passes.discover import discover
from .passes.normalise import normalise
from .passes.propagate import propagate
from .plan import Plan


def analyse(model: nn.Module, example_inputs: Any, config: Optional[PruneConfig] = None,
            require_attention: bool = True) -> tuple[CapturedGraph, Plan]:
    """Capture, normalise and discover; raise NoAttentionError when nothing prunable is found."""
    config = config or PruneConfig()
    cg, plan = _capture_and_discover(model, example_inputs, config, config.frontend)
    opaque = _opaque_calls(cg) if not plan.attention else []
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
             "kernel, register it with hiap_fx.register_attention_kernel)" if opaque else "") +
            ". hiap_fx prunes attention heads; for a model without attention use a channel "
            "pruner, or register a handler for your attention (see README, 'Extending')")
    return cg, plan


def _capture_and_discover(model: nn.Module, example_inputs: Any, config: PruneConfig,
                          frontend: str) -> tuple[CapturedGraph, Plan]:
    cg = capture(model, example_inputs, frontend=frontend,
                 concrete_args=config.concrete_args, check=config.check_capture)
    propagate(cg)
    normalise(cg)
    propagate(cg, count=True)
    plan = discover(cg, model_name=type(model).__name__)
    _refuse_shared_weights(cg, plan)
    _drop_unsliceable(cg, plan)
    return cg, plan


def _reads_values(user: fx.Node, tensor_node: fx.Node) -> bool:
    """Whether ``user`` reads the values of ``tensor_node`` (not only its shape or dtype)."""
    import builtins

    if user.op == "call_function" and user.target is builtins.getattr:
        return False
    if user.op == "call_method" and (user.target in ("size", "dim", "numel") or
                                     user.target == "type_as" and user.args[0] is not tensor_node):
        return False
    return True


def _refuse_shared_weights(cg: CapturedGraph, plan: Plan) -> None:
    """Raise ``DiscoveryError`` when a projection weight a site would cut is also used elsewhere
    (one linear shared by two FFNs, one attention module called twice, tied weights): slicing it
    for one use would break the other, and gating each use apart would not be one decision."""
    import torch

    uses: dict[int, set[str]] = {}  # tensor -> nodes that read it through any get_attr
    names: dict[int, str] = {}
    for node in cg.gm.graph.nodes:
        if node.op != "get_attr":
            continue
        try:
            tensor = cg.gm.get_parameter(str(node.target))
        except (AttributeError, KeyError):
            try:
                tensor = cg.gm.get_buffer(str(node.target))
            except (AttributeError, KeyError):
                continue
        if isinstance(tensor, torch.Tensor):
            uses.setdefault(id(tensor), set()).update(u.name for u in node.users if _reads_values(u, node))
            names.setdefault(id(tensor), str(node.target))
    owners: dict[int, list[str]] = {}
    problems: list[str] = []
    sites = [(s.name, [s.q, s.k, s.v, s.out]) for s in plan.attention] + \
            [(f.name, [*f.inputs, f.out]) for f in plan.ffn]
    for site, projections in sites:
        for proj in projections:
            for target in (proj.weight, proj.bias):
                if target is None:
                    continue
                try:
                    tensor = cg.gm.get_parameter(target)
                except (AttributeError, KeyError):
                    continue
                readers = uses.get(id(tensor), set())
                others = readers - {p.node for p in projections}
                if others:
                    problems.append(f"{site}: {target} is also read by node(s) {sorted(others)[:3]}")
                owners.setdefault(id(tensor), [])
                if site not in owners[id(tensor)]:
                    owners[id(tensor)].append(site)
    for key, sites_of in owners.items():
        if len(sites_of) > 1:
            problems.append(f"{names.get(key, '?')} belongs to sites {', '.join(sites_of)}")
    if problems:
        raise DiscoveryError(
            "shared weights: " + "; ".join(sorted(set(problems))[:4]) + ". hiap_fx cuts rows and "
            "columns of these weights for one site, which would change every other use. Give "
            "each use its own copy (e.g. copy.deepcopy of the module for each call) before "
            "prepare, or keep the shared module out of the model you prune")


def _opaque_calls(cg: CapturedGraph) -> list[str]:
    """Names of user-level Python functions kept as single calls (fx.wrap / autowrap), which
    may hide an attention kernel."""
    import torch

    names = []
    for node in cg.gm.graph.nodes:
        fn = node.target if node.op == "call_function" else None
        if isinstance(fn, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
            if fn.namespace not in ("aten", "prims", "_operator"):  # a custom operator
                names.append(str(fn))
            continue
        module = getattr(fn, "__module__", None) or ""
        root = module.split(".")[0]
        if fn is not None and root not in ("torch", "_operator", "operator", "builtins", "math"):
            names.append(str(getattr(fn, "__qualname__", fn)))
    return sorted(set(names))[:5]


def _drop_unsliceable(cg: CapturedGraph, plan: Plan) -> None:
    """Report attention sites that finalize could not rebuild as unclaimed (never gate them)."""
    from .passes.slice import unsliceable_attention
    from .plan import Unclaimed

    bad = unsliceable_attention(cg, plan)
    if not bad:
        return
    for site in [s for s in plan.attention if s.name in bad]:
        plan.attention.remove(site)
        plan.unclaimed.append(Unclaimed(node=site.core_nodes[0], what=f"attention {site.name}",
                                        reason=f"cannot be sliced: {bad[site.name].split(': ', 1)[-1][:200]}"))
