"""Sharded training with FSDP2 (``torch.distributed.fsdp.fully_shard``): the prepared model's
weights are sharded over the ranks, its gates replicated.

The gates are tiny and the budget terms read them outside the forward, so they are left out of
the sharding (``ignored_params``) and their gradients are averaged over the ranks as they are
accumulated: every rank then holds the same gate logits, and the controller, which reads only
them, stays identical. The weights' gradients are reduce-scattered by FSDP2 itself.

Use it in an own loop (after ``torch.distributed.init_process_group``)::

    prepared = hiap_fx.prepare(model, x)
    shard(prepared)                          # before building the optimizer
    ...                                      # train as usual; checkpoints with
    ...                                      # torch.distributed.checkpoint (see sharded_state)
    plain = gather(prepared)                 # every rank: an unsharded PreparedModel
    compact = hiap_fx.finalize(plain)

``prune(..., PruneConfig(distributed="fsdp"))`` does the same.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from hiap_fx.errors import FileError, InputError
from hiap_fx.gated.bundles import GATES_ATTR
from hiap_fx.gated.prepared import PreparedModel


def gate_parameters(prepared: PreparedModel) -> list[nn.Parameter]:
    """The gate logits, in a fixed order (every rank reduces them in the same order)."""
    return [p for name, p in prepared.named_parameters() if GATES_ATTR in name]


def is_sharded(prepared: PreparedModel) -> bool:
    """Whether :func:`shard` was applied to ``prepared``."""
    return bool(getattr(prepared, "_hiap_sharded", False))


def shard(prepared: PreparedModel, mesh: Optional[Any] = None) -> PreparedModel:
    """Shard ``prepared``'s weights over the ranks of the default process group with FSDP2
    (``fully_shard`` on its graph module; ``mesh``: a 1-D device mesh, default all ranks on the
    weights' device type), its gates replicated and averaged as their gradients accumulate.
    Build the optimizer afterwards (the weights become DTensor parameters). Returns ``prepared``."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not dist.is_available() or not dist.is_initialized():
        raise InputError("shard() needs torch.distributed initialised (init_process_group, e.g. "
                         "under torchrun)")
    if is_sharded(prepared):
        return prepared
    device = next(prepared.parameters()).device
    mesh = mesh or init_device_mesh(device.type, (dist.get_world_size(),))
    gates = gate_parameters(prepared)
    for p in gates:  # identical gates everywhere to start with
        dist.broadcast(p.data, src=0)
    fully_shard(prepared.graph_module, mesh=mesh, ignored_params=set(gates))
    world = dist.get_world_size()

    def average(p: torch.Tensor) -> None:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(world)

    for p in gates:
        p.register_post_accumulate_grad_hook(average)
    prepared._hiap_sharded = True  # type: ignore[assignment]
    return prepared


def sharded_state(prepared: PreparedModel, optimizer: Optional[torch.optim.Optimizer] = None) -> dict[str, Any]:
    """The state of a sharded prepared model (and optimizer) for
    ``torch.distributed.checkpoint.save`` / ``load``: each rank writes and reads its shards.
    After ``load``, pass the loaded dict to :func:`load_sharded_state`."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model, optim = get_state_dict(prepared, optimizer if optimizer is not None else [])
    return {"model": model, "optimizer": optim} if optimizer is not None else {"model": model}


def load_sharded_state(prepared: PreparedModel, state: dict[str, Any],
                       optimizer: Optional[torch.optim.Optimizer] = None) -> None:
    """Load what :func:`sharded_state` described (after ``torch.distributed.checkpoint.load``)."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    set_state_dict(prepared, optimizer if optimizer is not None else [],
                   model_state_dict=state["model"], optim_state_dict=state.get("optimizer", {}))


#: the folder next to a prune checkpoint that holds its shards (one ``step-...`` folder)
SHARDS_SUFFIX = ".shards"


def save_shards(prepared: PreparedModel, optimizer: torch.optim.Optimizer, path: Path, step: int) -> str:
    """Every rank: write the sharded model and optimizer state with
    ``torch.distributed.checkpoint`` into a new folder ``<path>.shards/step-<step>-<tag>``;
    returns its path relative to ``path``'s folder (what the checkpoint file names)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    tag = [uuid.uuid4().hex[:8]]
    dist.broadcast_object_list(tag, src=0)  # one folder name on every rank
    relative = f"{path.name}{SHARDS_SUFFIX}/step-{step:08d}-{tag[0]}"
    dcp.save(sharded_state(prepared, optimizer), checkpoint_id=str(path.parent / relative))
    return relative


def drop_older_shards(path: Path, keep: str) -> None:
    """Remove the shard folders of ``path`` other than ``keep`` (after the checkpoint file that
    names ``keep`` was written)."""
    folder = path.parent / f"{path.name}{SHARDS_SUFFIX}"
    for old in folder.iterdir() if folder.is_dir() else []:
        if old.is_dir() and old.name.startswith("step-") and old != path.parent / keep:
            shutil.rmtree(old, ignore_errors=True)


def load_shards(prepared: PreparedModel, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Every rank: read a :func:`save_shards` folder into the sharded ``prepared`` and the
    optimizer built over its shards (any number of ranks: the checkpoint is resharded)."""
    import torch.distributed.checkpoint as dcp

    if not (folder / ".metadata").is_file():
        raise FileError(f"{folder}: the shards of this checkpoint are missing or incomplete")
    state = sharded_state(prepared, optimizer)
    dcp.load(state, checkpoint_id=str(folder))
    load_sharded_state(prepared, state, optimizer)


def without_shards(payload: dict[str, Any]) -> dict[str, Any]:
    """A prepared model's payload (``hiap_fx.io.prepared_payload``) with its sharded tensors
    (DTensors) left out: their shapes and dtypes are kept under ``"sharded"``."""
    from torch.distributed.tensor import DTensor

    sharded = {k: v for k, v in payload["tensors"].items() if isinstance(v, DTensor)}
    return {**payload, "tensors": {k: v for k, v in payload["tensors"].items() if k not in sharded},
            "sharded": {k: [list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in sharded.items()}}


def with_placeholders(payload: dict[str, Any]) -> dict[str, Any]:
    """A :func:`without_shards` payload with zeros in place of the sharded tensors (the model is
    rebuilt from it, sharded, and its shards then read from the checkpoint)."""
    tensors = dict(payload["tensors"])
    for key, (shape, dtype) in payload.get("sharded", {}).items():
        kind = getattr(torch, str(dtype), None)
        if not isinstance(kind, torch.dtype):
            raise FileError(f"sharded tensor {key}: unknown dtype {dtype!r}")
        tensors[key] = torch.zeros([int(n) for n in shape], dtype=kind)
    return {**payload, "tensors": tensors}


def gather(prepared: PreparedModel) -> PreparedModel:
    """An unsharded copy of a sharded prepared model on every rank (full weights gathered, the
    same gates and controller state): what ``finalize`` takes. ``prepared`` is left as it is."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from hiap_fx.io import prepared_from_payload, prepared_payload

    if not is_sharded(prepared):
        return prepared
    full = get_model_state_dict(prepared, options=StateDictOptions(full_state_dict=True))
    payload = prepared_payload(prepared)
    tensors: dict[str, Any] = dict(full)
    payload["tensors"] = {k: tensors[f"graph_module.{k}"].detach() for k in payload["tensors"]}
    payload["state"] = {k: v.detach() if isinstance(v, torch.Tensor) else v
                        for k, v in tensors.items() if k in payload["state"]}
    return prepared_from_payload(payload, "the sharded prepared model", trust=True)
