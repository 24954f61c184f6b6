"""Normalise: one spelling per op, so discovery matches one form.

After this pass:
* every linear layer is ``F.linear(x, <get_attr weight>, <get_attr bias or None>)``;
* every convolution is ``F.conv{1,2,3}d(x, weight, bias, stride, padding, dilation, groups)``;
* every layer norm is ``F.layer_norm(x, shape, weight, bias, eps)``, every RMS norm
  ``F.rms_norm(x, shape, weight, eps)``;
* every softmax is ``F.softmax(x, dim=d)``; every matmul/bmm is ``torch.matmul(a, b)``, and so
  is a two-operand einsum of the attention kind (shared batch letters, one contracted letter, at
  most one free letter per side: ``"bhid,bhjd->bhij"``), between permutes;
* every attention kernel is ``F.scaled_dot_product_attention(..., scale=s)`` with ``s`` explicit;
* every view/reshape/unflatten is ``Tensor.reshape(x, *sizes)``;
* every dropout is an ``nn.Dropout`` module call (follows ``train()`` / ``eval()``);
* identity modules are gone;
* a pointwise (1x1) convolution next to attention (its q/k/v or output projection over a
  (B, C, H, W) map) is the linear it is: ``movedim(F.linear(movedim(x, 1, -1), W2d, b), -1, 1)``,
  its weight stored as the 2-D matrix, so heads and dims are found and cut as for any linear;
  a transposed convolution after attention (LowFormer's output projection that also upsamples)
  is a linear over its input channels and a parameter-free overlap-add
  (:mod:`hiap_fx.passes.conv_linears`);
* a layer or RMS norm over the merged head outputs right before the output projection (sub-LN)
  is :func:`~hiap_fx.passes.subnorms.width_stats` and a product, the norm's gain folded into
  the projection (:mod:`hiap_fx.passes.subnorms`);
* a linear split along its features into parts of which some reach attention and some do not
  (a parallel block's MLP and q/k/v in one linear) is one linear per part
  (:mod:`hiap_fx.passes.fused_linears`);
* an einsum with a constant one-hot operand (MaxViT-TF's relative position lookups) is the
  gather it is (:mod:`hiap_fx.passes.selections`).
Other ops keep their spelling; ``hiap_fx.graph.ops.op_name`` gives their canonical name.
"""

from __future__ import annotations

import operator
from typing import Any, Callable, Optional, cast

import torch
import torch.nn.functional as F
from torch import fx, nn

from hiap_fx.graph.ir import CapturedGraph, node_shape
from hiap_fx.graph.ops import einsum_letters, op_kind, op_name
from hiap_fx.passes.conv_linears import pointwise_convs_as_linears, transposed_convs_as_linears
from hiap_fx.passes.fused_linears import split_fused_linears
from hiap_fx.passes.selections import selection_as_gather
from hiap_fx.passes.subnorms import subnorms_as_width_stats
from hiap_fx.registry import attention_kernel


def _conv_function(nd: int) -> Callable[..., Any]:
    function = op_kind(f"conv{nd}d").function
    assert function is not None
    return function


def _get_attr(graph: fx.Graph, path: str) -> fx.Node:
    return graph.get_attr(path)


def _param_node(graph: fx.Graph, module_path: str, mod: nn.Module, attr: str) -> Optional[fx.Node]:
    if getattr(mod, attr, None) is None:
        return None
    return _get_attr(graph, f"{module_path}.{attr}" if module_path else attr)


def _replace(node: fx.Node, new: Any, cg: CapturedGraph) -> None:
    if isinstance(new, fx.Node) and new not in node.all_input_nodes:
        new.meta.update({k: v for k, v in node.meta.items() if k not in new.meta})
        if node.name in cg.values:  # what the node computed: the new node computes the same
            cg.values[new.name] = cg.values[node.name]
    node.replace_all_uses_with(new)
    node.graph.erase_node(node)


