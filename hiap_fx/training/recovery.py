"""Recovery fine-tuning of a finalized compact model: the same loss as the search (task loss plus
distillation from the teacher), AdamW with cosine decay, no gates. ``prune`` runs it for the last
``finetune_steps`` of its step budget; the benchmarks' baselines use it as their fine-tune."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, ContextManager, Iterable, Iterator, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from hiap_fx.config import PruneConfig
from hiap_fx.training.batches import call_model, split_batch, to_device
from hiap_fx.training.classify import distillation_loss, logits_of
from hiap_fx.training.run import build_scheduler, weight_groups


def endless(data: Iterable) -> Iterator[Any]:
    """The batches of ``data``, re-iterated epoch after epoch."""
    while True:
        empty = True
        for batch in data:
            empty = False
            yield batch
        if empty:
            from hiap_fx.errors import DataError

            raise DataError("train_data yielded no batches (an empty dataset or loader)")


def recovery_finetune(model: nn.Module, batches: Iterator[Any], steps: int, config: PruneConfig,
                      teacher: Optional[nn.Module] = None, *, forward: Optional[nn.Module] = None,
                      autocast: Callable[[], ContextManager[Any]] = contextlib.nullcontext,
                      progress: bool = False) -> nn.Module:
    """Train ``model`` in place for ``steps`` batches drawn from ``batches``.

    Loss: ``(1 - alpha) * CE + alpha * T^2 * KL`` from ``teacher`` (plain CE without one), with
    ``config``'s ``alpha``, ``temperature``, ``lr`` (cosine decay to 0 over ``steps``),
    ``weight_decay`` and ``max_grad_norm``. ``forward`` is what is called (e.g. the model
    wrapped in DistributedDataParallel; default ``model``). Returns ``model`` in eval mode."""
    call = forward if forward is not None else model
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(weight_groups(model.parameters(), config.lr, config.weight_decay))
    schedule = build_scheduler(optimizer, steps)
    if teacher is not None:
        teacher.eval()
    model.train()
    for _ in tqdm(range(steps), desc="hiap recover", disable=not progress, leave=False):
        x, y = to_device(split_batch(next(batches), "train_data"), device)
        with autocast():
            student = logits_of(call_model(call, x))
            with torch.no_grad():
                reference = logits_of(call_model(teacher, x)) if teacher is not None else None
        loss = distillation_loss(student.float(), None if reference is None else reference.float(), y,
                                 config.alpha, config.temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        optimizer.step()
        schedule.step()
    return model.eval()
