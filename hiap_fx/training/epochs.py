"""Walking the training data: seeded epochs, resuming mid-epoch, sharding across ranks, typed data failures."""

from __future__ import annotations

import itertools
import random
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Protocol

import numpy as np
import torch

from hiap_fx.errors import DataError, HiapError, InputError


class DataPosition(Protocol):
    """Where a run stands in its data (``PruneRun`` is one): what these helpers read and move."""

    step: int
    epoch: int
    offset: int
    seed: int
    iterator: Optional[Iterator]
    checkpoint_path: Optional[Path]
    checkpoint_step: Optional[int]


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the torch.distributed process group, (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def distributed_sampler(data: Iterable) -> Any:
    """The DistributedSampler of a DataLoader (it already gives each rank its own part), or None."""
    from torch.utils.data.distributed import DistributedSampler

    for sampler in (getattr(data, "sampler", None),
                    getattr(getattr(data, "batch_sampler", None), "sampler", None)):
        if isinstance(sampler, DistributedSampler):
            return sampler
    return None


def epoch_iterator(data: Iterable, seed: int, epoch: int, skip: int = 0) -> Iterator:
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
    rank, world = rank_and_world()
    sampler = distributed_sampler(data)
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


def batches_per_epoch(data: Iterable) -> Optional[int]:
    """Batches per epoch on this rank."""
    try:
        n = len(data)  # type: ignore[arg-type]  # probing: TypeError means no len()
    except TypeError:
        return None
    rank, world = rank_and_world()
    if world > 1 and distributed_sampler(data) is None:
        return len(range(rank, n, world))
    return n


def draw_batch(run: DataPosition, it: Iterator) -> Any:
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


def next_batch(run: DataPosition, data: Iterable, it: Optional[Iterator]) -> Any:
    """The next training batch; a new (seeded) epoch starts when the data is exhausted."""
    if it is not None:
        try:
            batch = draw_batch(run, it)
            run.offset += 1
            run.iterator = it
            return batch
        except StopIteration:
            if run.offset == 0:
                raise DataError("train_data yielded no batches (an empty dataset or loader)") from None
    if it is not None or run.offset:
        run.epoch, run.offset = run.epoch + 1, 0
    run.iterator = epoch_iterator(data, run.seed, run.epoch)
    try:
        batch = draw_batch(run, run.iterator)
    except StopIteration:
        raise DataError("train_data yielded no batches (an empty dataset or loader)") from None
    run.offset = 1
    return batch


def total_steps(train_data: Iterable, steps: Optional[int], epochs: Optional[float]) -> int:
    """The run's length from ``steps`` or ``epochs`` (default one epoch), validated."""
    if steps is not None and epochs is not None:
        raise InputError("give steps= or epochs=, not both")
    if epochs is not None and not epochs > 0:
        raise InputError(f"epochs must be > 0, got {epochs}")
    if steps is None:
        length = batches_per_epoch(train_data)
        if length is None:
            raise InputError("train_data has no len(): give steps=")
        if length == 0:
            raise DataError("train_data yielded no batches (len(train_data) is 0)")
        steps = max(1, int(round((epochs or 1) * length)))
    if int(steps) != steps or steps < 1:
        raise InputError(f"steps must be an integer >= 1, got {steps}")
    return int(steps)
