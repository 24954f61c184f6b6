"""Measured CPU speedup of the finalized compact model over the dense model, against the MAC ratio.

    python benchmarks/compact_speedup.py [--model deit_small_patch16_224] [--batches 1 8 32]

The pruned network is fixed by hand: in every block the last half of the heads and every other
FFN neuron are closed. Latency is the median of interleaved runs (dense, compact, dense, ...) in
eval mode under ``torch.inference_mode`` (``hiap_fx.app.bench.bench_models``, as ``hiap-fx bench``).
"""

from __future__ import annotations

import argparse
import platform

import torch


def main() -> None:
    import timm

    import hiap_fx
    from hiap_fx.app.bench import bench_models

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
    report = bench_models(dense, compact, torch.randn(1, *size), args.batches, args.seconds)
    ratio = report.dense_macs / report.compact_macs
    print(f"machine: {platform.machine()}, {report.threads} threads, torch {torch.__version__}")
    print(f"{args.model}: MACs {report.dense_macs:,} -> {report.compact_macs:,} (ratio {ratio:.3f}); "
          f"params {report.dense_params:,} -> {report.compact_params:,}")
    print("| batch | dense ms | compact ms | speedup | speedup / MAC ratio |")
    print("|---|---|---|---|---|")
    for r in report.rows:
        print(f"| {r.batch} | {r.dense_ms:.1f} | {r.compact_ms:.1f} | {r.speedup:.3f} | {r.speedup / ratio:.3f} |")


if __name__ == "__main__":
    main()
