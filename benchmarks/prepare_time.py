"""Time of hiap_fx.prepare (capture, normalise, discovery, gate insertion, sympy cost model) on
real model definitions.

    python benchmarks/prepare_time.py [--quick]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch


def main() -> None:
    import timm

    import hiap_fx

    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="one small model, one repeat")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    models = ["deit_tiny_patch16_224"] if args.quick else [
        "deit_small_patch16_224", "vit_base_patch16_224", "swin_tiny_patch4_window7_224",
        "eva02_small_patch14_224"]
    repeats = 1 if args.quick else args.repeats
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    print("| model | sites (attn/ffn) | prepare s (median) |")
    print("|---|---|---|")
    for name in models:
        model = timm.create_model(name, pretrained=False).eval()
        x = torch.randn(1, *model.pretrained_cfg["input_size"])
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            prepared = hiap_fx.prepare(model, x)
            times.append(time.perf_counter() - t0)
        plan = prepared.plan
        print(f"| {name} | {len(plan.attention)}/{len(plan.ffn)} | {statistics.median(times):.2f} |")


if __name__ == "__main__":
    main()