def _module_node(node: fx.Node, mod: nn.Module) -> Optional[fx.Node]:
    g = node.graph
    path = str(node.target)
    x = node.args[0] if node.args else None
    with g.inserting_before(node):
        if isinstance(mod, nn.Linear):
            return g.call_function(F.linear, (x, _param_node(g, path, mod, "weight"),
                                              _param_node(g, path, mod, "bias")))
        if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and mod.padding_mode == "zeros":
            nd = len(mod.kernel_size)
            return g.call_function(_conv_function(nd), (
                x, _param_node(g, path, mod, "weight"), _param_node(g, path, mod, "bias"),
                tuple(mod.stride), mod.padding if isinstance(mod.padding, str) else tuple(mod.padding),
                tuple(mod.dilation), mod.groups))
        if isinstance(mod, nn.LayerNorm):
            return g.call_function(F.layer_norm, (
                x, tuple(mod.normalized_shape), _param_node(g, path, mod, "weight"),
                _param_node(g, path, mod, "bias"), mod.eps))
        if hasattr(nn, "RMSNorm") and isinstance(mod, nn.RMSNorm):
            return g.call_function(F.rms_norm, (
                x, tuple(mod.normalized_shape), _param_node(g, path, mod, "weight"), mod.eps))
        if isinstance(mod, nn.Softmax):
            return g.call_function(F.softmax, (x,), {"dim": mod.dim})
        if isinstance(mod, nn.Identity):
            return cast(fx.Node, x)
    return None


def _aten_node(node: fx.Node, cg: CapturedGraph) -> Optional[fx.Node]:
    """Rewrite torch.export's aten spellings of the normalised ops."""
    if not isinstance(node.target, torch._ops.OpOverload):
        return None
    name = node.target._schema.name.split("::")[-1]
    g, a = node.graph, cast(tuple[Any, ...], node.args)  # fx arguments: dynamically typed
    with g.inserting_before(node):
        if name == "linear":
            return g.call_function(F.linear, (a[0], a[1], a[2] if len(a) > 2 else None))
        if name in ("conv1d", "conv2d", "conv3d"):
            nd = int(name[-2])
            stride, padding, dilation, groups = (list(a[3:]) + [None] * 4)[:4]
            return g.call_function(_conv_function(nd), (
                a[0], a[1], a[2] if len(a) > 2 else None, tuple(stride or (1,) * nd),
                padding if isinstance(padding, str) else tuple(padding or (0,) * nd),
                tuple(dilation or (1,) * nd), groups or 1))
        if name == "layer_norm":
            return g.call_function(F.layer_norm, (a[0], tuple(a[1]), a[2] if len(a) > 2 else None,
                                                  a[3] if len(a) > 3 else None,
                                                  a[4] if len(a) > 4 else 1e-5))
        if name == "rms_norm":
            return g.call_function(F.rms_norm, (a[0], tuple(a[1]), a[2] if len(a) > 2 else None,
                                                a[3] if len(a) > 3 else None))
        if name in ("softmax", "_softmax", "_safe_softmax"):
            return g.call_function(F.softmax, (a[0],), {"dim": a[1]})
        if name in ("matmul", "bmm", "mm"):
            return g.call_function(torch.matmul, (a[0], a[1]))
        if name in ("view", "reshape", "_unsafe_view"):
            return g.call_method("reshape", (a[0], *a[1]))
        if name == "dropout":
            return _dropout_module(cg, node, a[0], float(a[1]))
    return None


def _dropout_module(cg: CapturedGraph, node: fx.Node, x: Any, p: float) -> fx.Node:
    idx = sum(1 for n, _ in cg.gm.named_children() if n.startswith("hiap_dropout"))
    name = f"hiap_dropout{idx}"
    cg.gm.add_submodule(name, nn.Dropout(p))
    return node.graph.call_module(name, (x,))


_POSITIONAL = {
    F.linear: ("input", "weight", "bias"),
    F.scaled_dot_product_attention: ("query", "key", "value"),
}


def _positional(node: fx.Node) -> None:
    """Move leading keyword arguments of known functions into positions (``F.linear(input=x)``)."""
    names = _POSITIONAL.get(cast(Any, node.target)) if node.op == "call_function" else None
    if not names or not node.kwargs:
        return
    args, kwargs = list(node.args), dict(node.kwargs)
    for i, key in enumerate(names):
        if i >= len(args) and key in kwargs:
            args.append(kwargs.pop(key))
        elif i >= len(args):
            if node.target is F.linear and key == "bias":
                args.append(None)
            else:
                break
    node.args, node.kwargs = tuple(args), kwargs


