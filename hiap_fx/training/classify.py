"""Plain supervised training and evaluation of classifiers (the dense model of the demo and the
benchmarks' baselines use these; ``prune`` uses ``evaluate``)."""

from __future__ import annotations

import math
from typing import Iterable, Optional, Sized, cast

import torch
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
                     seed: int = 0, progress: bool = True) -> nn.Module:
    """Train ``model`` in place with AdamW, warm-up + cosine schedule and cross-entropy.

    ``data`` is re-iterated once per epoch (a shuffling ``DataLoader`` draws its order from the
    torch generator seeded here, so a run is reproducible)."""
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    total = epochs * len(cast(Sized, data))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, total, warmup))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    model.train()
    bar = tqdm(total=total, desc="train dense", disable=not progress, leave=False)
    for _ in range(epochs):
        for x, y in data:
            loss = loss_fn(logits_of(model(x)), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    return model.eval()
