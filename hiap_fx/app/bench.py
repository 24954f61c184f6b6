"""Dense vs compact comparison: MACs, parameters and CPU latency (medians of interleaved runs)."""

from __future__ import annotations

import statistics
import time
from typing import Sequence

import torch
from pydantic import BaseModel
from torch import nn

from hiap_fx.graph.counting import count_macs


class BenchRow(BaseModel):
    """Latency of both models at one batch size (milliseconds, medians)."""

    batch: int
    dense_ms: float
    compact_ms: float
    speedup: float


class BenchReport(BaseModel):
    """MACs, parameters and latency of a dense model and its compact version."""

    dense_macs: int
    compact_macs: int
    dense_params: int
    compact_params: int
    threads: int
    rows: list[BenchRow]


def _once(model: nn.Module, x: torch.Tensor) -> float:
    t0 = time.perf_counter()
    model(x)
    return time.perf_counter() - t0


def interleaved_medians(models: Sequence[nn.Module], example: torch.Tensor, batch: int,
                        seconds: float = 10.0) -> list[float]:
    """Median latency (seconds) of each model at ``batch``, eval mode under inference_mode, the
    models run in turn (a, b, c, a, b, c, ...) so that drift of the machine hits all alike; two
    warm-up rounds, then at least 5 rounds and about ``seconds`` in all."""
    for m in models:
        m.eval()
    times: list[list[float]] = [[] for _ in models]
    with torch.inference_mode():
        x = example.expand(batch, *example.shape[1:]).contiguous()
        for _ in range(2):
            for m in models:
                m(x)
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline or len(times[0]) < 5:
            for m, t in zip(models, times):
                t.append(_once(m, x))
    return [statistics.median(t) for t in times]


def bench_models(dense: nn.Module, compact: nn.Module, example: torch.Tensor, batches: Sequence[int],
                 seconds: float = 10.0) -> BenchReport:
    """Time both models (:func:`interleaved_medians`), about ``seconds`` per batch size."""
    rows = []
    for batch in batches:
        md, mc = interleaved_medians([dense, compact], example, batch, seconds)
        rows.append(BenchRow(batch=batch, dense_ms=1e3 * md, compact_ms=1e3 * mc, speedup=md / mc))
    return BenchReport(dense_macs=count_macs(dense, example), compact_macs=count_macs(compact, example),
                       dense_params=sum(p.numel() for p in dense.parameters()),
                       compact_params=sum(p.numel() for p in compact.parameters()),
                       threads=torch.get_num_threads(), rows=rows)


def format_bench(report: BenchReport) -> str:
    """The report as a markdown table."""
    lines = [f"MACs (batch 1): {report.dense_macs:,} -> {report.compact_macs:,} "
             f"({report.dense_macs / max(report.compact_macs, 1):.2f}x fewer); parameters "
             f"{report.dense_params:,} -> {report.compact_params:,}; {report.threads} threads",
             "| batch | dense ms | compact ms | speedup |", "|---|---|---|---|"]
    lines += [f"| {r.batch} | {r.dense_ms:.1f} | {r.compact_ms:.1f} | {r.speedup:.2f}x |" for r in report.rows]
    return "\n".join(lines)
