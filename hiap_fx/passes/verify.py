"""Verify: a compact model must compute what the hard-gated model computes, at the predicted cost."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hiap_fx.errors import HiapError
from hiap_fx.graph.counting import count_macs
from hiap_fx.passes.capture import outputs_match


def verify_compact(compact: nn.Module, prepared: Any, example_inputs: tuple[torch.Tensor, ...],
                   rtol: float = 1e-4) -> None:
    """Raise ``HiapError`` unless ``compact`` equals ``prepared.eval()`` on ``example_inputs``
    (max abs diff <= rtol x max abs output) and its counted MACs equal ``prepared.hard_macs()``."""
    was_training = prepared.training
    prepared.eval()
    try:
        with torch.no_grad():
            want = prepared(*example_inputs)
            got = compact(*example_inputs)
    finally:
        prepared.train(was_training)
    ok, err = outputs_match(want, got, rtol=rtol)
    if not ok:
        raise HiapError(f"finalize check failed: the compact model's output differs from the "
                        f"hard-gated model's by {err:.2e} (relative to the output scale; allowed "
                        f"{rtol:.0e}). Please report the model; finalize(prepared, verify=False) "
                        "returns the unverified result")
    macs, predicted = count_macs(compact, example_inputs), prepared.hard_macs()
    if macs != predicted:
        raise HiapError(f"finalize check failed: the compact model counts {macs:,} MACs, the cost "
                        f"model predicted {predicted:,}. Please report the model; "
                        "finalize(prepared, verify=False) returns the unverified result")