def _functional_node(node: fx.Node, cg: CapturedGraph) -> Optional[fx.Node]:
    g = node.graph
    _positional(node)
    name = op_name(node)
    args, kwargs = node.args, node.kwargs
    with g.inserting_before(node):
        if node.op == "call_function" and node.target in (operator.matmul, torch.bmm, torch.mm) or (
                node.op == "call_method" and name in ("matmul", "bmm", "mm")):
            return g.call_function(torch.matmul, (args[0], args[1]))
        if name == "softmax" and not (node.op == "call_function" and node.target is F.softmax):
            dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
            extra = {"dtype": kwargs["dtype"]} if kwargs.get("dtype") is not None else {}
            return g.call_function(F.softmax, (args[0],), {"dim": dim, **extra})
        if node.op == "call_method" and name == "view" and not (
                len(args) == 2 and isinstance(args[1], torch.dtype)):
            return g.call_method("reshape", tuple(args))
        if name == "unflatten":
            return _unflatten(node)
        if name == "einsum":
            return selection_as_gather(node, cg) or einsum_as_matmul(node)
        if name == "dropout" and node.op == "call_function":
            p = kwargs.get("p", args[1] if len(args) > 1 else 0.5)
            return _dropout_module(cg, node, args[0], float(cast(Any, p)))
        if name == "scaled_dot_product_attention" and node.op == "call_function" and (
                kwargs.get("scale") is None and (len(args) < 7 or args[6] is None)):
            return _pinned_sdpa(node)
        kernel = attention_kernel(node)
        if kernel is not None and kernel.scale_arg and kwargs.get(kernel.scale_arg) is None:
            return _pinned_kernel(node, kernel.scale_arg)
    return None


def _dense_scale(node: fx.Node) -> Optional[float]:
    """1/sqrt(head dim at capture) of an attention call whose q is its first argument."""
    q = node.args[0]
    shape = node_shape(q)
    return float(shape[-1]) ** -0.5 if shape else None


def _pinned_kernel(node: fx.Node, scale_arg: str) -> Optional[fx.Node]:
    """A registered kernel's call with its scale keyword explicit (see ``_pinned_sdpa``)."""
    scale = _dense_scale(node)
    if scale is None:
        return None
    return node.graph.call_function(cast(Any, node.target), tuple(node.args), {**node.kwargs, scale_arg: scale})


def _pinned_sdpa(node: fx.Node) -> Optional[fx.Node]:
    """sdpa with ``scale`` explicit: 1/sqrt(head dim at capture), so later slicing keeps it."""
    scale = _dense_scale(node)
    if scale is None:
        return None
    names = ["query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"]
    kwargs = dict(zip(names[3:], node.args[3:]))
    kwargs.update(node.kwargs)
    kwargs["scale"] = scale
    return node.graph.call_function(F.scaled_dot_product_attention, tuple(node.args[:3]), kwargs)


def einsum_as_matmul(node: fx.Node) -> Optional[fx.Node]:
    """``einsum(eq, a, b)`` as ``permute(matmul(permute(a), permute(b)))`` when the equation is
    a batched matrix product (see the module docstring); else ``None`` (left as is)."""
    args = list(node.args)
    if not args or not isinstance(args[0], str):
        return None
    operands = args[1] if len(args) == 2 and isinstance(args[1], (list, tuple)) else args[1:]
    if len(operands) != 2 or not all(isinstance(o, fx.Node) and node_shape(o) is not None for o in operands):
        return None
    a, b = operands
    parsed = einsum_letters(args[0], [len(node_shape(a) or ()), len(node_shape(b) or ())])
    if parsed is None:
        return None
    (ta, tb), out = parsed
    batch = [c for c in out if c in ta and c in tb]
    left = [c for c in ta if c in out and c not in tb]
    right = [c for c in tb if c in out and c not in ta]
    contract = [c for c in ta if c in tb and c not in out]
    if len(contract) != 1 or len(left) > 1 or len(right) > 1 or \
            set(ta) | set(tb) != set(out) | set(contract) or len(out) != len(set(out)):
        return None
    g = node.graph
    pa = [ta.index(c) for c in batch + left + contract]
    pb = [tb.index(c) for c in batch + contract + right]
    x = g.call_method("permute", (a, *pa)) if pa != list(range(len(ta))) else a
    y = g.call_method("permute", (b, *pb)) if pb != list(range(len(tb))) else b
    if not left:
        x = g.call_method("unsqueeze", (x, -2))
    if not right:
        y = g.call_method("unsqueeze", (y, -1))
    z = g.call_function(torch.matmul, (x, y))
    if not right:
        z = g.call_method("squeeze", (z, -1))
    if not left:
        z = g.call_method("squeeze", (z, -2 if right else -1))
    have = batch + left + right
    perm = [have.index(c) for c in out]
    return g.call_method("permute", (z, *perm)) if perm != list(range(len(out))) else z


