"""Canonical op names for fx nodes, and the op families the passes reason with.

Every spelling of an op (``torch.add``, ``operator.add``, ``Tensor.add_``, ``aten.add.Tensor``,
``nn.GELU`` as a module) maps to one lower-case name, so passes match names, never spellings.
The families are plain sets and can be extended by registering names (see `register_op_family`).
"""

from __future__ import annotations

import operator
from typing import Any, Callable, Optional

import torch
from torch import fx, nn

# ----------------------------------------------------------------------------------------------
# families
# ----------------------------------------------------------------------------------------------

#: Pure data movement: the output only rearranges, selects or repeats input elements.
MOVEMENT: set[str] = {
    "reshape", "view", "permute", "transpose", "t", "unbind", "getitem", "chunk", "split",
    "split_with_sizes", "tensor_split", "contiguous", "flatten", "unflatten", "unsqueeze", "squeeze",
    "expand", "expand_as", "repeat", "repeat_interleave", "clone", "narrow", "select", "slice",
    "movedim", "moveaxis", "swapaxes", "swapdims", "roll", "cat", "concat", "concatenate", "stack",
    "index_select", "flip", "mT", "T", "mH", "H", "detach", "alias", "view_as", "reshape_as", "pad", "_unsafe_view",
    "lift_fresh_copy",
}

#: Dtype / device casts: identity on values for our purposes.
CAST: set[str] = {"to", "float", "half", "bfloat16", "double", "type", "type_as", "_to_copy", "cpu", "cuda"}

#: Non-linear element-wise activations (their presence makes Linear-x-Linear an FFN).
ACTIVATION: set[str] = {
    "gelu", "relu", "relu6", "silu", "sigmoid", "tanh", "softplus", "elu", "selu", "celu",
    "leaky_relu", "hardswish", "hardsigmoid", "hardtanh", "mish", "erf", "quick_gelu", "glu_act",
    "gelu_tanh", "prelu", "softsign", "logsigmoid", "swish",
}

#: Other element-wise unary ops (pass values per element).
ELEMENTWISE_UNARY: set[str] = ACTIVATION | {
    "dropout", "identity", "neg", "abs", "exp", "log", "sqrt", "rsqrt", "square", "sin", "cos",
    "clamp", "clamp_min", "clamp_max", "reciprocal", "sign", "floor", "ceil", "round",
    "feature_alpha_dropout", "alpha_dropout", "dropout1d", "dropout2d", "native_dropout",
}

#: Element-wise binary ops (with broadcasting).
ELEMENTWISE_BINARY: set[str] = {
    "add", "sub", "rsub", "mul", "div", "truediv", "pow", "maximum", "minimum", "masked_fill",
    "where", "floordiv", "addcmul", "lerp",
}

#: Normalisations over trailing dims (mix the normalised axis) and per-channel affine norms.
NORM: set[str] = {"layer_norm", "rms_norm", "group_norm", "normalize"}
CHANNEL_NORM: set[str] = {"batch_norm"}

SOFTMAX: set[str] = {"softmax", "log_softmax", "_softmax", "_safe_softmax"}

#: Ops that contract an axis with learned or data weights (MAC-bearing).
MATMUL_LIKE: set[str] = {
    "linear", "matmul", "bmm", "mm", "baddbmm", "addmm", "conv1d", "conv2d", "conv3d", "einsum",
    "scaled_dot_product_attention",
}

RESIDUAL_ADD: set[str] = {"add"}

_FAMILIES: dict[str, set[str]] = {
    "movement": MOVEMENT, "cast": CAST, "activation": ACTIVATION, "unary": ELEMENTWISE_UNARY,
    "binary": ELEMENTWISE_BINARY, "norm": NORM, "channel_norm": CHANNEL_NORM, "softmax": SOFTMAX,
    "matmul_like": MATMUL_LIKE,
}


def register_op_family(family: str, *names: str) -> None:
    """Teach hiap_fx that ops called ``names`` belong to ``family`` (e.g. a new activation)."""
    if family not in _FAMILIES:
        raise KeyError(f"unknown op family {family!r}; known: {sorted(_FAMILIES)}")
    _FAMILIES[family].update(names)
    if family == "activation":
        ELEMENTWISE_UNARY.update(names)


# ----------------------------------------------------------------------------------------------
# canonical names
# ----------------------------------------------------------------------------------------------

