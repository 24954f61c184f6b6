"""Keeping models on disk as data: ``hiap_fx.save`` / ``hiap_fx.load``.

A file is a ``torch.save`` container read back with ``weights_only=True``: tensors plus plain
values. The graph is stored as a node list whose call targets, tensor methods, leaf-module
classes and output containers are resolved against an allow-list when it is read (see
:mod:`hiap_fx.files.allowlist`); no stored source is executed and nothing the file names is
imported unless the caller passes ``trust=True``. Every file is written atomically.

* a compact model (from :func:`hiap_fx.finalize`): format ``hiap_fx.compact/2``;
* a prepared model (gates and all): format ``hiap_fx.gated.prepared/1``: the normalised graph without
  gates, its weights, the plan, config and example inputs, and the gate logits and controller
  state; loading re-inserts the gates and re-derives the cost model from the graph.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Optional, Union

import torch
from torch import fx

from hiap_fx.errors import FileError, HiapError, HiapWarning, StateError
from hiap_fx.files.atomic import write_with
from hiap_fx.files.graph_data import graph_from_data, graph_to_data, unstorable_entries
from hiap_fx.files.reading import read_payload
from hiap_fx.plan import Plan

COMPACT_FORMAT = "hiap_fx.compact/2"
PREPARED_FORMAT = "hiap_fx.gated.prepared/1"
PathLike = Union[str, os.PathLike]


def save(model: Any, path: PathLike, plan: Optional[Plan] = None) -> None:
    """Write a compact model (``fx.GraphModule`` from :func:`hiap_fx.finalize`) or a
    ``PreparedModel`` to ``path`` as data (atomically; no pickle). ``plan`` is stored with a
    compact model (a prepared model carries its own)."""
    from hiap_fx.gated.prepared import PreparedModel

    if isinstance(model, PreparedModel):
        payload = prepared_payload(model)
    elif isinstance(model, fx.GraphModule):
        structure, tensors = graph_to_data(model)
        problems = unstorable_entries(structure)
        if problems:
            warnings.warn(f"{path}: hiap_fx.load will read this file only with trust=True or after "
                          f"registering what it names: {problems[0]}", HiapWarning, stacklevel=2)
        payload = {"format": COMPACT_FORMAT, "graph": structure, "tensors": tensors,
                   "plan": plan.model_dump_json() if plan is not None else None}
    else:
        raise HiapError(f"hiap_fx.save expects the fx.GraphModule returned by finalize or a "
                        f"PreparedModel, got {type(model).__name__}")
    write_with(path, lambda tmp: torch.save(payload, tmp))


def load(path: PathLike, with_plan: bool = False, trust: bool = False, map_location: Any = None) -> Any:
    """Read a file written by :func:`save`: the compact ``fx.GraphModule`` (with ``with_plan``:
    ``(module, plan or None)``) or the ``PreparedModel``.

    Nothing in the file is executed and nothing it names is imported outside the allow-list; a
    crafted, foreign, truncated or missing file raises ``FileError`` naming the file (and the
    offending entry). ``trust=True`` resolves call targets and module classes outside the
    allow-list by importing them: use it only for files from a source you trust.
    """
    payload = read_payload(path, (COMPACT_FORMAT, PREPARED_FORMAT), "a hiap_fx model file (hiap_fx.save)",
                           map_location=map_location)
    plan = _plan(payload.get("plan"), path)
    if payload["format"] == PREPARED_FORMAT:
        prepared = prepared_from_payload(payload, str(path), trust)
        return (prepared, prepared.plan) if with_plan else prepared
    gm = graph_from_data(_structure(payload, path), _tensors(payload.get("tensors"), path), str(path), trust)
    return (gm, plan) if with_plan else gm


def _plan(text: Any, path: PathLike) -> Optional[Plan]:
    if text is None:
        return None
    try:
        return Plan.model_validate_json(text)
    except Exception as exc:
        raise FileError(f"{path}: the stored plan is not valid ({str(exc)[:200]})") from None


def _structure(payload: dict[str, Any], path: PathLike) -> dict[str, Any]:
    graph = payload.get("graph")
    if not isinstance(graph, dict):
        raise FileError(f"{path}: the graph entry is missing or not a node list")
    return graph


def _tensors(value: Any, path: PathLike) -> dict[str, torch.Tensor]:
    if not isinstance(value, dict) or not all(isinstance(v, torch.Tensor) for v in value.values()):
        raise FileError(f"{path}: the tensor table is missing or holds non-tensors")
    return value


# ----------------------------------------------------------------------------------------------
# prepared models (also the model part of prune checkpoints)
# ----------------------------------------------------------------------------------------------


def prepared_payload(prepared: Any) -> dict[str, Any]:
    """A ``PreparedModel`` as data: its graph without gates and that graph's tensors, the gate
    and controller state, plan, config and example inputs."""
    from hiap_fx.gated.bundles import GATES_ATTR
    from hiap_fx.passes.gate import gate_nodes

    skip, forward = gate_nodes(prepared.graph_module.graph)
    structure, tensors = graph_to_data(prepared.graph_module, skip=lambda n: n in skip,
                                       forward={a.name: b.name for a, b in forward.items()})
    structure["tensors"] = {k: v for k, v in structure["tensors"].items()
                            if not k.startswith(GATES_ATTR + ".")}
    tensors = {k: v for k, v in tensors.items() if not k.startswith(GATES_ATTR + ".")}
    graph_keys = {f"graph_module.{k}" for k in tensors}
    rest = {k: v for k, v in prepared.state_dict().items() if k not in graph_keys}
    return {"format": PREPARED_FORMAT, "graph": structure, "tensors": tensors, "state": rest,
            "plan": prepared.plan.model_dump_json(), "config": prepared.config.model_dump_json(),
            "example_inputs": list(prepared.example_inputs), "frontend": prepared.plan.frontend,
            "training": prepared.training}


def prepared_from_payload(payload: dict[str, Any], source: str, trust: bool = False) -> Any:
    """Rebuild the ``PreparedModel`` of :func:`prepared_payload`: the gates are inserted again and
    the cost model re-derived from the graph, then the stored gate and controller state loaded."""
    from hiap_fx.config import PruneConfig
    from hiap_fx.graph.ir import CapturedGraph
    from hiap_fx.passes.pipeline import gate_and_cost
    from hiap_fx.passes.propagate import propagate

    tensors = _tensors(payload.get("tensors"), source)
    gm = graph_from_data(_structure(payload, source), tensors, source, trust)
    plan = _plan(payload.get("plan"), source)
    if plan is None:
        raise FileError(f"{source}: no plan stored with the prepared model")
    try:
        config = PruneConfig.model_validate_json(payload["config"])
    except Exception as exc:
        raise FileError(f"{source}: the stored config is not valid ({str(exc)[:200]})") from None
    inputs = payload.get("example_inputs")
    if not isinstance(inputs, list) or not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise FileError(f"{source}: the example inputs are missing")
    cg = CapturedGraph(gm=gm, example_inputs=tuple(inputs), frontend=str(payload.get("frontend", "fx")))
    try:
        propagate(cg, count=True)
        prepared = gate_and_cost(cg, plan, config, record_notes=False)
    except HiapError:
        raise
    except Exception as exc:
        raise FileError(f"{source}: the stored graph does not run on its example inputs "
                        f"({type(exc).__name__}: {str(exc)[:200]})") from None
    state = dict(payload.get("state") or {})
    for name, info in payload["graph"]["tensors"].items():  # the graph's weights, tied ones included
        source_name = info.get("alias", name)
        if info.get("persistent", True) and source_name in tensors:
            state[f"graph_module.{name}"] = tensors[source_name]
    try:
        prepared.load_state_dict(state)
    except StateError as exc:
        raise FileError(f"{source}: {exc}") from None
    return prepared.train(bool(payload.get("training", False)))
