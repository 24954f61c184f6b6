"""Canonical op names for fx nodes, and the op families the passes reason with.

Every spelling of an op (``torch.add``, ``operator.add``, ``Tensor.add_``, ``aten.add.Tensor``,
``nn.GELU`` as a module) maps to one lower-case name, so passes match names, never spellings.
The families are plain sets and can be extended by registering names (see `register_op_family`).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import fx, nn

from hiap_fx.graph.ir import node_shape

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

#: Per-position statistics over a nominal feature width (missing features count as zeros), so
#: removing zero features leaves them unchanged (``hiap_fx.passes.subnorms.width_stats``).
WIDTH_STAT: set[str] = {"width_stats"}

_FAMILIES: dict[str, set[str]] = {
    "movement": MOVEMENT, "cast": CAST, "activation": ACTIVATION, "unary": ELEMENTWISE_UNARY,
    "binary": ELEMENTWISE_BINARY, "norm": NORM, "channel_norm": CHANNEL_NORM, "softmax": SOFTMAX,
    "matmul_like": MATMUL_LIKE, "width_stat": WIDTH_STAT,
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
# the op table: what the passes know of one canonical op beyond its family
# ----------------------------------------------------------------------------------------------


def _linear_macs(node: fx.Node) -> int:
    out, w = node_shape(node), node_shape(node.args[1])
    return math.prod(out) * w[1] if out is not None and w else 0


def _matmul_macs(node: fx.Node) -> int:
    out = node_shape(node)
    a = node_shape(node.args[-2] if op_name(node) in ("baddbmm", "addmm") else node.args[0])
    return math.prod(out) * a[-1] if out and a else 0


def _conv_macs(node: fx.Node) -> int:
    out, w = node_shape(node), node_shape(node.args[1])
    return math.prod(out) * math.prod(w[1:]) if out is not None and w else 0


def einsum_letters(equation: str, ranks: list[int]) -> Optional[tuple[list[str], str]]:
    """The operand subscripts and output of an einsum equation, ``...`` spelled out."""
    eq = equation.replace(" ", "")
    if "->" not in eq:
        return None
    lhs, out = eq.split("->")
    terms = lhs.split(",")
    if len(terms) != len(ranks):
        return None
    spare = [c for c in "ZYXWVUTSRQPONM" if c not in eq]
    ellipsis = ""
    for i, term in enumerate(terms):
        if "..." in term:
            n = ranks[i] - (len(term) - 3)
            ellipsis = "".join(spare[:n]) if len(ellipsis) < n else ellipsis
            terms[i] = term.replace("...", ellipsis[len(ellipsis) - n:] if n else "")
    out = out.replace("...", ellipsis)
    if any(len(t) != r or len(set(t)) != len(t) for t, r in zip(terms, ranks)):
        return None
    return terms, out


def _einsum_macs(node: fx.Node) -> int:
    """A two-operand einsum: the product of the sizes of all its letters (each output element
    sums over the contracted ones)."""
    args = list(node.args)
    operands = args[1] if len(args) == 2 and isinstance(args[1], (list, tuple)) else args[1:]
    found = [node_shape(a) if isinstance(a, fx.Node) else None for a in operands]
    shapes = [s for s in found if s is not None]
    if not args or not isinstance(args[0], str) or len(found) != 2 or len(shapes) != 2:
        return 0
    parsed = einsum_letters(args[0], [len(s) for s in shapes])
    if parsed is None:
        return 0
    sizes: dict[str, int] = {}
    for term, shape in zip(parsed[0], shapes):
        for letter, size in zip(term, shape):
            sizes[letter] = max(sizes.get(letter, 1), size)
    return math.prod(sizes.values())


def attention_macs(node: fx.Node, token_axis: int = -2) -> int:
    """rows x key tokens x (q/k dim + v dim) of an attention kernel call (sdpa or registered)."""
    q, k, v = (node_shape(a) for a in node.args[:3])
    if q is None or k is None or v is None:
        return 0
    return math.prod(q[:-1]) * k[token_axis] * (q[-1] + v[-1])


@dataclass(frozen=True)
class OpKind:
    """One canonical op as the passes see it.

    Attributes:
        macs: its multiply-accumulates from the shapes the propagate pass recorded (node_macs).
        size_args: positions of its size arguments (``"rest"``: every argument after the tensor),
            rewritten when a cut changes a size (never its axis arguments).
        function: the functional form normalisation writes for it (module calls, aten spellings).
    """

    macs: Optional[Callable[[fx.Node], int]] = None
    size_args: Union[str, tuple[int, ...], None] = None
    function: Optional[Callable[..., Any]] = None


OP_KINDS: dict[str, OpKind] = {
    "linear": OpKind(macs=_linear_macs, function=F.linear),
    **{f"conv{d}d": OpKind(macs=_conv_macs, size_args=(6,), function=f)
       for d, f in ((1, F.conv1d), (2, F.conv2d), (3, F.conv3d))},
    **{n: OpKind(macs=_matmul_macs, function=torch.matmul) for n in ("matmul", "bmm", "mm")},
    **{n: OpKind(macs=_matmul_macs) for n in ("baddbmm", "addmm")},
    "scaled_dot_product_attention": OpKind(macs=attention_macs),
    "einsum": OpKind(macs=_einsum_macs),
    "layer_norm": OpKind(function=F.layer_norm),
    "softmax": OpKind(function=F.softmax),
    **{n: OpKind(size_args="rest") for n in ("reshape", "view", "expand", "repeat", "_unsafe_view")},
    "unflatten": OpKind(size_args=(2,)), "split": OpKind(size_args=(1,)),
    "split_with_sizes": OpKind(size_args=(1,)), "narrow": OpKind(size_args=(3,)),
}

#: keyword arguments that hold sizes, for every op
SIZE_KWARGS = {"shape", "size", "sizes", "split_size_or_sections", "split_size", "length", "groups"}


def op_kind(name: str) -> OpKind:
    """The table entry of canonical op ``name`` (an empty one for ops the table does not list)."""
    return OP_KINDS.get(name, _NO_KIND)


_NO_KIND = OpKind()
