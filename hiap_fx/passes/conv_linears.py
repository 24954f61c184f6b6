"""Convolutions next to attention that are linears over channels, rewritten as such.

* A pointwise (1x1, stride-1, unpadded, ungrouped) convolution whose output reaches an attention
  op, or whose input comes from one (q/k/v or output projections over a (B, C, H, W) map), is
  ``movedim(F.linear(movedim(x, 1, -1), W2d, b), -1, 1)``, a batch norm right after it kept as a
  norm over the rows of the linear.
* A transposed 2-D convolution (ungrouped, undilated) after attention (LowFormer's output
  projection that also upsamples) is a linear from its input channels to (output channel x
  kernel position) followed by :func:`overlap_add`, which sums the blocks into the output map
  (``F.fold``): the linear's input columns are the head outputs, cut as for any projection.

Other convolutions (a CNN stem, MBConv blocks) keep their spelling.
"""

from __future__ import annotations

import operator
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn

from hiap_fx.graph.ir import CapturedGraph, node_shape
from hiap_fx.graph.ops import op_name
from hiap_fx.registry import SAFE_FUNCTIONS, attention_kernel

_ATTENTION_OPS = ("scaled_dot_product_attention", "matmul", "bmm", "einsum")


def near_attention(node: fx.Node, step: Callable[[fx.Node], list[fx.Node]], depth: int = 12) -> bool:
    """Whether an attention op (sdpa, or a product of activations) is reached from ``node``
    through ``step`` within ``depth`` ops, not crossing another projection."""
    frontier, seen = [node], {node}
    for _ in range(depth):
        nxt = []
        for n in frontier:
            for m in step(n):
                if m in seen or m.op == "get_attr":
                    continue
                seen.add(m)
                name = op_name(m)
                if name in _ATTENTION_OPS or attention_kernel(m) is not None:
                    return True
                if name not in ("linear", "conv1d", "conv2d", "conv3d"):
                    nxt.append(m)
        frontier = nxt
    return False


def _pointwise(node: fx.Node, gm: fx.GraphModule) -> Optional[tuple[nn.Module, str, torch.Tensor]]:
    """(holder module, attribute, weight) of a 1x1, stride-1, unpadded, ungrouped convolution
    whose weight is a parameter read by this node alone; else None."""
    if op_name(node) not in ("conv1d", "conv2d", "conv3d") or node.op != "call_function":
        return None
    args = list(node.args) + [None] * (7 - len(node.args))
    w = args[1]
    if not isinstance(w, fx.Node) or w.op != "get_attr" or len(w.users) != 1:
        return None
    if sum(n.op == "get_attr" and n.target == w.target for n in node.graph.nodes) != 1:
        return None
    mod_path, _, attr = str(w.target).rpartition(".")
    holder = gm.get_submodule(mod_path) if mod_path else gm
    weight = getattr(holder, attr, None)
    if not isinstance(weight, torch.Tensor) or any(k != 1 for k in weight.shape[2:]):
        return None

    def all_are(v: Any, value: int) -> bool:
        return v is None or v == value or (isinstance(v, (tuple, list)) and all(x == value for x in v))

    stride, padding, dilation, groups = args[3], args[4], args[5], args[6]
    if not (all_are(stride, 1) and (padding in ("valid", "same") or all_are(padding, 0))
            and all_are(dilation, 1) and groups in (None, 1)):
        return None
    return holder, attr, weight


def pointwise_convs_as_linears(cg: CapturedGraph) -> None:
    """Rewrite pointwise convolutions next to attention as linears over the channel axis (see
    the module docstring); others (a CNN stem, MBConv blocks) keep their spelling."""
    gm = cg.gm
    g = gm.graph
    for node in list(g.nodes):
        found = _pointwise(node, gm)
        if found is None:
            continue
        x = node.args[0]
        if not isinstance(x, fx.Node) or not (near_attention(node, lambda n: list(n.users)) or
                                             near_attention(x, lambda n: n.all_input_nodes)):
            continue
        holder, attr, weight = found
        flat = nn.Parameter(weight.detach().reshape(weight.shape[0], weight.shape[1]).clone(),
                            requires_grad=weight.requires_grad)
        setattr(holder, attr, flat)
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        norm = _batch_norm_after(node, gm)
        with g.inserting_before(node):
            moved = g.call_method("movedim", (x, 1, -1))
            lin = g.call_function(F.linear, (moved, node.args[1], bias))
            if norm is not None:
                # conv + batch norm: the norm over the rows of the linear (the same statistics
                # over the same elements), which finalize cuts with the rows (LeViT's ConvNorm)
                rows = g.call_method("reshape", (lin, -1, weight.shape[0], *[1] * (weight.dim() - 2)))
                with g.inserting_before(norm):
                    normed = g.node_copy(norm, lambda a: rows if a is node else a)
                    same = g.call_method("reshape_as", (normed, lin))
                    back = g.call_method("movedim", (same, -1, 1))
                norm.replace_all_uses_with(back)
                g.erase_node(norm)
            else:
                back = g.call_method("movedim", (lin, -1, 1))
        node.replace_all_uses_with(back)
        g.erase_node(node)


