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


#: HF transformers image-classification classes left out of the attention set: they need
#: inputs other than pixel values (Siglip2: patches with spatial shapes and a mask), a library
#: not on PyPI for CPU (Dinat: natten), or wrap another library (timm) or a language model.
HF_SKIP = {"DinatForImageClassification", "Siglip2ForImageClassification",
           "TimmWrapperForImageClassification", "ShieldGemma2ForImageClassification",
           "PerceiverForImageClassificationFourier", "PerceiverForImageClassificationConvProcessing",
           "PerceiverForImageClassificationLearned", "ImageGPTForImageClassification"}

#: torchvision models with attention.
TORCHVISION_ATTENTION = ["vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32", "vit_h_14", "swin_t", "swin_s",
                         "swin_b", "swin_v2_t", "swin_v2_s", "swin_v2_b", "maxvit_t"]


def meta_census(name: str) -> dict[str, Any]:
    """One timm model built on the meta device (no memory, no compute): its attention calls at
    its default input size, parameter count and patch size."""
    import timm

    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False).eval()
        cfg: dict[str, Any] = getattr(model, "pretrained_cfg", None) or {}
        size = tuple(cfg.get("input_size", (3, 224, 224)))
        census = count_attention_calls(model, torch.empty(1, *size))
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    step = max(patch) if isinstance(patch, (tuple, list)) else int(patch or 0)
    return {"model": name, "calls": census.calls, "params": sum(p.numel() for p in model.parameters()),
            "patch": step}


def hf_image_classifiers() -> list[str]:
    """Every HF transformers image-classification class (minus :data:`HF_SKIP`)."""
    from transformers.models.auto import modeling_auto

    names: set[str] = set()
    for value in modeling_auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES.values():
        names.update(value if isinstance(value, tuple) else (value,))
    return sorted(names - HF_SKIP)


def small_hf_kwargs(cls_name: str) -> dict[str, Any]:
    """Config overrides that keep an HF model's widths but cut its depth (2 layers, one block
    per stage), so that the coverage run fits a CPU."""
    import transformers

    config = getattr(transformers, cls_name).config_class()
    kwargs: dict[str, Any] = {}
    for key in ("depths", "depth"):
        value = getattr(config, key, None)
        if isinstance(value, (list, tuple)) and all(isinstance(v, int) for v in value):
            kwargs[key] = [min(v, 1) for v in value]
    num = getattr(config, "num_hidden_layers", None)
    if not kwargs and isinstance(num, int) and num > 2:  # staged models derive it from depths
        kwargs["num_hidden_layers"] = 2
    try:  # per-stage lists elsewhere in the config may not allow the cut: then the default
        with torch.device("meta"):
            model = getattr(transformers, cls_name)(type(config)(**kwargs))
            size = getattr(model.config, "image_size", 224)
            side = size if isinstance(size, int) else max(size)
            model.eval()(torch.empty(1, getattr(model.config, "num_channels", 3), side, side))
    except Exception:  # noqa: BLE001
        return {}
    return kwargs
