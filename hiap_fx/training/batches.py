"""The batch forms training and evaluation accept, and the errors for every other form.

A batch is an ``(inputs, targets)`` pair; ``inputs`` is a tensor, a tuple/list of positional
tensors, or a dict of keyword tensors (forward parameter names).
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from hiap_fx.errors import DataError


def split_batch(batch: Any, where: str) -> tuple[Any, Any]:
    """``(inputs, targets)`` of a batch, or ``DataError`` saying what the batch is instead."""
    if isinstance(batch, dict):
        raise DataError(f"{where}: a batch is a dict with keys {sorted(map(str, batch))[:6]}; hiap_fx "
                        "expects (inputs, targets) pairs. Wrap the loader, e.g. "
                        "((b['pixel_values'], b['labels']) for b in loader), or pass inputs as a "
                        "dict: ({'pixel_values': x}, y)")
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    size = f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""
    raise DataError(f"{where}: a batch is a {type(batch).__name__}{size}; hiap_fx expects "
                    "(inputs, targets) pairs")


def call_model(model: nn.Module, inputs: Any) -> Any:
    """``model`` applied to batch inputs: keywords for a dict, positions for a tuple/list."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def to_device(batch: Any, device: torch.device) -> Any:
    """Move the tensors of a batch (nested tuples/lists/dicts) to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True) if batch.device != device else batch
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def first_inputs(data: Iterable, n: int = 2) -> Any:
    """The first ``n`` examples of the first batch's inputs (example inputs for ``prepare``)."""
    try:
        batch = next(iter(data))
    except StopIteration:
        raise DataError("train_data yielded no batches (an empty dataset or loader)") from None
    x, _ = split_batch(batch, "train_data")
    if isinstance(x, torch.Tensor):
        return x[:n]
    if isinstance(x, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in x):
        return tuple(t[:n] for t in x)
    if isinstance(x, dict):
        raise DataError(f"train_data's inputs are a dict (keywords {sorted(x)[:6]}); prepare needs "
                        "positional example inputs: pass example_inputs= (a tensor or a tuple of "
                        "tensors in the order of forward's parameters)")
    raise DataError(f"train_data's inputs are a {type(x).__name__}; expected a tensor, a tuple of "
                    "tensors or a dict of tensors (pass example_inputs= for prepare)")
