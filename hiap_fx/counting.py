"""The corrected reference MAC counter: torch's FlopCounterMode, with the fused CPU attention
kernel counted like any other sdpa (torch has no formula for it and would count zero)."""

from __future__ import annotations

from typing import Any

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


def count_macs(module: nn.Module, example_inputs: Any) -> int:
    """Multiply-accumulates of matmul-like ops (linear, matmul/bmm, convolution, sdpa) of one
    forward of ``module`` on ``example_inputs``: FlopCounterMode's total // 2, with the fused CPU
    attention kernel counted by the standard sdpa formula, and ``nn.MultiheadAttention`` counted on
    its ordinary (not fused fast-path) kernels. The module is run in no-grad mode and
    its train/eval state is left as it was."""
    from torch.utils.flop_counter import FlopCounterMode

    from .passes.capture import as_input_tuple

    inputs = as_input_tuple(example_inputs)
    counter = FlopCounterMode(display=False, custom_mapping=_custom_mapping())
    mha = getattr(torch.backends, "mha", None)
    fastpath = mha.get_fastpath_enabled() if mha is not None else None
    try:
        if mha is not None:  # nn.MultiheadAttention's fused fast path has no flop formula
            mha.set_fastpath_enabled(False)
        with torch.no_grad(), counter:
            module(*inputs)
    finally:
        if mha is not None:
            mha.set_fastpath_enabled(fastpath)
    return int(counter.get_total_flops()) // 2
