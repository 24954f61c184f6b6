"""Multiply-accumulates per graph node, from the shapes recorded on the example inputs."""

from __future__ import annotations

from torch import fx

from hiap_fx.graph.ir import CapturedGraph
from hiap_fx.graph.ops import attention_macs, op_kind, op_name
from hiap_fx.registry import attention_kernel


def node_macs(node: fx.Node) -> int:
    """MACs of one node of a normalised, propagated graph (0 for ops without MACs): the op
    table's formula, or the attention formula for a registered kernel."""
    kernel = attention_kernel(node)
    if kernel is not None:
        return attention_macs(node, kernel.token_axis)
    formula = op_kind(op_name(node)).macs
    return formula(node) if formula is not None else 0


def graph_macs(cg: CapturedGraph) -> dict[str, int]:
    """MACs of every MAC-bearing node, by node name."""
    result = {}
    for n in cg.gm.graph.nodes:
        m = node_macs(n)
        if m:
            result[n.name] = m
    return result
