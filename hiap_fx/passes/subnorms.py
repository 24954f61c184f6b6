"""A norm over the merged head outputs before the output projection, rewritten so heads can go.

BEiT3's and EVA02-CLIP's sub-LN (timm's ``scale_attn_norm`` / ``scale_attn_inner``) normalise
the concatenated head outputs before the projection. Cutting a head changes the mean and the
variance the norm sees, so as written no head could be removed exactly. With per-token ``mu``
and ``sigma`` over the C features::

    linear(layer_norm(x, (C,), g, b, eps), W, c)
      = linear(x * (1/sigma), W*g, c + W@b) - (mu/sigma) * (W@g)

:func:`width_stats` computes ``[1/sigma, mu/sigma]`` over a *nominal* width C, counting the
features missing from ``x`` as zeros. A closed head's features are zeros in the gated model and
absent from the compact one, so the statistics, the product and the correction term (which keeps
``W@g`` over all C columns) agree: finalize cuts the projection's columns like any other. An RMS
norm needs only ``1/rms`` over the nominal width and no correction.

Only norms whose input is the kernel output moved into place (no other op in between) and whose
one user is a linear are rewritten; pre-norms of the residual stream keep their spelling.
"""

from __future__ import annotations

import operator
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

from hiap_fx.graph.editing import add_parameter, sole_parameter
from hiap_fx.graph.ir import CapturedGraph, node_shape
from hiap_fx.graph.ops import in_family, op_name
from hiap_fx.registry import SAFE_FUNCTIONS, attention_kernel


def width_stats(x: torch.Tensor, width: int, eps: Optional[float], centred: bool) -> torch.Tensor:
    """Per-position statistics of ``x`` over its last axis as if it had ``width`` features, the
    missing ones zero: ``[1/sigma, mu/sigma]`` (``centred``, a layer norm) or ``[1/rms]`` (an
    RMS norm), shape ``(..., 2)`` or ``(..., 1)``, computed in float32, returned in x's dtype."""
    xf = x.float()
    eps = torch.finfo(x.dtype).eps if eps is None else eps
    if not centred:
        return torch.rsqrt(xf.square().sum(-1, keepdim=True) / width + eps).to(x.dtype)
    mean = xf.sum(-1, keepdim=True) / width
    missing = width - x.shape[-1]
    var = ((xf - mean).square().sum(-1, keepdim=True) + missing * mean.square()) / width
    inv = torch.rsqrt(var + eps)
    return torch.cat([inv, mean * inv], -1).to(x.dtype)


SAFE_FUNCTIONS.append(width_stats)


def _kernel_output_moved(x: Any, modules: dict[str, nn.Module]) -> bool:
    """Whether ``x`` is an attention kernel's output (sdpa, a product of activations, a
    registered kernel) reached through data movement alone."""
    while isinstance(x, fx.Node):
        name = op_name(x, modules)
        if name in ("scaled_dot_product_attention", "matmul", "bmm", "einsum") or attention_kernel(x) is not None:
            return True
        if not (in_family(name, "movement") or in_family(name, "cast") or name in ("contiguous", "dropout", "identity")):
            return False
        x = x.args[0] if x.args else None
    return False


def _norm_args(node: fx.Node) -> Optional[dict[str, Any]]:
    """x, normalized shape, weight, bias, eps of a canonical ``layer_norm`` / ``rms_norm`` call."""
    name = op_name(node)
    if node.op != "call_function" or name not in ("layer_norm", "rms_norm"):
        return None
    keys = ["x", "shape", "weight", "bias", "eps"] if name == "layer_norm" else ["x", "shape", "weight", "eps"]
    found = dict(zip(keys, node.args))
    mapped = {"input": "x", "normalized_shape": "shape"}
    found.update({mapped.get(k, k): v for k, v in node.kwargs.items()})
    found.setdefault("bias", None)
    found.setdefault("weight", None)
    found.setdefault("eps", 1e-5 if name == "layer_norm" else None)
    found["centred"] = name == "layer_norm"
    return found


def subnorms_as_width_stats(cg: CapturedGraph) -> None:
    """Rewrite the norms over merged head outputs before the output projection (see the module
    docstring); other norms keep their spelling."""
    gm = cg.gm
    g = gm.graph
    modules = dict(gm.named_modules())
    for norm in list(g.nodes):
        args = _norm_args(norm)
        if args is None or not _kernel_output_moved(args["x"], modules) or len(norm.users) != 1:
            continue
        lin = next(iter(norm.users))
        x, shape = args["x"], node_shape(args["x"])
        if op_name(lin) != "linear" or lin.op != "call_function" or lin.args[:1] != (norm,) \
                or norm in list(lin.args[1:]) + list(lin.kwargs.values()) or shape is None \
                or tuple(args["shape"]) != tuple(shape[-1:]):
            continue
        w_node = lin.args[1] if len(lin.args) > 1 else lin.kwargs.get("weight")
        c_node = lin.args[2] if len(lin.args) > 2 else lin.kwargs.get("bias")
        weight, bias_found = sole_parameter(gm, w_node), sole_parameter(gm, c_node) if c_node is not None else None
        gain = sole_parameter(gm, args["weight"]) if args["weight"] is not None else None
        shift = sole_parameter(gm, args["bias"]) if args["bias"] is not None else None
        if weight is None or (c_node is not None and bias_found is None) \
                or (args["weight"] is not None and gain is None) or (args["bias"] is not None and shift is None):
            continue
        holder, attr, W = weight
        with torch.no_grad():
            Wf = W.detach().float()
            g_vec = gain[2].detach().float() if gain is not None else torch.ones(Wf.shape[1])
            folded = Wf * g_vec
            extra = Wf @ shift[2].detach().float() if shift is not None else torch.zeros(Wf.shape[0])
            column = folded.sum(1)
        setattr(holder, attr, nn.Parameter(folded.to(W.dtype), requires_grad=W.requires_grad))
        with g.inserting_before(lin):
            stats = g.call_function(width_stats, (x, shape[-1], args["eps"], args["centred"]))
            inv = _stat(g, stats, 0)
            scaled = g.call_function(operator.mul, (x, inv))
            bias: Any = c_node
            if shift is not None:
                if bias_found is not None:
                    b_holder, b_attr, b = bias_found
                    setattr(b_holder, b_attr, nn.Parameter((b.detach().float() + extra).to(b.dtype),
                                                           requires_grad=b.requires_grad))
                else:
                    bias = g.get_attr(add_parameter(gm, holder, f"{attr}_norm_bias", extra, W))
            new = g.call_function(F.linear, (scaled, w_node, bias))
            out = new
            if args["centred"]:
                col = g.get_attr(add_parameter(gm, holder, f"{attr}_norm_column", column, W))
                ratio = _stat(g, stats, 1)
                out = g.call_function(operator.sub, (new, g.call_function(operator.mul, (ratio, col))))
        lin.replace_all_uses_with(out)
        g.erase_node(lin)
        g.erase_node(norm)


def _stat(g: fx.Graph, stats: fx.Node, i: int) -> fx.Node:
    """``stats[..., i:i + 1]``."""
    key: Any = (Ellipsis, slice(i, i + 1))
    return g.call_function(operator.getitem, (stats, key))
