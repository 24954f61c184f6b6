"""Opaque calls: user-level functions the tracer kept whole, which may hide an attention kernel."""

from __future__ import annotations

import torch

from hiap_fx.graph.ir import CapturedGraph, node_shape


def opaque_calls(cg: CapturedGraph) -> list[str]:
    """Names of user-level Python functions kept as single calls (fx.wrap / autowrap), which
    may hide an attention kernel."""
    names = []
    for node in cg.gm.graph.nodes:
        fn = node.target if node.op == "call_function" else None
        if isinstance(fn, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
            namespace = fn._qualified_op_name.split("::")[0] if isinstance(
                fn, torch._ops.OpOverloadPacket) else fn.namespace
            if namespace not in ("aten", "prims", "_operator"):  # a custom operator
                names.append(str(fn))
            continue
        if isinstance(fn, type):
            continue  # a class built in the graph (HF's ImageClassifierOutput): a container, no kernel
        if node_shape(node) is None or not any(a.name in cg.input_dependent for a in node.all_input_nodes):
            continue  # a kernel reads activations and returns one (not HF's check_fixed_argument)
        module = getattr(fn, "__module__", None) or ""
        root = module.split(".")[0]
        if fn is not None and root not in ("torch", "_operator", "operator", "builtins", "math"):
            names.append(str(getattr(fn, "__qualname__", fn)))
    return sorted(set(names))[:5]