_OPERATOR_NAMES: dict[Callable[..., Any], str] = {
    operator.add: "add", operator.iadd: "add", operator.sub: "sub", operator.isub: "sub",
    operator.mul: "mul", operator.imul: "mul", operator.truediv: "div", operator.itruediv: "div",
    operator.floordiv: "floordiv", operator.matmul: "matmul", operator.neg: "neg",
    operator.getitem: "getitem", operator.pow: "pow",
}

#: tensor-valued attributes read through ``getattr`` (transposes)
_TENSOR_ATTRS = {"mT", "T", "mH", "H"}

_ALIASES: dict[str, str] = {
    "multiply": "mul", "subtract": "sub", "divide": "div", "true_divide": "div", "concat": "cat",
    "concatenate": "cat", "swapaxes": "transpose", "swapdims": "transpose",
    "_scaled_dot_product_flash_attention_for_cpu": "scaled_dot_product_attention",
    "_native_batch_norm_legit_no_training": "batch_norm", "native_layer_norm": "layer_norm",
    "_unsafe_view": "view", "hardtanh_": "hardtanh",
}

#: torch.nn module classes that stay leaves, by canonical op name.
MODULE_OPS: dict[type, str] = {
    nn.Linear: "linear", nn.Conv1d: "conv1d", nn.Conv2d: "conv2d", nn.Conv3d: "conv3d",
    nn.LayerNorm: "layer_norm", nn.GroupNorm: "group_norm", nn.BatchNorm1d: "batch_norm",
    nn.BatchNorm2d: "batch_norm", nn.BatchNorm3d: "batch_norm", nn.GELU: "gelu", nn.ReLU: "relu",
    nn.ReLU6: "relu6", nn.SiLU: "silu", nn.Sigmoid: "sigmoid", nn.Tanh: "tanh", nn.ELU: "elu",
    nn.LeakyReLU: "leaky_relu", nn.Hardswish: "hardswish", nn.Hardsigmoid: "hardsigmoid",
    nn.Mish: "mish", nn.Softplus: "softplus", nn.SELU: "selu", nn.CELU: "celu", nn.PReLU: "prelu",
    nn.Dropout: "dropout", nn.Dropout1d: "dropout", nn.Dropout2d: "dropout", nn.AlphaDropout: "dropout",
    nn.Identity: "identity", nn.Softmax: "softmax", nn.LogSoftmax: "log_softmax",
    nn.Flatten: "flatten", nn.Unflatten: "unflatten",
}
if hasattr(nn, "RMSNorm"):
    MODULE_OPS[nn.RMSNorm] = "rms_norm"


def _strip(name: str) -> str:
    if name.endswith("_") and not name.startswith("_"):
        name = name[:-1]  # in-place variant
    return _ALIASES.get(name, name)


def op_name(node: fx.Node, modules: Optional[dict[str, nn.Module]] = None) -> str:
    """Canonical lower-case name of what ``node`` computes ('' for placeholders/outputs)."""
    if node.op == "call_function":
        target = node.target
        if target in _OPERATOR_NAMES:
            return _OPERATOR_NAMES[target]
        if target is getattr and len(node.args) > 1 and node.args[1] in _TENSOR_ATTRS:
            return str(node.args[1])
        if isinstance(target, torch._ops.OpOverload):
            return _strip(target._schema.name.split("::")[-1])
        if isinstance(target, torch._ops.OpOverloadPacket):
            return _strip(target.__name__)
        name = getattr(target, "__name__", str(target))
        return _strip(name)
    if node.op == "call_method":
        return _strip(str(node.target))
    if node.op == "call_module" and modules is not None:
        mod = modules.get(str(node.target))
        if mod is None:
            return "module"
        for cls in type(mod).__mro__:
            if cls in MODULE_OPS:
                return MODULE_OPS[cls]
        return "module"
    if node.op == "get_attr":
        return "get_attr"
    return ""


def in_family(name: str, family: str) -> bool:
    """Whether canonical op ``name`` belongs to ``family`` (see module docstring)."""
    return name in _FAMILIES[family]


# ----------------------------------------------------------------------------------------------
# size arguments (rewritten when a cut changes a size; axis arguments never are)
# ----------------------------------------------------------------------------------------------

SIZE_ARGS = {  # op -> positions of size arguments (1: "every argument after the tensor")
    "reshape": "rest", "view": "rest", "expand": "rest", "repeat": "rest", "_unsafe_view": "rest",
    "unflatten": (2,), "split": (1,), "split_with_sizes": (1,), "narrow": (3,),
    "conv1d": (6,), "conv2d": (6,), "conv3d": (6,),
}


SIZE_KWARGS = {"shape", "size", "sizes", "split_size_or_sections", "split_size", "length", "groups"}
