"""``hiap_fx.prune``: one training phase from a dense model to a verified compact model."""

from __future__ import annotations

import copy
import itertools
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .batches import call_model, first_inputs, split_batch, to_device
from .budget import hard_ratio
from .checkpoint import (CHECKPOINT_FORMAT, load_optimizer_state_by_name, optimizer_state_by_name,
                         rng_state, set_rng_state)
from .classify import cosine_lr, evaluate, logits_of
from .config import PruneConfig
from .errors import DataError, FileError, HiapError, InputError, StateError
from .prepared import PreparedModel
from .prune_report import HistoryPoint, PruneReport, site_structure

@dataclass
class PruneResult:
    """What ``prune`` returns."""

    compact: nn.Module
    prepared: PreparedModel
    report: PruneReport


def distillation_loss(student: torch.Tensor, teacher: Optional[torch.Tensor], target: torch.Tensor,
                      alpha: float, temperature: float) -> torch.Tensor:
    """``(1 - alpha) * CE + alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))``;
    plain cross-entropy without a teacher."""
    ce = F.cross_entropy(student, target)
    if teacher is None or alpha == 0.0:
        return ce
    t = temperature
    kl = F.kl_div(F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1),
                  reduction="batchmean", log_target=True)
    return (1.0 - alpha) * ce + alpha * t * t * kl