def _batch_norm_after(conv: fx.Node, gm: fx.GraphModule) -> Optional[fx.Node]:
    """The batch norm (a module call, or an exported call with its tensors as arguments) that is
    the only user of ``conv`` and reads it as its input (ConvNorm), else None."""
    users = list(conv.users)
    if len(users) != 1 or users[0].args[:1] != (conv,) or conv in users[0].args[1:]:
        return None
    norm = users[0]
    if norm.op == "call_module":
        module = gm.get_submodule(str(norm.target))
        return norm if isinstance(module, nn.modules.batchnorm._BatchNorm) and len(norm.args) == 1 \
            and not norm.kwargs else None
    return norm if norm.op == "call_function" and op_name(norm) == "batch_norm" else None


def overlap_add(cols: torch.Tensor, kernel_size: Sequence[int], stride: Sequence[int],
                padding: Sequence[int], output_padding: Sequence[int]) -> torch.Tensor:
    """The spatial half of a transposed convolution: ``cols`` (B, h, w, C * kh * kw) holds, for
    each input position, its contribution to a kh x kw block of each output channel; the blocks
    are summed into the (B, C, H, W) output map (``H = (h - 1) * stride - 2 * padding + kh +
    output_padding``)."""
    b, h, w, ck = cols.shape
    size = tuple((n - 1) * s - 2 * p + k + o
                 for n, s, p, k, o in zip((h, w), stride, padding, kernel_size, output_padding))
    if 0 in size:  # padding eats the whole map (F.fold refuses an empty output)
        return cols.new_zeros((b, ck // (kernel_size[0] * kernel_size[1]), *size))
    return F.fold(cols.reshape(b, h * w, ck).transpose(1, 2), size, tuple(kernel_size),
                  stride=tuple(stride), padding=tuple(padding))


SAFE_FUNCTIONS.append(overlap_add)


def _pair(v: Any, default: int) -> tuple[int, int]:
    if v is None:
        return (default, default)
    if isinstance(v, int):
        return (v, v)
    return (int(v[0]), int(v[1])) if len(v) == 2 else (int(v[0]), int(v[0]))


def _transposed_conv(node: fx.Node, gm: fx.GraphModule) -> Optional[tuple[Any, fx.Node, Optional[fx.Node], dict[str, tuple[int, int]]]]:
    """(input, weight node, bias node, geometry) of an ungrouped, undilated, zero-padded 2-D
    transposed convolution (module call, ``F.conv_transpose2d`` or export's aten op) whose
    weight is a parameter read by this node alone; else None."""
    g = node.graph
    module: Optional[nn.ConvTranspose2d] = None
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        if not isinstance(mod, nn.ConvTranspose2d) or mod.padding_mode != "zeros" or len(node.args) != 1 \
                or node.kwargs or isinstance(mod.padding, str) or \
                sum(n.op == "call_module" and n.target == node.target for n in g.nodes) != 1:
            return None
        module = mod
        args: list[Any] = [node.args[0], None, None, mod.stride, mod.padding, mod.output_padding,
                           mod.groups, mod.dilation]
    elif op_name(node) == "conv_transpose2d" and node.op == "call_function" and not node.kwargs:
        args = list(node.args) + [None] * (8 - len(node.args))
        weight = args[1]
        if not isinstance(weight, fx.Node) or weight.op != "get_attr" or len(weight.users) != 1 or \
                sum(n.op == "get_attr" and n.target == weight.target for n in g.nodes) != 1:
            return None
    else:
        return None
    geometry = {"stride": _pair(args[3], 1), "padding": _pair(args[4], 0),
                "output_padding": _pair(args[5], 0), "dilation": _pair(args[7], 1)}
    shape = node_shape(args[0]) if isinstance(args[0], fx.Node) else None
    if args[6] not in (None, 1) or geometry["dilation"] != (1, 1) or shape is None or len(shape) != 4:
        return None
    if module is not None:
        with g.inserting_before(node):
            args[1] = g.get_attr(f"{node.target}.weight")
            args[2] = g.get_attr(f"{node.target}.bias") if module.bias is not None else None
    return args[0], args[1], args[2], geometry


def transposed_convs_as_linears(cg: CapturedGraph) -> None:
    """Rewrite transposed 2-D convolutions that read an attention's output as a linear and
    :func:`overlap_add` (see the module docstring)."""
    gm = cg.gm
    g = gm.graph
    for node in list(g.nodes):
        if not (node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)), nn.ConvTranspose2d)
                or node.op == "call_function" and op_name(node) == "conv_transpose2d"):
            continue
        x0 = node.args[0] if node.args else None
        if not isinstance(x0, fx.Node) or not near_attention(x0, lambda n: n.all_input_nodes):
            continue
        found = _transposed_conv(node, gm)
        if found is None:
            continue
        x, w_node, b_node, geo = found
        assert isinstance(w_node, fx.Node)
        mod_path, _, attr = str(w_node.target).rpartition(".")
        holder = gm.get_submodule(mod_path) if mod_path else gm
        weight = getattr(holder, attr)
        c_in, c_out, kh, kw = weight.shape
        setattr(holder, attr, nn.Parameter(weight.detach().reshape(c_in, c_out * kh * kw).t().contiguous(),
                                           requires_grad=weight.requires_grad))
        with g.inserting_before(node):
            moved = g.call_method("movedim", (x, 1, -1))
            lin = g.call_function(F.linear, (moved, w_node, None))
            out = g.call_function(overlap_add, (lin, (kh, kw), geo["stride"], geo["padding"],
                                                geo["output_padding"]))
            if b_node is not None:
                out = g.call_function(operator.add, (out, g.call_method("reshape", (b_node, 1, -1, 1, 1))))
        node.replace_all_uses_with(out)
        g.erase_node(node)
