"""Attention census: how many attention calls a model makes, counted by running it.

Independent of hiap_fx's own capture: a :class:`~torch.overrides.TorchFunctionMode` watches one
forward pass. Every ``scaled_dot_product_attention`` call counts; a ``softmax`` counts when its
input was produced by a product of two activations (``q @ k^T``) since the last op that mixes
features with parameters (a linear, a convolution, a product with a weight). That separates
attention maps from a classifier's softmax, a split-attention (radix) softmax over conv
channels or an outlooker's softmax over a linear's output, which are not q-k attention. The coverage run uses it for
its denominator ("of the attention calls the model makes, how many became sites"), and to
enumerate timm models that contain attention at all, on the meta device (no memory, no compute).
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

_PRODUCTS = {torch.matmul, torch.bmm, torch.einsum, torch.baddbmm, torch.Tensor.matmul,
             torch.Tensor.bmm, torch.Tensor.__matmul__, torch.Tensor.__rmatmul__, torch.Tensor.baddbmm}
_SOFTMAX = {F.softmax, torch.softmax, torch.Tensor.softmax, torch.special.softmax}
_MIXING = {F.linear, F.bilinear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d}
_SDPA = {F.scaled_dot_product_attention, F.multi_head_attention_forward}


def _tensors(value: Any) -> Iterable[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


class AttentionCensus(TorchFunctionMode):
    """Counts sdpa calls and softmax calls over products of activations during a forward."""

    def __init__(self) -> None:
        super().__init__()
        self.sdpa = 0
        self.softmax = 0
        self.other_softmax = 0
        # id -> weak reference (a WeakSet would compare tensors with ==)
        self._marked: dict[int, weakref.ref] = {}

    @property
    def calls(self) -> int:
        """Attention calls seen: sdpa plus softmax over an activation product."""
        return self.sdpa + self.softmax

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = list(_tensors(args)) + list(_tensors(kwargs))
        if func in _SDPA:
            self.sdpa += 1
            return out
        if func in _SOFTMAX:
            if inputs and self._is_marked(inputs[0]):
                self.softmax += 1
                self._mark(out)
            else:
                self.other_softmax += 1
            return out
        has_params = any(isinstance(t, nn.Parameter) for t in inputs)
        if func in _PRODUCTS:
            if len(inputs) >= 2 and not has_params:
                self._mark(out)
        elif func not in _MIXING and any(self._is_marked(t) for t in inputs):
            self._mark(out)
        return out

    def _is_marked(self, t: torch.Tensor) -> bool:
        ref = self._marked.get(id(t))
        return ref is not None and ref() is t

    def _mark(self, out: Any) -> None:
        for t in _tensors(out):
            try:
                self._marked[id(t)] = weakref.ref(t)
            except TypeError:  # a tensor subclass without weakref support
                pass


def count_attention_calls(model: nn.Module, *inputs: Any) -> AttentionCensus:
    """Run ``model(*inputs)`` once (no grad) and return the census of its attention calls."""
    census = AttentionCensus()
    with torch.no_grad(), census:
        model(*inputs)
    return census
