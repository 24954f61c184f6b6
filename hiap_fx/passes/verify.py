"""Verify: a compact model must compute what the hard-gated model computes, at the predicted cost."""

from __future__ import annotations

import copy
import warnings
from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch
from torch import nn

from hiap_fx.errors import HiapError, HiapWarning
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


#: float64 agreement that proves a float32 (or bf16) difference is rounding: a wrong cut differs
#: by far more, an exact one by ~1e-13 after dozens of layers
DOUBLE_RTOL = 1e-9


def _dtype_of(value: Any) -> str:
    leaves = [t for t in torch.utils._pytree.tree_leaves(value) if isinstance(t, torch.Tensor)]
    return str(leaves[0].dtype).replace("torch.", "") if leaves else "its dtype"


def error_in_double(compact: nn.Module, prepared: Any, inputs: tuple[torch.Tensor, ...]) -> Optional[float]:
    """The relative difference of float64 copies of ``compact`` and ``prepared`` on ``inputs``
    (floating inputs cast too), or ``None`` when they cannot run in float64."""
    try:
        wide = tuple(t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in inputs)
        with torch.no_grad():
            want = copy.deepcopy(prepared).double().eval()(*wide)
            got = copy.deepcopy(compact).double().eval()(*wide)
            ok, err = outputs_match(want, got, rtol=DOUBLE_RTOL)
        return float(err)
    except Exception:  # noqa: BLE001 - a graph with a fixed dtype inside: no float64 run
        return None


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
                exact = error_in_double(compact, prepared, inputs)
                if exact is not None and exact <= DOUBLE_RTOL:
                    warnings.warn(f"finalize: the compact model's output differs from the hard-gated "
                                  f"model's by {err:.2e} (relative) in {_dtype_of(want)}, above {rtol:.0e}; "
                                  f"in float64 the two agree to {exact:.1e}, so this is rounding over "
                                  "a deep model, not a wrong cut", HiapWarning, stacklevel=4)
                    continue
                raise HiapError(f"finalize check failed: the compact model's output differs from the "
                                f"hard-gated model's by {err:.2e} at batch {inputs[0].shape[0]} "
                                f"(relative to the output scale; allowed {rtol:.0e}"
                                + (f"; {exact:.1e} in float64" if exact is not None else "") + "). Please "
                                "report the model; finalize(prepared, verify=False) returns the unverified result")
    finally:
        prepared.train(was_training)
    predicted = prepared.hard_macs()
    if macs != predicted:
        raise HiapError(f"finalize check failed: the compact model counts {macs:,} MACs, the cost "
                        f"model predicted {predicted:,}. Please report the model; "
                        "finalize(prepared, verify=False) returns the unverified result")
