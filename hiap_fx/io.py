"""Keeping compact models: save/load without pickle and without the original model's class.

A saved file (``torch.save`` container read back with ``weights_only=True``) holds:
the graph's generated Python source, a state dict of tensors, the leaf modules the graph calls
(library classes such as ``torch.nn.GELU`` or timm's ``DropPath``, rebuilt from their class path
and plain attributes; never the model's own classes), and the plan as JSON.
Loading executes the stored graph source (plain torch calls, as readable as a model file) and
re-creates an ``fx.GraphModule``; no pickled Python objects are read.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Union

import torch
from torch import fx, nn

from .errors import HiapError
from .plan import Plan

FORMAT = "hiap_fx.compact/1"
_PLAIN = (bool, int, float, str, type(None))


def _leaf_spec(module: nn.Module, path: str) -> dict[str, Any]:
    cls = type(module)
    if "<locals>" in cls.__qualname__ or cls.__module__ == "__main__" or any(True for _ in module.children()):
        raise HiapError(f"cannot save module '{path}' ({cls.__module__}.{cls.__qualname__}) without "
                        "pickle: leaf modules must be importable classes without submodules; use "
                        "torch.save(compact) instead")
    attrs = {k: v for k, v in vars(module).items()
             if not k.startswith("_") and k != "training" and isinstance(v, _PLAIN + (tuple, list))}
    return {"class": f"{cls.__module__}.{cls.__qualname__}", "attrs": attrs, "training": module.training}


def _build_leaf(spec: dict[str, Any]) -> nn.Module:
    import importlib

    module_name, _, cls_name = spec["class"].rpartition(".")
    cls = getattr(importlib.import_module(module_name), cls_name, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise HiapError(f"cannot rebuild leaf module {spec['class']}: not an importable nn.Module")
    module = cls.__new__(cls)
    nn.Module.__init__(module)
    for k, v in spec["attrs"].items():
        setattr(module, k, v)
    module.train(spec["training"])
    return module


def save(compact: fx.GraphModule, path: Union[str, os.PathLike], plan: Optional[Plan] = None) -> None:
    """Write ``compact`` (from :func:`hiap_fx.finalize`) to ``path``; ``plan`` is stored alongside."""
    if not isinstance(compact, fx.GraphModule):
        raise HiapError(f"hiap_fx.save expects the fx.GraphModule returned by finalize, got "
                        f"{type(compact).__name__}")
    leaves = {str(n.target): _leaf_spec(compact.get_submodule(str(n.target)), str(n.target))
              for n in compact.graph.nodes if n.op == "call_module"}
    from torch.fx.graph_module import _format_import_block
    from torch.package import sys_importer

    globals_ = compact.graph.python_code(root_module="self").globals
    payload = {
        "format": FORMAT,
        "code": compact.code,
        "imports": _format_import_block(globals_, sys_importer),
        "state": dict(compact.state_dict()),
        "parameters": sorted(k for k, _ in compact.named_parameters()),
        "leaves": leaves,
        "training": compact.training,
        "plan": plan.model_dump_json() if plan is not None else None,
    }
    torch.save(payload, path)


def load(path: Union[str, os.PathLike], with_plan: bool = False) -> Any:
    """Read a file written by :func:`save`; returns the compact ``fx.GraphModule`` (and the
    :class:`Plan`, or None, when ``with_plan``)."""
    from torch.fx.graph_module import _deserialize_graph_module

    payload = torch.load(path, weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise HiapError(f"{path} is not a hiap_fx compact model file (format {FORMAT})")
    root = nn.Module()
    for target, spec in payload["leaves"].items():
        _set(root, target, _build_leaf(spec))
    parameters = set(payload["parameters"])
    for name, tensor in payload["state"].items():
        owner, _, attr = name.rpartition(".")
        container = _container(root, owner)
        if name in parameters:
            container.register_parameter(attr, nn.Parameter(tensor))
        else:
            container.register_buffer(attr, tensor)
    namespace: dict[str, Any] = {}
    exec(compile(payload["imports"] + payload["code"], str(path), "exec"), namespace)
    body = dict(root.__dict__)
    body["_code"] = payload["code"]
    gm = _deserialize_graph_module(namespace["forward"], body)
    gm.train(payload["training"])
    if with_plan:
        return gm, Plan.model_validate_json(payload["plan"]) if payload["plan"] else None
    return gm


def _container(root: nn.Module, path: str) -> nn.Module:
    cur = root
    for part in [p for p in path.split(".") if p]:
        if part not in cur._modules:
            cur.add_module(part, nn.Module())
        cur = cur._modules[part]
    return cur


def _set(root: nn.Module, path: str, module: nn.Module) -> None:
    owner, _, name = path.rpartition(".")
    _container(root, owner).add_module(name, module)
