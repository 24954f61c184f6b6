"""Latency tables of the gated building blocks, and their piecewise-linear sympy form.

Each gated MAC node is timed alone at the deploy batch over a grid of kept sizes:
  * a linear (or an ungrouped conv) over kept rows or columns of its weight;
  * an attention kernel (sdpa, or q@k^T + softmax, or p@v) over live heads at full width and,
    when widths are gated, over padded widths at all heads; the two tables multiply.
A table becomes a piecewise-linear expression that equals the table at its points and
interpolates between them (``Widest(0, x - x_i)`` hinges: differentiable in expected values).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import sympy
import torch
import torch.nn.functional as F
from torch import fx

from hiap_fx.gated.cost_model import NodeTerm, Widest
from hiap_fx.graph.ir import tensor_shape
from hiap_fx.graph.ops import op_name
from hiap_fx.passes.latency.timing import median_seconds

Points = list[tuple[float, float]]  # (kept units, seconds), increasing units


def size_grid(full: int, align: int = 1, points: int = 8) -> list[int]:
    """Kept sizes to time: 1 (or ``align``), ``points`` even steps up to ``full``, rounded to
    ``align``."""
    step = max(1, align)
    grid = {min(full, step)} | {full}
    for i in range(1, points):
        grid.add(min(full, max(step, int(round(full * i / points / step)) * step)))
    return sorted(grid)


def piecewise(x: sympy.Expr, points: Points) -> sympy.Expr:
    """The piecewise-linear function through ``points`` (linear beyond the ends) of ``x``."""
    if len(points) == 1:
        return sympy.Float(points[0][1]) * x / sympy.Float(points[0][0]) if points[0][0] else sympy.Float(points[0][1])
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    slopes = [(ys[i + 1] - ys[i]) / (xs[i + 1] - xs[i]) for i in range(len(xs) - 1)]
    expr = sympy.Float(ys[0]) + sympy.Float(slopes[0]) * (x - xs[0])
    for i in range(1, len(slopes)):
        expr += sympy.Float(slopes[i] - slopes[i - 1]) * Widest(sympy.Integer(0), x - xs[i])
    return expr


def interpolate(points: Points, x: float) -> float:
    """``piecewise`` evaluated numerically."""
    xs = [p[0] for p in points]
    i = max(0, min(len(xs) - 2, sum(1 for v in xs[1:-1] if v <= x)))
    (x0, y0), (x1, y1) = points[i], points[i + 1]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def monotone(points: Points) -> Points:
    """Running maximum of the timings: keeping more units never predicts less time (timing noise
    would otherwise make the budget non-monotone in the gates, and landing on it ambiguous)."""
    out: Points = []
    for x, y in points:
        out.append((x, max(y, out[-1][1]) if out else y))
    return out


# --- weighted ops ----------------------------------------------------------------------------


def weighted_call(node: fx.Node, weight: torch.Tensor, batch: int, example_batch: int,
                  dependent: bool) -> Optional[Callable[[int, int], Callable[[], Any]]]:
    """``make(axis, kept) -> fn`` running this linear / ungrouped conv with weight ``axis`` cut to
    ``kept``, or None for ops that are not timed alone (their time is then part of the whole-model
    fit, see :mod:`.build`)."""
    name = op_name(node)
    x_shape = list(tensor_shape(node.args[0]))
    if dependent and x_shape and x_shape[0] % example_batch == 0:
        x_shape[0] = x_shape[0] // example_batch * batch
    dtype, device = weight.dtype, weight.device
    has_bias = len(node.args) > 2 and node.args[2] is not None
    if name == "linear":
        def make(axis: int, kept: int) -> Callable[[], Any]:
            w = torch.randn(kept if axis == 0 else weight.shape[0], kept if axis == 1 else weight.shape[1],
                            dtype=dtype, device=device)
            x = torch.randn(*x_shape[:-1], w.shape[1], dtype=dtype, device=device)
            b = torch.randn(w.shape[0], dtype=dtype, device=device) if has_bias else None
            return lambda: F.linear(x, w, b)
        return make
    if name == "conv2d" and len(x_shape) == 4:
        rest: list[Any] = list(node.args[3:7])
        groups = rest[3] if len(rest) > 3 else node.kwargs.get("groups", 1)
        if groups != 1:
            return None

        def make_conv(axis: int, kept: int) -> Callable[[], Any]:
            shape = list(weight.shape)
            shape[axis] = kept
            w = torch.randn(*shape, dtype=dtype, device=device)
            x = torch.randn(x_shape[0], shape[1], *x_shape[2:], dtype=dtype, device=device)
            b = torch.randn(shape[0], dtype=dtype, device=device) if has_bias else None
            return lambda: F.conv2d(x, w, b, *rest[:3])
        return make_conv
    return None


def weighted_table(make: Callable[[int, int], Callable[[], Any]], axis: int, full: int, align: int,
                   min_time: float) -> Points:
    return monotone([(0.0, 0.0)] + [(float(k), median_seconds(make(axis, k), min_time)) for k in size_grid(full, align)])


# --- attention kernels -------------------------------------------------------------------------


def kernel_call(term: NodeTerm, scale: float, batch: int, example_batch: int,
                device: torch.device, dtype: torch.dtype) -> Callable[[int, int, int], Callable[[], Any]]:
    """``make(heads, qk_width, v_width) -> fn`` running the kernel of ``term`` on canonical
    [batch-like, heads, tokens, width] operands."""
    rows, _, nq, nk, _, _ = term.dims
    if rows % example_batch == 0:
        rows = rows // example_batch * batch

    def make(h: int, wq: int, wv: int) -> Callable[[], Any]:
        q = torch.randn(rows, h, nq, wq, dtype=dtype, device=device)
        k = torch.randn(rows, h, nk, wq, dtype=dtype, device=device)
        v = torch.randn(rows, h, nk, wv, dtype=dtype, device=device)
        p = torch.randn(rows, h, nq, nk, dtype=dtype, device=device)
        if term.kind == "sdpa":
            if term.dims[4] == term.dims[5]:  # finalize pads to one head dim (flash attention)
                w = max(wq, wv)
                q, k, v = (F.pad(t, (0, w - t.shape[-1])) for t in (q, k, v))
            return lambda: F.scaled_dot_product_attention(q, k, v, scale=scale)
        if term.kind == "qk":
            return lambda: torch.softmax((q * scale) @ k.transpose(-1, -2), -1)
        return lambda: p @ v
    return make


def kernel_tables(term: NodeTerm, make: Callable[[int, int, int], Callable[[], Any]], align: int,
                  min_time: float) -> tuple[Points, Points]:
    """Latency over live heads at full width, and over the padded width (the gated widths scaled
    together: x = q/k width + v width as the term uses them) at all heads."""
    _, H, _, _, dq, dv = term.dims
    full_q, full_v = widths(term, dq, dv, 1.0)
    by_heads = monotone([(0.0, 0.0)] + [(float(h), median_seconds(make(h, dq, dv), min_time)) for h in head_grid(H)])
    by_width: Points = []
    if width_symbol(term) is not None:
        full = full_q + full_v
        for k in size_grid(full, align):
            wq, wv = widths(term, dq, dv, k / full)
            by_width.append((float(wq * gated_q(term) + wv * gated_v(term)), median_seconds(make(H, wq, wv), min_time)))
        by_width = monotone(sorted(dict(by_width).items()))
    return by_heads, by_width


def head_grid(heads: int) -> list[int]:
    if heads <= 12:
        return list(range(1, heads + 1))
    return sorted({1, *[max(1, round(heads * i / 8)) for i in range(1, 9)]})


def gated_q(term: NodeTerm) -> int:
    return int(bool(term.qk_width.free_symbols) and term.kind in ("sdpa", "qk"))


def gated_v(term: NodeTerm) -> int:
    return int(bool(term.v_width.free_symbols) and term.kind in ("sdpa", "av"))


def width_symbol(term: NodeTerm) -> Optional[sympy.Expr]:
    """The width expression the width table is a function of (None: widths are not gated)."""
    parts = ([term.qk_width] if gated_q(term) else []) + ([term.v_width] if gated_v(term) else [])
    return sympy.Add(*parts) if parts else None


def widths(term: NodeTerm, dq: int, dv: int, fraction: float) -> tuple[int, int]:
    """(q/k width, v width) at ``fraction`` of the gated widths (ungated ones stay full)."""
    wq = max(1, math.ceil(dq * fraction)) if gated_q(term) else dq
    wv = max(1, math.ceil(dv * fraction)) if gated_v(term) else dv
    return wq, wv