def _unflatten(node: fx.Node) -> Optional[fx.Node]:
    x = node.args[0]
    dim: Any = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    sizes: Any = node.kwargs.get("sizes", node.args[2] if len(node.args) > 2 else None)
    shape = node_shape(x)
    if shape is None or dim is None or sizes is None:
        return None
    rank = len(shape)
    dim = dim % rank
    g = node.graph
    before = [g.call_method("size", (x, i)) for i in range(dim)]
    after = [g.call_method("size", (x, i)) for i in range(dim + 1, rank)]
    return g.call_method("reshape", (x, *before, *sizes, *after))


def normalise(cg: CapturedGraph) -> CapturedGraph:
    """Rewrite ``cg.gm`` in place into the normal form described in the module docstring."""
    gm = cg.gm
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        new: Optional[Any] = None
        if node.op == "call_module":
            mod = modules.get(str(node.target))
            if mod is not None:
                new = _module_node(node, mod)
        elif node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            new = _aten_node(node, cg)
        if new is None and node.op in ("call_function", "call_method"):
            new = _functional_node(node, cg)
        if new is not None:
            _replace(node, new, cg)
    pointwise_convs_as_linears(cg)
    transposed_convs_as_linears(cg)
    split_fused_linears(cg)
    subnorms_as_width_stats(cg)
    values_on_the_right(gm.graph)
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()
    cg.facts_fresh = False
    return cg


def _swaps_last_two(node: fx.Node) -> bool:
    """``x.transpose(-2, -1)`` / ``x.mT`` / a permute swapping the last two axes."""
    shape = node_shape(node)
    rank = len(shape) if shape is not None else 0
    if rank < 2 or not isinstance(node.args[0] if node.args else None, fx.Node):
        return False
    name = op_name(node)
    if name == "mT":
        return True
    if name in ("transpose", "swapaxes") and len(node.args) == 3 and all(isinstance(a, int) for a in node.args[1:]):
        return sorted(a % rank for a in cast(tuple, node.args[1:])) == [rank - 2, rank - 1]
    if name == "permute":
        dims = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
        want = list(range(rank - 2)) + [rank - 1, rank - 2]
        return [int(d) % rank for d in cast(tuple, dims)] == want
    return False


def _from_softmax(node: Any) -> bool:
    for _ in range(4):
        if not isinstance(node, fx.Node):
            return False
        name = op_name(node)
        if name in ("softmax", "_softmax", "_safe_softmax"):
            return True
        if node.op == "call_module" or name not in ("dropout", "to", "type_as", "float", "contiguous"):
            return False
        node = node.args[0]
    return False


def values_on_the_right(graph: fx.Graph) -> None:
    """``v @ P^T`` with ``P`` a softmax output (values on the left, as in some efficient
    attention families) becomes ``(P @ v^T)^T``, the form attention discovery reads."""
    for node in list(graph.nodes):
        if not (node.op == "call_function" and node.target is torch.matmul and len(node.args) == 2):
            continue
        v, pt = node.args
        if not (isinstance(v, fx.Node) and isinstance(pt, fx.Node) and _swaps_last_two(pt)
                and _from_softmax(pt.args[0]) and (node_shape(v) or ())[-2:] != ()):
            continue
        with graph.inserting_before(node):
            vt = graph.call_method("transpose", (v, -2, -1))
            out = graph.call_function(torch.matmul, (pt.args[0], vt))
            back = graph.call_method("transpose", (out, -2, -1))
        node.replace_all_uses_with(back)
        graph.erase_node(node)
