"""The graph as discovery reads it: node shapes, parameter paths, reachability, and the rejection types."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from torch import fx

from hiap_fx.graph.flow import IndexFlow
from hiap_fx.graph.ir import CapturedGraph, is_tensor_node
from hiap_fx.graph.ops import in_family, op_name
from hiap_fx.registry import AttentionKernel

PASS_BACK = ("movement", "cast", "unary", "binary", "norm")


class Reject(Exception):
    """A candidate structure that is not a prunable site (reason in the message)."""


class NotCandidate(Reject):
    """Not even shaped like the structure looked for (not reported)."""


@dataclass
class Core:
    kind: str
    nodes: list[fx.Node]
    q: fx.Node
    k: fx.Node
    v: fx.Node
    out: fx.Node
    k_dim_axis: int  # -1 (sdpa, k as is) or -2 (manual, k transposed)
    k_token_axis: int
    logits_inputs: list[fx.Node] = field(default_factory=list)
    mixers: list[fx.Node] = field(default_factory=list)
    token_axis: int = -2  # of q, v and the output
    kernel: Optional[AttentionKernel] = None  # a registered attention kernel


def attribute_path(node: Any) -> Optional[str]:
    return str(node.target) if isinstance(node, fx.Node) and node.op == "get_attr" else None


class GraphView:
    """Queries over a captured graph shared by the discovery steps."""

    def __init__(self, cg: CapturedGraph) -> None:
        self.cg = cg
        self.modules = dict(cg.gm.named_modules())
        self.flow = IndexFlow(cg)

    def name(self, node: fx.Node) -> str:
        return op_name(node, self.modules)

    def dependent(self, node: Any) -> bool:
        return isinstance(node, fx.Node) and node.name in self.cg.input_dependent

    def data_inputs(self, node: fx.Node) -> list[fx.Node]:
        if self.name(node) == "type_as" and isinstance(node.args[0], fx.Node):
            return [node.args[0]]  # x.type_as(other) reads only the dtype of other
        return [a for a in node.all_input_nodes
                if self.dependent(a) and is_tensor_node(a)]

    def passes_back(self, node: fx.Node) -> bool:
        name = self.name(node)
        if any(in_family(name, f) for f in PASS_BACK) or name in ("dropout", "identity"):
            return True
        if node.op == "call_module" and name == "module":
            return not any(True for _ in self.modules[str(node.target)].parameters())
        if name in ("conv1d", "conv2d", "conv3d"):
            return self.flow.is_channel_conv(node, name)
        if in_family(name, "channel_norm"):
            return True
        # anything else (a reduction such as hiera's q pooling ``q.amax(dim)``): index flow
        # decides later whether it only moves or selects the features
        return node.op in ("call_function", "call_method") and name not in ("linear",) \
            and not in_family(name, "matmul_like") and not in_family(name, "softmax")

    def linear_params(self, lin: fx.Node) -> tuple[str, Optional[str]]:
        w = attribute_path(lin.args[1])
        if w is None:
            raise Reject(f"linear {lin.name} has a computed weight ({lin.args[1]}), not a parameter")
        b = lin.args[2] if len(lin.args) > 2 else lin.kwargs.get("bias")
        if not isinstance(b, fx.Node):
            return w, None
        return w, attribute_path(b) or f"node:{b.name}"
