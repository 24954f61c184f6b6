"""Multiply-accumulates per graph node, from the shapes recorded on the example inputs."""

from __future__ import annotations

import math

from torch import fx

from hiap_fx.graph.ir import CapturedGraph, node_shape
from hiap_fx.graph.ops import op_name
from hiap_fx.registry import attention_kernel


def node_macs(node: fx.Node) -> int:
    """MACs of one node of a normalised, propagated graph (0 for ops without MACs)."""
    name = op_name(node)
    out = node_shape(node)
    if name == "linear":
        w = node_shape(node.args[1])
        return math.prod(out) * w[1] if out is not None and w else 0
    if name in ("matmul", "bmm", "mm", "baddbmm", "addmm"):
        a = node_shape(node.args[-2] if name in ("baddbmm", "addmm") else node.args[0])
        if out is None or a is None or not out:
            return 0
        return math.prod(out) * a[-1]
    if name in ("conv1d", "conv2d", "conv3d"):
        w = node_shape(node.args[1])
        return math.prod(out) * math.prod(w[1:]) if out is not None and w else 0
    kernel = attention_kernel(node)
    if name == "scaled_dot_product_attention" or kernel is not None:
        q, k, v = (node_shape(a) for a in node.args[:3])
        if q is None or k is None or v is None:
            return 0
        return math.prod(q[:-1]) * k[kernel.token_axis if kernel else -2] * (q[-1] + v[-1])
    return 0


def graph_macs(cg: CapturedGraph) -> dict[str, int]:
    """MACs of every MAC-bearing node, by node name."""
    result = {}
    for n in cg.gm.graph.nodes:
        m = node_macs(n)
        if m:
            result[n.name] = m
    return result
