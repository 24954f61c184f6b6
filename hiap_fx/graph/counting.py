"""The corrected reference MAC counter: torch's FlopCounterMode, with the fused CPU attention
kernel counted like any other sdpa (torch has no formula for it and would count zero)."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn


def _cpu_flash_sdpa_flops(query_shape, key_shape, value_shape, *args: Any, out_shape=None,
                          **kwargs: Any) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _custom_mapping() -> dict[Any, Any]:
    mapping: dict[Any, Any] = {}
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None:
        mapping[op] = _cpu_flash_sdpa_flops
    return mapping


@contextlib.contextmanager
def reference_counter() -> Iterator[Any]:
    """A FlopCounterMode with the corrected mapping, entered, with nn.MultiheadAttention's fused
    fast path (which has no flop formula) switched off for its duration."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False, custom_mapping=_custom_mapping())
    mha = getattr(torch.backends, "mha", None)
    fastpath = mha.get_fastpath_enabled() if mha is not None else None
    try:
        if mha is not None:
            mha.set_fastpath_enabled(False)
        with counter:
            yield counter
    finally:
        if mha is not None:
            mha.set_fastpath_enabled(fastpath)


def count_macs(module: nn.Module, example_inputs: Any) -> int:
    """Multiply-accumulates of matmul-like ops (linear, matmul/bmm, convolution, sdpa) of one
    forward of ``module`` on ``example_inputs``: FlopCounterMode's total // 2, with the fused CPU
    attention kernel counted by the standard sdpa formula, and ``nn.MultiheadAttention`` counted on
    its ordinary (not fused fast-path) kernels. Autograd stays as the caller set it (torch's
    module tracker fails under no-grad when a parameter is passed straight into a submodule, as
    in CaiT); only forward ops are counted. The train/eval state is left as it was."""
    from hiap_fx.graph.ir import as_input_tuple

    inputs = as_input_tuple(example_inputs)
    with reference_counter() as counter:
        module(*inputs)
    return int(counter.get_total_flops()) // 2
