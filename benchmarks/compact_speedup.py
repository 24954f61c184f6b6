"""Measured CPU speedup of the finalized compact model over the dense model, against the MAC ratio.

    python benchmarks/compact_speedup.py [--model deit_small_patch16_224] [--batches 1 8 32]

The pruned network is fixed by hand: in every block the last half of the heads and every other
FFN neuron are closed. Latency is the median of interleaved runs (dense, compact, dense, ...) in
eval mode under ``torch.inference_mode``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch


def _time(model, x) -> float:
    t0 = time.perf_counter()
    model(x)
    return time.perf_counter() - t0


def main() -> None:
    import timm

    import hiap_fx

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="deit_small_patch16_224")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--seconds", type=float, default=20.0, help="time budget per batch size")
    args = ap.parse_args()
    torch.manual_seed(0)
    dense = timm.create_model(args.model).eval()
    size = dense.pretrained_cfg["input_size"]
    prepared = hiap_fx.prepare(dense, torch.randn(1, *size)).eval()
    with torch.no_grad():
        for gate in prepared.gate_modules().values():
            if gate.kind == "head":
                gate.logits[gate.logits.numel() // 2:] = -5.0
            elif gate.kind == "neuron":
                gate.logits[::2] = -5.0
    compact = hiap_fx.finalize(prepared)
    x1 = torch.randn(1, *size)
    dense_macs, compact_macs = hiap_fx.count_macs(dense, x1), hiap_fx.count_macs(compact, x1)
    ratio = dense_macs / compact_macs
    params = (sum(p.numel() for p in dense.parameters()), sum(p.numel() for p in compact.parameters()))
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{args.model}: MACs {dense_macs:,} -> {compact_macs:,} (ratio {ratio:.3f}); "
          f"params {params[0]:,} -> {params[1]:,}")
    print("| batch | dense ms | compact ms | speedup | speedup / MAC ratio |")
    print("|---|---|---|---|---|")
    with torch.inference_mode():
        for batch in args.batches:
            x = torch.randn(batch, *size)
            for _ in range(2):  # warm-up
                dense(x)
                compact(x)
            td, tc = [], []
            t_end = time.perf_counter() + args.seconds
            while time.perf_counter() < t_end or len(td) < 5:
                td.append(_time(dense, x))
                tc.append(_time(compact, x))
            md, mc = statistics.median(td), statistics.median(tc)
            print(f"| {batch} | {1e3 * md:.1f} | {1e3 * mc:.1f} | {md / mc:.3f} | {md / mc / ratio:.3f} |")


if __name__ == "__main__":
    main()