def _one_example(inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return tuple(t[:1] for t in inputs)


def dense_teacher(prepared: PreparedModel) -> nn.Module:
    """A frozen copy of the captured graph without gates: the dense model the run started from."""
    from .passes.slice import strip_gates

    gm = copy.deepcopy(prepared.graph_module)
    strip_gates(gm)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm.eval().requires_grad_(False)


def _optimizer(prepared: PreparedModel, cfg: PruneConfig, total: int) -> torch.optim.AdamW:
    gate_ids = {id(g.logits) for g in prepared.gate_modules().values()}
    decay, no_decay, gates = [], [], []
    for p in prepared.parameters():
        if not p.requires_grad:
            continue
        if id(p) in gate_ids:
            gates.append(p)
        elif p.ndim <= 1:
            no_decay.append(p)
        else:
            decay.append(p)
    gate_lr = cfg.gate_lr if cfg.gate_lr is not None else 10.0 * max(cfg.gate_init, 1.0) / max(total, 1)
    groups = [{"params": decay, "lr": cfg.lr, "weight_decay": cfg.weight_decay, "name": "weights"},
              {"params": no_decay, "lr": cfg.lr, "weight_decay": 0.0, "name": "weights_no_decay"},
              {"params": gates, "lr": gate_lr, "weight_decay": 0.0, "name": "gates"}]
    return torch.optim.AdamW([g for g in groups if g["params"]])


def _dist() -> tuple[int, int]:
    """(rank, world size) of the torch.distributed process group, (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _distributed_sampler(data: Iterable) -> Any:
    """The DistributedSampler of a DataLoader (it already gives each rank its own part), or None."""
    from torch.utils.data.distributed import DistributedSampler

    for sampler in (getattr(data, "sampler", None),
                    getattr(getattr(data, "batch_sampler", None), "sampler", None)):
        if isinstance(sampler, DistributedSampler):
            return sampler
    return None


def _data_parallel(prepared: PreparedModel, device: torch.device) -> nn.Module:
    """``prepared`` wrapped in DistributedDataParallel (rank 0's weights and gates are broadcast
    to every rank; gradients, gate logits' included, are averaged). The budget terms are computed
    on ``prepared`` itself, identically on every rank, from identical gate logits."""
    from torch.nn.parallel import DistributedDataParallel

    ids = [device] if device.type == "cuda" else None
    return DistributedDataParallel(prepared, device_ids=ids)


def _mixed_precision(cfg: PruneConfig, device: torch.device) -> tuple[Any, Any]:
    """The autocast context factory and (for float16) a gradient scaler of ``cfg.amp``."""
    import contextlib

    if cfg.amp is None:
        return contextlib.nullcontext, None
    dtype = torch.bfloat16 if cfg.amp == "bf16" else torch.float16
    scaler = torch.amp.GradScaler(device.type) if cfg.amp == "fp16" else None
    return (lambda: torch.autocast(device.type, dtype=dtype)), scaler


def _epoch_iterator(data: Iterable, seed: int, epoch: int, skip: int = 0) -> Iterator:
    """A fresh pass over ``data`` whose order depends only on (seed, epoch): the global torch
    generator (and the loader's own generator, if it has one) are seeded before iterating, and
    ``skip`` batches are passed over (resuming mid-epoch)."""
    epoch_seed = (seed * 1_000_003 + epoch) % (2 ** 63)
    torch.manual_seed(epoch_seed)
    random.seed(epoch_seed)
    np.random.seed(epoch_seed % (2 ** 32))
    gen = getattr(data, "generator", None)
    if isinstance(gen, torch.Generator):
        gen.manual_seed(epoch_seed)
    rank, world = _dist()
    sampler = _distributed_sampler(data)
    if sampler is not None:
        sampler.set_epoch(epoch)
        it: Iterator = iter(data)
    elif world > 1:  # every rank walks the same seeded order and takes every world-th batch
        it = itertools.islice(iter(data), rank, None, world)
    else:
        it = iter(data)
    for done in range(skip):
        try:
            next(it)
        except StopIteration:
            raise DataError(f"resuming at batch {skip} of epoch {epoch}, but train_data now yields "
                            f"only {done} batches per epoch; resume with the data (and batch size) "
                            "of the run that wrote the checkpoint") from None
    return it


def _length(data: Iterable) -> Optional[int]:
    """Batches per epoch on this rank."""
    try:
        n = len(data)  # type: ignore[arg-type]
    except TypeError:
        return None
    rank, world = _dist()
    if world > 1 and _distributed_sampler(data) is None:
        return len(range(rank, n, world))
    return n


def _draw(run: "_Run", it: Iterator) -> Any:
    """``next(it)``; a failure of the data itself (an I/O fault, a decoding error) is re-raised as
    ``DataError`` with the step, the epoch and the last checkpoint to resume from."""
    try:
        return next(it)
    except (StopIteration, HiapError, KeyboardInterrupt):
        raise
    except Exception as exc:
        resume = (f"; the last checkpoint is {run.checkpoint_path} (step {run.checkpoint_step}): "
                  f"resume with hiap_fx.prune({str(run.checkpoint_path)!r}, train_data)"
                  if run.checkpoint_path is not None and run.checkpoint_step is not None
                  else "; no checkpoint was written yet (pass checkpoint= and checkpoint_every=)")
        raise DataError(f"train_data failed at step {run.step} (epoch {run.epoch}, batch "
                        f"{run.offset + 1}): {type(exc).__name__}: {exc}{resume}") from exc


def _next_batch(run: "_Run", data: Iterable, it: Optional[Iterator]) -> Any:
    """The next training batch; a new (seeded) epoch starts when the data is exhausted."""
    if it is not None:
        try:
            batch = _draw(run, it)
            run.offset += 1
            run.iterator = it
            return batch
        except StopIteration:
            if run.offset == 0:
                raise DataError("train_data yielded no batches (an empty dataset or loader)") from None
    if it is not None or run.offset:
        run.epoch, run.offset = run.epoch + 1, 0
    run.iterator = _epoch_iterator(data, run.seed, run.epoch)
    try:
        batch = _draw(run, run.iterator)
    except StopIteration:
        raise DataError("train_data yielded no batches (an empty dataset or loader)") from None
    run.offset = 1
    return batch


class _Run:
    """State of one pruning run (everything a checkpoint holds)."""

    def __init__(self, prepared: PreparedModel, teacher: Optional[nn.Module], total: int,
                 dense_params: int, teacher_is_dense: bool) -> None:
        self.prepared = prepared
        self.teacher = teacher
        self.teacher_is_dense = teacher_is_dense
        self.total = total
        self.dense_params = dense_params
        self.step = 0
        self.epoch = 0  # data position: epoch and batches consumed in it
        self.offset = 0
        self.iterator: Optional[Iterator] = None
        self.history: list[HistoryPoint] = []
        self.seconds = 0.0
        self.dense_accuracy: Optional[float] = None
        self.optimizer = _optimizer(prepared, prepared.config, total)
        cfg = prepared.config
        lambdas = [(lambda s: cosine_lr(s, total)) if g.get("name") != "gates" else (lambda s: 1.0)
                   for g in self.optimizer.param_groups]
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambdas)
        self.rng: Optional[dict[str, Any]] = None
        self.seed = cfg.seed
        self.checkpoint_path: Optional[Path] = None  # where and at which step the last one went
        self.checkpoint_step: Optional[int] = None

    def save(self, path: Union[str, Path]) -> None:
        """Write a checkpoint (atomically, as data): prepared model (weights, gates, controller),
        teacher weights, optimizer, schedule position, RNG states and history."""
        from .files.atomic import write_with
        from .io import prepared_payload

        teacher = None
        if self.teacher_is_dense and self.teacher is not None:
            teacher = {k: v.detach() for k, v in self.teacher.state_dict().items()}
        state = {
            "format": CHECKPOINT_FORMAT, "prepared": prepared_payload(self.prepared),
            "teacher": teacher, "teacher_is_dense": self.teacher_is_dense, "total": self.total,
            "step": self.step, "epoch": self.epoch, "offset": self.offset,
            "optimizer": optimizer_state_by_name(self.optimizer, self.prepared),
            "scheduler": self.scheduler.state_dict(), "rng": rng_state(),
            "history": [h.model_dump() for h in self.history], "seconds": self.seconds,
            "dense_params": self.dense_params, "dense_accuracy": self.dense_accuracy,
        }
        rank, world = _dist()
        if rank == 0:  # every rank holds the same state; one writes it
            write_with(path, lambda tmp: torch.save(state, tmp))
        self.checkpoint_path, self.checkpoint_step = Path(path), self.step
        if world > 1:
            import torch.distributed as dist

            dist.barrier()

    @classmethod
    def load(cls, path: Union[str, Path], teacher: Any, trust: bool = False) -> "_Run":
        """Resume from a checkpoint :meth:`save` wrote (read weights-only: nothing is unpickled).
        ``trust=True`` also reads the pickled checkpoints of earlier versions."""
        from .files.graph_data import graph_from_data
        from .files.reading import load_trusted, read_payload
        from .io import prepared_from_payload

        what = "a hiap_fx.prune checkpoint"
        source = str(path)
        try:
            state = read_payload(path, (CHECKPOINT_FORMAT,), what)
        except FileError:
            if not trust:
                raise
            return cls._load_pickled(path, load_trusted(path, what), teacher)
        try:
            prepared = prepared_from_payload(state["prepared"], source, trust)
            teacher_module: Optional[nn.Module] = None
            if state["teacher_is_dense"]:
                tensors = {**state["prepared"]["tensors"], **state["teacher"]}
                teacher_module = graph_from_data(state["prepared"]["graph"], tensors, source, trust)
                teacher_module.eval().requires_grad_(False)
            elif isinstance(teacher, nn.Module):
                teacher_module = copy.deepcopy(teacher).eval().requires_grad_(False)  # the user's stays as is
            run = cls(prepared, teacher_module, int(state["total"]), int(state["dense_params"]),
                      bool(state["teacher_is_dense"]))
            run.step, run.epoch, run.offset = int(state["step"]), int(state["epoch"]), int(state["offset"])
            load_optimizer_state_by_name(run.optimizer, prepared, state["optimizer"], source)
            run.scheduler.load_state_dict(state["scheduler"])
            run.rng = state["rng"]
            run.history = [HistoryPoint(**h) for h in state["history"]]
            run.seconds = float(state["seconds"])
            run.dense_accuracy = state["dense_accuracy"]
        except HiapError:
            raise
        except Exception as exc:  # a field missing or of the wrong kind
            raise FileError(f"{source}: not a complete {what} ({type(exc).__name__}: {str(exc)[:200]})") from None
        run.checkpoint_path, run.checkpoint_step = Path(path), run.step
        return run

    @classmethod
    def _load_pickled(cls, path: Union[str, Path], state: Any, teacher: Any) -> "_Run":
        """A checkpoint of format ``prune_checkpoint/1`` (a pickled run; read with trust only)."""
        if not isinstance(state, dict) or state.get("format") != "hiap_fx.prune_checkpoint/1":
            raise FileError(f"{path} is not a hiap_fx.prune checkpoint")
        prepared = state["prepared"]
        teacher_module = state["teacher"] if state["teacher_is_dense"] else (
            copy.deepcopy(teacher).eval().requires_grad_(False) if isinstance(teacher, nn.Module) else None)
        run = cls(prepared, teacher_module, state["total"], state["dense_params"], state["teacher_is_dense"])
        run.step, run.epoch, run.offset = state["step"], state["epoch"], state["offset"]
        run.optimizer.load_state_dict(state["optimizer"])
        run.scheduler.load_state_dict(state["scheduler"])
        rng = state["rng"]
        run.rng = {"torch": rng["torch"], "python": rng["python"],
                   "numpy": [rng["numpy"][0], torch.from_numpy(rng["numpy"][1].astype(np.int64)),
                             *rng["numpy"][2:]]}
        run.history = [HistoryPoint(**h) for h in state["history"]]
        run.seconds = state["seconds"]
        run.dense_accuracy = state["dense_accuracy"]
        run.checkpoint_path, run.checkpoint_step = Path(path), run.step
        return run


def _log_point(run: _Run, loss: float, task: float, tau: float) -> HistoryPoint:
    prepared = run.prepared
    with torch.no_grad():
        expected = float(prepared.expected_macs()) / prepared.dense_macs
    structure = site_structure(prepared)
    return HistoryPoint(
        step=run.step, tau=tau, loss=loss, task_loss=task, expected_ratio=expected,
        hard_ratio=hard_ratio(prepared),
        multiplier=float(prepared.budget.multiplier),
        heads_kept=sum(s.heads_kept or 0 for s in structure if s.kind == "attention"),
        neurons_kept=sum(s.neurons_kept or 0 for s in structure if s.kind == "ffn"))


def _total_steps(train_data: Iterable, steps: Optional[int], epochs: Optional[float]) -> int:
    """The run's length from ``steps`` or ``epochs`` (default one epoch), validated."""
    if steps is not None and epochs is not None:
        raise InputError("give steps= or epochs=, not both")
    if epochs is not None and not epochs > 0:
        raise InputError(f"epochs must be > 0, got {epochs}")
    if steps is None:
        length = _length(train_data)
        if length is None:
            raise InputError("train_data has no len(): give steps=")
        if length == 0:
            raise DataError("train_data yielded no batches (len(train_data) is 0)")
        steps = max(1, int(round((epochs or 1) * length)))
    if int(steps) != steps or steps < 1:
        raise InputError(f"steps must be an integer >= 1, got {steps}")
    return int(steps)


def _new_run(model: Union[nn.Module, PreparedModel], train_data: Iterable, cfg: PruneConfig,
             steps: Optional[int], epochs: Optional[float], teacher: Union[str, nn.Module, None],
             example_inputs: Any, eval_data: Optional[Iterable]) -> "_Run":
    """Prepare (unless given a PreparedModel), build the teacher and optimizer, measure the dense
    accuracy: the state of a run at step 0."""
    from .api import prepare

    steps = _total_steps(train_data, steps, epochs)
    torch.manual_seed(cfg.seed)
    if isinstance(model, PreparedModel):
        prepared = model
        dense_params = sum(p.numel() for n, p in prepared.named_parameters() if "hiap_gates" not in n)
    else:
        x = example_inputs if example_inputs is not None else first_inputs(train_data)
        first = next(model.parameters(), None)
        x = to_device(x, first.device) if first is not None else x
        prepared = prepare(model, x, cfg)
        dense_params = sum(p.numel() for p in model.parameters())
    teacher_is_dense = teacher == "dense"
    if teacher_is_dense:
        teacher_module: Optional[nn.Module] = dense_teacher(prepared)
    elif isinstance(teacher, nn.Module):
        teacher_module = copy.deepcopy(teacher).eval().requires_grad_(False)  # never the user's own
    elif teacher is None:
        teacher_module = None
    else:
        raise InputError(f"teacher must be 'dense', a module or None, got {teacher!r}")
    run = _Run(prepared, teacher_module, steps, dense_params, teacher_is_dense)
    torch.manual_seed(cfg.seed)
    run.rng = rng_state()
    if eval_data is not None:
        reference = teacher_module if teacher_is_dense else dense_teacher(prepared)
        run.dense_accuracy = evaluate(reference, eval_data)
    return run


def _finish(run: "_Run", eval_data: Optional[Iterable]) -> PruneResult:
    """Land on the budget, finalize, measure and report."""
    from .api import finalize
    from .counting import count_macs

    prepared, cfg = run.prepared, run.prepared.config
    prepared.eval()
    trained_ratio = hard_ratio(prepared)
    shift = prepared.land_on_budget()
    compact = finalize(prepared)
    one = _one_example(prepared.example_inputs)
    compact_macs = count_macs(compact, one)
    dense_macs = count_macs(run.teacher if run.teacher_is_dense else dense_teacher(prepared), one)
    structure = site_structure(prepared)
    ratio = compact_macs / dense_macs
    report = PruneReport(
        model=prepared.plan.model, target_macs=cfg.target_macs, dense_macs=dense_macs,
        compact_macs=compact_macs, kept_ratio=ratio,
        target_gap_pp=None if cfg.target_macs is None else 100.0 * (ratio - cfg.target_macs),
        dense_params=run.dense_params, compact_params=sum(p.numel() for p in compact.parameters()),
        dense_accuracy=run.dense_accuracy,
        compact_accuracy=evaluate(compact, eval_data) if eval_data is not None else None,
        steps=run.step, seconds=run.seconds, trained_ratio=trained_ratio, budget_shift=shift, sites=structure,
        removed_sublayers=[s.site for s in structure if s.removed], history=run.history)
    return PruneResult(compact=compact, prepared=prepared, report=report)


def prune(model: Union[nn.Module, PreparedModel, str, Path], train_data: Iterable,
          config: Optional[PruneConfig] = None, steps: Optional[int] = None,
          epochs: Optional[float] = None, eval_data: Optional[Iterable] = None,
          teacher: Union[str, nn.Module, None] = "dense", *, example_inputs: Any = None,
          checkpoint: Union[str, Path, None] = None, checkpoint_every: Optional[int] = None,
          stop_after: Optional[int] = None, eval_every: Optional[int] = None,
          eval_batches: Optional[int] = None, log_every: Optional[int] = None,
          progress: bool = True, trust: bool = False) -> PruneResult:
    """Prune ``model`` with HiAP in one training phase and return the verified compact model.

    Args:
        model: the dense ``nn.Module`` (not modified), a ``PreparedModel`` (trained further in
            place), or the path of a checkpoint this function wrote (the run resumes from it and
            follows the same trajectory as an uninterrupted run).
        train_data / eval_data: iterables of ``(inputs, targets)`` batches, e.g. DataLoaders.
            ``train_data`` is re-iterated once per epoch.
        config: a :class:`PruneConfig` (target, lambdas, schedule, learning rates, seed).
        steps / epochs: the length of the run (default: one epoch).
        teacher: ``"dense"`` (a frozen copy of the dense model), a module, or ``None`` (no
            distillation).
        example_inputs: the input to prepare with (default: two items of the first batch).
        checkpoint / checkpoint_every: write a checkpoint there every this many steps and at the end.
        stop_after: stop (after checkpointing) once this many steps are done, without finalizing;
            returns ``None`` then. For splitting a run into jobs.
        eval_every / eval_batches: measure eval-mode accuracy this often on so many batches
            (default: 8 times per run on all of ``eval_data``).
        log_every: record a history point this often (default: 100 points per run).
        progress: show a tqdm bar with loss, expected and kept MACs, live heads and neurons.
        trust: resuming, also read checkpoints that hold pickled objects (written by earlier
            versions). Only for files you wrote yourself: unpickling can run code.
    Returns:
        :class:`PruneResult` with ``compact``, ``prepared`` and ``report``.
    """
    if isinstance(model, (str, Path)):
        if teacher == "dense":
            teacher = None  # the checkpoint decides; a module passed here replaces a non-dense one
        run = _Run.load(model, teacher, trust=trust)
        prepared = run.prepared
        cfg = prepared.config
        if config is not None and config != cfg:
            raise InputError(f"resuming {model}: the checkpoint was written with another config; "
                             "resume without config= (its own is used)")
        if steps is not None or epochs is not None:
            asked = _total_steps(train_data, steps, epochs)
            if asked != run.total:
                raise InputError(f"resuming {model}: the run was started for {run.total} steps, "
                                 f"{asked} were asked now; resume without steps=/epochs= (a run "
                                 "keeps its length: its schedules depend on it), or start a new "
                                 "run")
    else:
        if isinstance(model, PreparedModel) and config is not None and config != model.config:
            raise InputError("the PreparedModel was prepared with another config (its gates, cost and "
                             "controller follow prepared.config); pass config=None or prepare again")
        cfg = config or (model.config if isinstance(model, PreparedModel) else PruneConfig())
        run = _new_run(model, train_data, cfg, steps, epochs, teacher, example_inputs, eval_data)
        prepared = run.prepared

    total = run.total
    log_every = log_every or max(1, total // 100)
    eval_every = eval_every or max(1, math.ceil(total / 8))
    device = next(prepared.parameters()).device
    prepared.train()
    rank, world = _dist()
    forward = _data_parallel(prepared, device) if world > 1 else prepared
    autocast, scaler = _mixed_precision(cfg, device)
    bar = tqdm(total=total, initial=run.step, desc="hiap prune", disable=not progress or rank != 0,
               dynamic_ncols=True)
    started = time.perf_counter() - run.seconds
    it: Optional[Iterator] = None
    if run.offset and run.offset != _length(train_data):
        # resume mid-epoch: rebuild the data position, then the RNG state of the checkpoint
        it = _epoch_iterator(train_data, run.seed, run.epoch, run.offset)
    set_rng_state(run.rng)
    while run.step < total and (stop_after is None or run.step < stop_after):
        x, y = to_device(split_batch(_next_batch(run, train_data, it), "train_data"), device)
        it = run.iterator
        tau = prepared.schedule(run.step, total)
        with autocast():
            student = logits_of(call_model(forward, x))
            with torch.no_grad():
                t_logits = logits_of(call_model(run.teacher, x)) if run.teacher is not None else None
        task = distillation_loss(student.float(), None if t_logits is None else t_logits.float(), y,
                                 cfg.alpha, cfg.temperature)
        loss = task + prepared.hiap_loss()  # the budget terms stay in float32
        if not bool(torch.isfinite(loss.detach())) and scaler is None:
            raise StateError(f"prune(): the loss is {float(loss.detach())} at step {run.step} "
                             f"(task {float(task.detach())}); training diverged. Lower "
                             "PruneConfig.lr, set max_grad_norm, or resume from an earlier checkpoint")
        run.optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(run.optimizer)
        else:
            loss.backward()
        if cfg.max_grad_norm is not None:
            weights = [p for g in run.optimizer.param_groups if g.get("name") != "gates" for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(weights, cfg.max_grad_norm)
        if scaler is not None:
            scaler.step(run.optimizer)
            scaler.update()
        else:
            run.optimizer.step()
        run.scheduler.step()
        run.step += 1
        bar.update()
        if run.step % log_every == 0 or run.step == total:
            point = _log_point(run, float(loss.detach()), float(task.detach()), tau)
            if eval_data is not None and (run.step % eval_every == 0 or run.step == total):
                point.accuracy = evaluate(prepared, eval_data, eval_batches)
            run.history.append(point)
            bar.set_postfix(loss=f"{point.loss:.3f}", E=f"{100 * point.expected_ratio:.1f}%",
                            kept=f"{100 * point.hard_ratio:.1f}%", heads=point.heads_kept,
                            neurons=point.neurons_kept, refresh=False)
        if checkpoint is not None and checkpoint_every and run.step % checkpoint_every == 0:
            run.seconds = time.perf_counter() - started
            run.save(checkpoint)
    bar.close()
    run.seconds = time.perf_counter() - started
    if checkpoint is not None:
        run.save(checkpoint)
    if run.step < total:
        return None  # type: ignore[return-value]

    return _finish(run, eval_data)
