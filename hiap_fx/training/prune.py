"""``hiap_fx.prune``: one training phase from a dense model to a verified compact model."""

from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from hiap_fx.config import PruneConfig
from hiap_fx.errors import InputError, StateError
from hiap_fx.gated.budget import hard_ratio
from hiap_fx.gated.prepared import PreparedModel
from hiap_fx.training.batches import call_model, first_inputs, split_batch, to_device
from hiap_fx.training.checkpoint import rng_state, set_rng_state
from hiap_fx.training.classify import distillation_loss, evaluate, logits_of
from hiap_fx.training.epochs import batches_per_epoch, epoch_iterator, next_batch, rank_and_world, total_steps
from hiap_fx.training.report import HistoryPoint, PruneReport, site_structure
from hiap_fx.training.run import PruneRun, frozen_copy
from hiap_fx.training.sharding import gather, is_sharded, shard


@dataclass
class PruneResult:
    """What ``prune`` returns."""

    compact: nn.Module
    prepared: PreparedModel
    report: PruneReport


def share_latency_model(prepared: PreparedModel) -> None:
    """Every rank steers by rank 0's latency model (each rank calibrated on its own, and their
    controllers must stay identical)."""
    import torch.distributed as dist

    box = [prepared.latency_model]
    dist.broadcast_object_list(box, src=0)
    prepared.latency_model = box[0].compile() if box[0] is not None else None


