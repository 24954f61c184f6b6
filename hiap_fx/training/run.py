"""The state of one pruning run (model, teacher, optimizer, schedule, position, history) and its checkpoints."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Union

import numpy as np
import torch
from torch import nn

from hiap_fx.config import PruneConfig
from hiap_fx.errors import FileError, HiapError
from hiap_fx.gated.prepared import PreparedModel
from hiap_fx.training.checkpoint import (
    CHECKPOINT_FORMAT,
    load_optimizer_state_by_name,
    optimizer_state_by_name,
    rng_state,
)
from hiap_fx.training.classify import cosine_lr
from hiap_fx.training.epochs import rank_and_world
from hiap_fx.training.report import HistoryPoint
from hiap_fx.training.sharding import (
    drop_older_shards,
    is_sharded,
    load_shards,
    save_shards,
    with_placeholders,
    without_shards,
)


def weight_groups(params: Iterable[nn.Parameter], lr: float, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups of trainable weights: matrices with ``weight_decay`` ("weights"),
    biases and norms without ("weights_no_decay"); empty groups left out."""
    trainable = [p for p in params if p.requires_grad]
    groups = [{"params": [p for p in trainable if p.ndim > 1], "lr": lr, "weight_decay": weight_decay,
               "name": "weights"},
              {"params": [p for p in trainable if p.ndim <= 1], "lr": lr, "weight_decay": 0.0,
               "name": "weights_no_decay"}]
    return [g for g in groups if g["params"]]


def build_optimizer(prepared: PreparedModel, cfg: PruneConfig, total: int) -> torch.optim.AdamW:
    """AdamW of a pruning run: the weights' groups (:func:`weight_groups`) and the gate logits
    (their own learning rate, no weight decay)."""
    gate_ids = {id(g.logits) for g in prepared.gate_modules().values()}
    gates = [p for p in prepared.parameters() if p.requires_grad and id(p) in gate_ids]
    groups = weight_groups((p for p in prepared.parameters() if id(p) not in gate_ids), cfg.lr, cfg.weight_decay)
    gate_lr = cfg.gate_lr if cfg.gate_lr is not None else 10.0 * max(cfg.gate_init, 1.0) / max(total, 1)
    if gates:
        groups.append({"params": gates, "lr": gate_lr, "weight_decay": 0.0, "name": "gates"})
    return torch.optim.AdamW(groups)


