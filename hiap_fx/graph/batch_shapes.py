"""Shapes of every node at another batch size, by fake tensors (no real compute, no copies).

Index flow reads the graph on the recorded example; at a batch of one, an axis that holds
``batch x heads`` (heads folded into the batch axis, ``reshape(B * heads, N, d)``) looks like
a plain head axis. Comparing the recorded shapes with the shapes at a batch of two tells the
two apart: an axis whose size doubles carries the batch.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode

from hiap_fx.graph.ir import CapturedGraph


class _ShapeRecorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.shapes: dict[str, tuple[int, ...]] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if isinstance(out, torch.Tensor):
            self.shapes[n.name] = tuple(int(s) for s in out.shape)
        return out


def shapes_at_batch(cg: CapturedGraph, batch: int) -> Optional[dict[str, tuple[int, ...]]]:
    """Node name -> output shape with the example inputs' batch axis (axis 0) resized to
    ``batch``; ``None`` when the graph cannot run on fake tensors (a data-dependent op)."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    recorder = _ShapeRecorder(cg.gm)
    try:
        with mode, torch.no_grad():
            inputs = [mode.from_tensor(x).expand(batch, *x.shape[1:]).clone() if x.dim() else x
                      for x in cg.example_inputs]
            recorder.run(*inputs)
    except Exception:  # noqa: BLE001 - any op fake tensors cannot run: no second reading
        return None
    return recorder.shapes
