"""Plain supervised training and evaluation of classifiers (the dense model of the demo and the
benchmarks' baselines use these; ``prune`` uses ``evaluate``)."""

from __future__ import annotations

import math
from typing import Callable, Iterable, Optional, Sized, cast

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


def logits_of(output: object) -> torch.Tensor:
    """The logits tensor of a model output: a tensor, a tuple's first item, or ``.logits``."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    if isinstance(output, dict) and "logits" in output:
        return output["logits"]
    raise TypeError(f"cannot find logits in a model output of type {type(output).__name__}")


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


@torch.no_grad()
def evaluate(model: nn.Module, data: Iterable, max_batches: Optional[int] = None) -> float:
    """Top-1 accuracy (0..1) of ``model`` in eval mode over ``(inputs, targets)`` batches (inputs
    as in training: a tensor, a tuple or a dict); the model's train/eval mode is restored
    afterwards. Raises ``DataError`` when ``data`` yields no batches."""
    from hiap_fx.training.batches import call_model, split_batch, to_device

    was_training = model.training
    model.eval()
    correct = total = 0
    device = next(model.parameters()).device
    try:
        for i, batch in enumerate(data):
            if max_batches is not None and i >= max_batches:
                break
            x, y = to_device(split_batch(batch, "eval_data"), device)
            pred = logits_of(call_model(model, x)).argmax(-1)
            correct += int((pred == y).sum())
            total += int(y.numel())
    finally:
        model.train(was_training)
    if total == 0:
        from hiap_fx.errors import DataError

        raise DataError("eval_data yielded no batches (an empty dataset or loader)")
    return correct / total


def cosine_lr(step: int, total: int, warmup: int = 0, floor: float = 0.0) -> float:
    """Learning-rate factor: linear warm-up over ``warmup`` steps, then cosine decay to ``floor``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def train_classifier(model: nn.Module, data: Iterable, epochs: int = 3, lr: float = 1e-3,
                     weight_decay: float = 0.05, warmup: int = 100, label_smoothing: float = 0.1,
                     seed: int = 0, progress: bool = True,
                     augment: Optional[Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = None,
                     on_epoch: Optional[Callable[[int, nn.Module], None]] = None) -> nn.Module:
    """Train ``model`` in place with AdamW, warm-up + cosine schedule and cross-entropy.

    ``data`` is re-iterated once per epoch (a shuffling ``DataLoader`` draws its order from the
    torch generator seeded here, so a run is reproducible). ``augment(inputs, generator)``
    transforms each training batch (its own seeded generator); ``on_epoch(epoch, model)`` is
    called after every epoch (e.g. to record held-out accuracy)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    total = epochs * len(cast(Sized, data))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, total, warmup))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    model.train()
    bar = tqdm(total=total, desc="train dense", disable=not progress, leave=False)
    for epoch in range(epochs):
        for x, y in data:
            if augment is not None:
                x = augment(x, generator)
            loss = loss_fn(logits_of(model(x)), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if on_epoch is not None:
            on_epoch(epoch, model)
            model.train()
    bar.close()
    return model.eval()