def build_scheduler(optimizer: torch.optim.Optimizer, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Cosine decay over ``total`` steps for the weights' groups; the gates' rate stays constant."""
    lambdas = [(lambda s: cosine_lr(s, total)) if g.get("name") != "gates" else (lambda s: 1.0)
               for g in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)


class PruneRun:
    """State of one pruning run (everything a checkpoint holds)."""

    def __init__(self, prepared: PreparedModel, teacher: Optional[nn.Module], total: int,
                 dense_params: int, teacher_is_dense: bool, finetune: int = 0) -> None:
        self.prepared = prepared
        self.teacher = teacher
        self.teacher_is_dense = teacher_is_dense
        self.total = total  # steps of the gated search (its schedules span these)
        self.finetune = finetune  # recovery fine-tune steps after it
        self.dense_params = dense_params
        self.step = 0
        self.epoch = 0  # data position: epoch and batches consumed in it
        self.offset = 0
        self.iterator: Optional[Iterator] = None
        self.history: list[HistoryPoint] = []
        self.seconds = 0.0
        self.dense_accuracy: Optional[float] = None
        self.optimizer = build_optimizer(prepared, prepared.config, total)
        cfg = prepared.config
        self.scheduler = build_scheduler(self.optimizer, total)
        self.rng: Optional[dict[str, Any]] = None
        self.seed = cfg.seed
        self.checkpoint_path: Optional[Path] = None  # where and at which step the last one went
        self.checkpoint_step: Optional[int] = None
        self.shards: Optional[Path] = None  # a sharded checkpoint's folder, until read

    def rebuild_optimizer(self) -> None:
        """A new optimizer over the prepared model's current parameters (after sharding replaced
        them), the schedule kept where it was."""
        scheduler = self.scheduler.state_dict()
        self.optimizer = build_optimizer(self.prepared, self.prepared.config, self.total)
        self.scheduler = build_scheduler(self.optimizer, self.total)
        self.scheduler.load_state_dict(scheduler)

    def save(self, path: Union[str, Path]) -> None:
        """Write a checkpoint (atomically, as data): prepared model (weights, gates, controller),
        teacher weights, optimizer, schedule position, RNG states and history. A sharded run
        (FSDP2) writes its weights and optimizer state with ``torch.distributed.checkpoint``
        (each rank its shards) into ``<path>.shards/step-<n>``; ``path`` then holds the rest and
        names that folder, and is replaced only once the folder is complete."""
        from hiap_fx.files.atomic import write_with
        from hiap_fx.io import prepared_payload

        teacher = None
        if self.teacher_is_dense and self.teacher is not None:
            teacher = {k: v.detach() for k, v in self.teacher.state_dict().items()}
        path = Path(path)
        payload = prepared_payload(self.prepared)
        shards = None
        if is_sharded(self.prepared):
            shards = save_shards(self.prepared, self.optimizer, path, self.step)
            payload = without_shards(payload)
        state = {
            "format": CHECKPOINT_FORMAT, "prepared": payload,
            "teacher": teacher, "teacher_is_dense": self.teacher_is_dense, "total": self.total,
            "finetune": self.finetune,
            "step": self.step, "epoch": self.epoch, "offset": self.offset,
            "optimizer": None if shards else optimizer_state_by_name(self.optimizer, self.prepared),
            "shards": shards,
            "scheduler": self.scheduler.state_dict(), "rng": rng_state(),
            "history": [h.model_dump() for h in self.history], "seconds": self.seconds,
            "dense_params": self.dense_params, "dense_accuracy": self.dense_accuracy,
        }
        rank, world = rank_and_world()
        if rank == 0:  # every rank holds the same state; one writes it
            write_with(path, lambda tmp: torch.save(state, tmp))
            if shards:
                drop_older_shards(path, shards)
        self.checkpoint_path, self.checkpoint_step = path, self.step
        if world > 1:
            import torch.distributed as dist

            dist.barrier()

    def load_shards(self) -> None:
        """Read the sharded weights and optimizer state of the checkpoint this run was loaded
        from into the (now sharded) prepared model and the optimizer built over its shards."""
        if self.shards is None:
            return
        scheduler = self.scheduler.state_dict()
        load_shards(self.prepared, self.optimizer, self.shards)
        self.scheduler.load_state_dict(scheduler)
        self.shards = None

    @classmethod
    def load(cls, path: Union[str, Path], teacher: Any, trust: bool = False) -> "PruneRun":
        """Resume from a checkpoint :meth:`save` wrote (read weights-only: nothing is unpickled).
        ``trust=True`` also reads the pickled checkpoints of earlier versions."""
        from hiap_fx.files.graph_data import graph_from_data
        from hiap_fx.files.reading import load_trusted, read_payload
        from hiap_fx.io import prepared_from_payload

        what = "a hiap_fx.prune checkpoint"
        source = str(path)
        try:
            state = read_payload(path, (CHECKPOINT_FORMAT,), what)
        except FileError:
            if not trust:
                raise
            return cls._load_pickled(path, load_trusted(path, what), teacher)
        try:
            shards = state.get("shards")
            prepared = prepared_from_payload(with_placeholders(state["prepared"]) if shards else state["prepared"],
                                             source, trust)
            teacher_module: Optional[nn.Module] = None
            if state["teacher_is_dense"]:
                tensors = {**state["prepared"]["tensors"], **state["teacher"]}
                teacher_module = graph_from_data(state["prepared"]["graph"], tensors, source, trust)
                teacher_module.eval().requires_grad_(False)
            else:
                teacher_module = frozen_copy(teacher)
            run = cls._restore(path, state, prepared, teacher_module, state["rng"],
                               lambda run: None if shards else load_optimizer_state_by_name(
                                   run.optimizer, prepared, state["optimizer"], source))
            run.shards = Path(path).parent / shards if shards else None
            return run
        except HiapError:
            raise
        except Exception as exc:  # a field missing or of the wrong kind
            raise FileError(f"{source}: not a complete {what} ({type(exc).__name__}: {str(exc)[:200]})") from None

    @classmethod
    def _load_pickled(cls, path: Union[str, Path], state: Any, teacher: Any) -> "PruneRun":
        """A checkpoint of format ``prune_checkpoint/1`` (a pickled run; read with trust only)."""
        if not isinstance(state, dict) or state.get("format") != "hiap_fx.prune_checkpoint/1":
            raise FileError(f"{path} is not a hiap_fx.prune checkpoint")
        rng = state["rng"]
        numpy_state = [rng["numpy"][0], torch.from_numpy(rng["numpy"][1].astype(np.int64)), *rng["numpy"][2:]]
        teacher_module = state["teacher"] if state["teacher_is_dense"] else frozen_copy(teacher)
        return cls._restore(path, state, state["prepared"], teacher_module,
                            {"torch": rng["torch"], "python": rng["python"], "numpy": numpy_state},
                            lambda run: run.optimizer.load_state_dict(state["optimizer"]))

    @classmethod
    def _restore(cls, path: Union[str, Path], state: dict[str, Any], prepared: PreparedModel,
                 teacher: Optional[nn.Module], rng: dict[str, Any],
                 load_optimizer: Callable[["PruneRun"], None]) -> "PruneRun":
        """The run a checkpoint describes (either format): position, optimizer, schedule, RNG,
        history."""
        run = cls(prepared, teacher, int(state["total"]), int(state["dense_params"]),
                  bool(state["teacher_is_dense"]), int(state.get("finetune", 0)))
        run.step, run.epoch, run.offset = int(state["step"]), int(state["epoch"]), int(state["offset"])
        load_optimizer(run)
        run.scheduler.load_state_dict(state["scheduler"])
        run.rng = rng
        run.history = [HistoryPoint(**h) for h in state["history"]]
        run.seconds = float(state["seconds"])
        run.dense_accuracy = state["dense_accuracy"]
        run.checkpoint_path, run.checkpoint_step = Path(path), run.step
        return run


def frozen_copy(teacher: Any) -> Optional[nn.Module]:
    """A frozen eval-mode copy of a user's teacher module (the user's own is never touched), or
    None when ``teacher`` is not a module."""
    return copy.deepcopy(teacher).eval().requires_grad_(False) if isinstance(teacher, nn.Module) else None