def _one_example(inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return tuple(t[:1] for t in inputs)


def dense_teacher(prepared: PreparedModel) -> nn.Module:
    """A frozen copy of the captured graph without gates: the dense model the run started from."""
    from hiap_fx.passes.gate import strip_gates

    gm = copy.deepcopy(prepared.graph_module)
    strip_gates(gm)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm.eval().requires_grad_(False)


def _data_parallel(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` (the prepared model, or the compact one being fine-tuned) wrapped in
    DistributedDataParallel (rank 0's weights and gates are broadcast to every rank; gradients,
    gate logits' included, are averaged). The budget terms are computed on the prepared model
    itself, identically on every rank, from identical gate logits."""
    from torch.nn.parallel import DistributedDataParallel

    ids = [device] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def _mixed_precision(cfg: PruneConfig, device: torch.device) -> tuple[Any, Any]:
    """The autocast context factory and (for float16) a gradient scaler of ``cfg.amp``."""
    import contextlib

    if cfg.amp is None:
        return contextlib.nullcontext, None
    dtype = torch.bfloat16 if cfg.amp == "bf16" else torch.float16
    scaler = torch.amp.GradScaler(device.type) if cfg.amp == "fp16" else None
    return (lambda: torch.autocast(device.type, dtype=dtype)), scaler


def _log_point(run: PruneRun, loss: float, task: float, tau: float) -> HistoryPoint:
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


def split_steps(total: int, finetune_steps: Optional[int], cfg: PruneConfig) -> tuple[int, int]:
    """(search steps, recovery fine-tune steps) of a run of ``total`` steps: ``finetune_steps``
    when given, else ``cfg.finetune_fraction`` of the total; the search keeps at least one step."""
    tune = int(round(cfg.finetune_fraction * total)) if finetune_steps is None else finetune_steps
    if int(tune) != tune or not 0 <= tune < total:
        raise InputError(f"finetune_steps must be an integer in [0, {total - 1}] (the run has {total} "
                         f"steps and the search needs at least one), got {finetune_steps}")
    return total - int(tune), int(tune)


def _new_run(model: Union[nn.Module, PreparedModel], train_data: Iterable, cfg: PruneConfig,
             steps: Optional[int], epochs: Optional[float], finetune_steps: Optional[int],
             teacher: Union[str, nn.Module, None], example_inputs: Any,
             eval_data: Optional[Iterable]) -> "PruneRun":
    """Prepare (unless given a PreparedModel), build the teacher and optimizer, measure the dense
    accuracy: the state of a run at step 0."""
    from hiap_fx.api import prepare

    steps, tune = split_steps(total_steps(train_data, steps, epochs), finetune_steps, cfg)
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
        teacher_module = frozen_copy(teacher)  # never the user's own
    elif teacher is None:
        teacher_module = None
    else:
        raise InputError(f"teacher must be 'dense', a module or None, got {teacher!r}")
    run = PruneRun(prepared, teacher_module, steps, dense_params, teacher_is_dense, finetune=tune)
    torch.manual_seed(cfg.seed)
    run.rng = rng_state()
    if eval_data is not None:
        reference = teacher_module if teacher_is_dense and teacher_module is not None else dense_teacher(prepared)
        run.dense_accuracy = evaluate(reference, eval_data)
    return run


def _recover(run: "PruneRun", compact: nn.Module, train_data: Iterable, eval_data: Optional[Iterable],
             progress: bool) -> Optional[float]:
    """The recovery fine-tune of the run's last ``run.finetune`` steps (data continues where the
    search stopped); returns the compact model's accuracy before it (with ``eval_data``)."""
    from hiap_fx.training.recovery import recovery_finetune

    if not run.finetune:
        return None
    before = evaluate(compact, eval_data) if eval_data is not None else None
    device = next(compact.parameters()).device
    rank, world = rank_and_world()

    def batches() -> Iterator[Any]:
        it = run.iterator
        if it is None and run.offset and run.offset != batches_per_epoch(train_data):
            it = epoch_iterator(train_data, run.seed, run.epoch, run.offset)  # resumed at the end
        while True:
            yield next_batch(run, train_data, it)
            it = run.iterator

    cfg = run.prepared.config
    # bf16 autocast as in the search; fp16 would need its gradient scaler: that fine-tune runs in fp32
    autocast = _mixed_precision(cfg, device)[0] if cfg.amp == "bf16" else contextlib.nullcontext
    recovery_finetune(compact, batches(), run.finetune, cfg, run.teacher,
                      forward=_data_parallel(compact, device) if world > 1 else None,
                      autocast=autocast, progress=progress and rank == 0)
    return before


def _finish(run: "PruneRun", train_data: Iterable, eval_data: Optional[Iterable],
            progress: bool) -> PruneResult:
    """Land on the budget, finalize, recover (when asked), measure and report."""
    from hiap_fx.api import finalize
    from hiap_fx.graph.counting import count_macs

    if is_sharded(run.prepared):  # every rank gathers the full weights to finalize
        run.prepared = gather(run.prepared)
    prepared, cfg = run.prepared, run.prepared.config
    prepared.eval()
    trained_ratio = hard_ratio(prepared)
    shift = prepared.land_on_budget()
    compact = finalize(prepared)
    started = time.perf_counter()
    before_finetune = _recover(run, compact, train_data, eval_data, progress)
    run.seconds += time.perf_counter() - started
    one = _one_example(prepared.example_inputs)
    compact_macs = count_macs(compact, one)
    dense_macs = count_macs(run.teacher if run.teacher_is_dense and run.teacher is not None
                            else dense_teacher(prepared), one)
    structure = site_structure(prepared)
    ratio = compact_macs / dense_macs
    latency_ratio = prepared.budget_ratio() if cfg.cost == "latency" else None
    reached = ratio if latency_ratio is None else latency_ratio
    target = cfg.budget_fraction
    report = PruneReport(
        model=prepared.plan.model, target_macs=cfg.target_macs if latency_ratio is None else None,
        target_latency=None if latency_ratio is None else target,
        latency_ratio=latency_ratio, dense_macs=dense_macs,
        compact_macs=compact_macs, kept_ratio=ratio,
        target_gap_pp=None if target is None else 100.0 * (reached - target),
        dense_params=run.dense_params, compact_params=sum(p.numel() for p in compact.parameters()),
        dense_accuracy=run.dense_accuracy,
        compact_accuracy=evaluate(compact, eval_data) if eval_data is not None else None,
        accuracy_before_finetune=before_finetune, finetune_steps=run.finetune,
        steps=run.step + run.finetune, seconds=run.seconds, trained_ratio=trained_ratio, budget_shift=shift, sites=structure,
        removed_sublayers=[s.site for s in structure if s.removed], history=run.history)
    return PruneResult(compact=compact, prepared=prepared, report=report)


def prune(model: Union[nn.Module, PreparedModel, str, Path], train_data: Iterable,
          config: Optional[PruneConfig] = None, steps: Optional[int] = None,
          epochs: Optional[float] = None, eval_data: Optional[Iterable] = None,
          teacher: Union[str, nn.Module, None] = "dense", *, finetune_steps: Optional[int] = None,
          example_inputs: Any = None,
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
        steps / epochs: the length of the run (default: one epoch), recovery fine-tune included.
        finetune_steps: the last this many steps fine-tune the finalized compact model (same
            loss, no gates; :mod:`hiap_fx.training.recovery`); the gated search gets the rest.
            Default: ``config.finetune_fraction`` of the run. Checkpoints cover the search; a
            run resumed after it finalizes again and repeats the fine-tune.
        teacher: ``"dense"`` (a frozen copy of the dense model), a module, or ``None`` (no
            distillation).
        example_inputs: the input to prepare with (default: two items of the first batch).
        checkpoint / checkpoint_every: write a checkpoint there every this many steps and at the end.
        stop_after: stop (after checkpointing) once this many steps are done, without finalizing;
            returns ``None`` then. For splitting a run into jobs. A stop inside the recovery
            fine-tune stops at the end of the search (the fine-tune is not checkpointed).
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
        run = PruneRun.load(model, teacher, trust=trust)
        prepared = run.prepared
        cfg = prepared.config
        if config is not None and config != cfg:
            raise InputError(f"resuming {model}: the checkpoint was written with another config; "
                             "resume without config= (its own is used)")
        if steps is not None or epochs is not None or finetune_steps is not None:
            asked = total_steps(train_data, steps, epochs) if steps is not None or epochs is not None \
                else run.total + run.finetune
            if split_steps(asked, finetune_steps, cfg) != (run.total, run.finetune):
                raise InputError(f"resuming {model}: the run was started for {run.total + run.finetune} "
                                 f"steps, {asked} were asked now (of them fine-tuning: {run.finetune} "
                                 f"then, finetune_steps={finetune_steps} now); resume without "
                                 "steps=/epochs=/finetune_steps= (a run keeps its length: its "
                                 "schedules depend on it), or start a new "
                                 "run")
    else:
        if isinstance(model, PreparedModel) and config is not None and config != model.config:
            raise InputError("the PreparedModel was prepared with another config (its gates, cost and "
                             "controller follow prepared.config); pass config=None or prepare again")
        cfg = config or (model.config if isinstance(model, PreparedModel) else PruneConfig())
        run = _new_run(model, train_data, cfg, steps, epochs, finetune_steps, teacher, example_inputs,
                       eval_data)
        prepared = run.prepared

    total = run.total
    log_every = log_every or max(1, total // 100)
    eval_every = eval_every or max(1, math.ceil(total / 8))
    device = next(prepared.parameters()).device
    prepared.train()
    rank, world = rank_and_world()
    if world > 1 and prepared.latency_model is not None:
        share_latency_model(prepared)
    forward: nn.Module = prepared
    sharded = world > 1 and cfg.distributed == "fsdp"
    if run.shards is not None and not sharded:
        raise InputError(f"{model}: a sharded run (PruneConfig(distributed='fsdp')) wrote this "
                         "checkpoint; resume it under torchrun (any number of ranks: "
                         "torch.distributed.checkpoint reshards)")
    if sharded:
        if run.step and run.shards is None:
            raise InputError(f"{model}: an unsharded run wrote this checkpoint (one process, or "
                             "DDP); resume it the way it ran (or distributed='ddp'), not into FSDP")
        shard(prepared)  # weights sharded, gates replicated; the optimizer sees the shards
        run.rebuild_optimizer()
        run.load_shards()  # a resumed run: its shards, resharded onto these ranks
    elif world > 1:
        forward = _data_parallel(prepared, device)
    autocast, scaler = _mixed_precision(cfg, device)
    bar = tqdm(total=total, initial=run.step, desc="hiap prune", disable=not progress or rank != 0,
               dynamic_ncols=True)
    started = time.perf_counter() - run.seconds
    it: Optional[Iterator] = None
    if run.offset and run.offset != batches_per_epoch(train_data):
        # resume mid-epoch: rebuild the data position, then the RNG state of the checkpoint
        it = epoch_iterator(train_data, run.seed, run.epoch, run.offset)
    if run.rng is not None:
        set_rng_state(run.rng)
    while run.step < total and (stop_after is None or run.step < stop_after):
        x, y = to_device(split_batch(next_batch(run, train_data, it), "train_data"), device)
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
    if run.step < total or (stop_after is not None and stop_after < total + run.finetune):
        return None  # type: ignore[return-value]  # stop_after: documented, no result yet

    return _finish(run, train_data, eval_data, progress)
