"""Prune checkpoints as data: everything a run needs to resume, readable weights-only.

The prepared model is stored as :func:`hiap_fx.io.prepared_payload`; the dense teacher as the
tensors of the same graph; the optimizer state keyed by parameter name (a rebuilt model may
register its parameters in another order); RNG states as tensors and plain values.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from torch import nn

from hiap_fx.errors import FileError

CHECKPOINT_FORMAT = "hiap_fx.prune_checkpoint/2"


def rng_state() -> dict[str, Any]:
    """The torch, Python and numpy RNG states as tensors and plain values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos),
                      int(has_gauss), float(cached)]}


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
    np.random.set_state((kind, keys.astype(np.uint32), pos, has_gauss, cached))


def optimizer_state_by_name(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, Any]:
    """``optimizer.state_dict()`` with parameter indices replaced by parameter names."""
    names = {id(p): n for n, p in model.named_parameters()}
    flat = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    state = optimizer.state_dict()
    return {"state": {flat[i]: s for i, s in state["state"].items()},
            "param_groups": [{**g, "params": [flat[i] for i in g["params"]]} for g in state["param_groups"]]}


def load_optimizer_state_by_name(optimizer: torch.optim.Optimizer, model: nn.Module,
                                 state: dict[str, Any], source: str) -> None:
    """Load what :func:`optimizer_state_by_name` returned into ``optimizer`` (built over the same
    named parameters, in any order)."""
    names = {id(p): n for n, p in model.named_parameters()}
    index = {names[id(p)]: i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
    try:
        groups = [{**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]]
        per_param = {index[n]: s for n, s in state["state"].items()}
    except KeyError as exc:
        raise FileError(f"{source}: the optimizer state names parameter {exc} that the stored model "
                        "does not have") from None
    optimizer.load_state_dict({"state": per_param, "param_groups": groups})


def checkpoint_summary(path: Any) -> dict[str, Any]:
    """What a checkpoint holds, read weights-only: ``input_shape`` (one example), ``target_macs``,
    ``total`` (steps of the whole run, recovery fine-tune included) and ``step``."""
    from hiap_fx.config import PruneConfig
    from hiap_fx.files.reading import read_payload

    state = read_payload(path, (CHECKPOINT_FORMAT,), "a hiap_fx.prune checkpoint")
    try:
        config = PruneConfig.model_validate_json(state["prepared"]["config"])
        shape = tuple(state["prepared"]["example_inputs"][0].shape)
        return {"input_shape": shape, "target_macs": config.target_macs,
                "total": int(state["total"]) + int(state.get("finetune", 0)), "step": int(state["step"])}
    except Exception as exc:
        raise FileError(f"{path}: not a complete hiap_fx.prune checkpoint ({type(exc).__name__}: "
                        f"{str(exc)[:200]})") from None
