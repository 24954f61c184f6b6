"""Verify: a compact model must compute what the hard-gated model computes, at the predicted cost."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

from hiap_fx.errors import HiapError
from hiap_fx.graph.counting import reference_counter
from hiap_fx.passes.capture import outputs_match


def second_sample(example_inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """The example inputs with a second, different sample appended on the batch axis (each
    input next to its flip along the last axis)."""
    return tuple(torch.cat([x, x.flip(-1)]) if x.dim() else x for x in example_inputs)


@contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """``module``'s parameters without ``requires_grad`` for the block: a forward records no
    autograd graph (no activations kept), as under ``no_grad``, which the counter's module
    tracker does not support everywhere (``count_macs``)."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def verify_compact(compact: nn.Module, prepared: Any, example_inputs: tuple[torch.Tensor, ...],
                   rtol: float = 1e-4, batch_of_two: bool = False) -> None:
    """Raise ``HiapError`` unless ``compact`` equals ``prepared.eval()`` on ``example_inputs``
    (max abs diff <= rtol x max abs output) and its counted MACs equal ``prepared.hard_macs()``;
    with ``batch_of_two`` (heads folded into the batch axis), outputs are also compared on a
    batch of two different samples, where a wrong (batch, head) order would show."""
    runs = [example_inputs] + ([second_sample(example_inputs)] if batch_of_two else [])
    was_training = prepared.training
    macs = None
    try:
        prepared.eval()
        for inputs in runs:
            with torch.no_grad():
                want = prepared(*inputs)
            if macs is None:  # the compact model's MACs counted on the same forward
                with reference_counter() as counter, frozen(compact):
                    got = compact(*inputs)
                macs = int(counter.get_total_flops()) // 2
            else:
                with torch.no_grad():
                    got = compact(*inputs)
            with torch.no_grad():
                ok, err = outputs_match(want, got, rtol=rtol)
            if not ok:
                raise HiapError(f"finalize check failed: the compact model's output differs from the "
                                f"hard-gated model's by {err:.2e} at batch {inputs[0].shape[0]} "
                                f"(relative to the output scale; allowed {rtol:.0e}). Please report "
                                "the model; finalize(prepared, verify=False) returns the unverified result")
    finally:
        prepared.train(was_training)
    predicted = prepared.hard_macs()
    if macs != predicted:
        raise HiapError(f"finalize check failed: the compact model counts {macs:,} MACs, the cost "
                        f"model predicted {predicted:,}. Please report the model; "
                        "finalize(prepared, verify=False) returns the unverified result")
