"""How well does the calibrated latency model predict the compact model? Predicted vs measured
latency (batch 1, medians of interleaved runs against the user's dense model) for random
HiAP-shaped decisions at several budgets, right after calibration on this machine.

    python benchmarks/latency_model.py [--models demo deit_small_patch16_224] [--seconds 4]
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from speed import draw_hiap_shaped  # benchmarks/ (this script's folder)

import hiap_fx
from hiap_fx.app.bench import interleaved_medians


def model_and_input(name: str):
    if name == "demo":
        from hiap_fx.app.demo import dense_fashion_mnist_vit

        dense, _, _ = dense_fashion_mnist_vit()
        return dense, torch.randn(1, 1, 28, 28)
    import timm

    torch.manual_seed(0)
    dense = timm.create_model(name).eval()
    return dense, torch.randn(1, *dense.pretrained_cfg["input_size"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["demo", "deit_small_patch16_224"])
    ap.add_argument("--targets", nargs="+", type=float, default=[0.3, 0.5, 0.7, 0.9])
    ap.add_argument("--seconds", type=float, default=4.0)
    args = ap.parse_args()
    lines = ["| model | decisions (seed) | MACs kept | predicted latency | measured latency | "
             "prediction error |", "|---|---|---|---|---|---|"]
    for name in args.models:
        dense, x = model_and_input(name)
        t0 = time.perf_counter()
        prepared = hiap_fx.prepare(dense, x, hiap_fx.PruneConfig(cost="latency", latency_batch=1)).eval()
        print(f"{name}: calibrated in {time.perf_counter() - t0:.1f} s", flush=True)
        for seed, target in enumerate(args.targets):
            draw_hiap_shaped(prepared, target, seed)  # landed on the latency budget
            compact = hiap_fx.finalize(prepared)
            td, tc = interleaved_medians([dense, compact], x, 1, args.seconds)
            predicted = prepared.budget_ratio()
            lines.append(f"| {name} | landed on {target:.1f} ({seed}) | "
                         f"{100 * prepared.hard_macs() / prepared.dense_macs:.1f}% | {predicted:.3f} | "
                         f"{tc / td:.3f} | {100 * (predicted / (tc / td) - 1):+.1f}% |")
            print(lines[-1], flush=True)
    print(f"\nmachine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
