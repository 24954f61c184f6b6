"""Does the MAC cut turn into CPU speed? Compact vs dense latency (medians of interleaved runs,
eval, inference mode) as a ratio to the MAC ratio, at batch 1 and 32:

- the frontier models (seed 0, written by benchmarks/frontier.py) vs the dense Fashion-MNIST ViT;
- DeiT-Small and ViT-B/16 (random weights, 224 px) pruned to 50% MACs with HiAP-shaped,
  heterogeneous decisions (random gate logits landed on the budget by land_on_budget: heads of
  different widths, different neuron counts per layer), plus prepare and finalize time.

    python benchmarks/speed.py            # everything, ~10 s per batch size and model
    python benchmarks/speed.py --quick    # frontier models only (if present), 2 s per size
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import hiap_fx
from hiap_fx.app.bench import bench_models
from hiap_fx.gated.budget import land_on_budget

RESULTS = Path(__file__).resolve().parent / "results"


def rows_for(name: str, dense, compact, x, seconds: float, batches=(1, 32)) -> list[str]:
    rep = bench_models(dense, compact, x, list(batches), seconds)
    mac_ratio = rep.dense_macs / max(rep.compact_macs, 1)
    return [f"| {name} | {100 / mac_ratio:.1f}% | {r.batch} | {r.dense_ms:.2f} | {r.compact_ms:.2f} | "
            f"{r.speedup:.2f}x | {r.speedup / mac_ratio:.2f} |" for r in rep.rows]


def hiap_shaped(model, x: torch.Tensor, target: float, seed: int = 0):
    """Prepare, draw heterogeneous gate logits, land them on ``target``, finalize; with timings."""
    t0 = time.perf_counter()
    prepared = hiap_fx.prepare(model, x).eval()
    t_prepare = time.perf_counter() - t0
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in prepared.gate_modules().values():
            gate.logits.copy_(torch.randn(gate.logits.shape, generator=g) * 2 + 2)
    land_on_budget(prepared, target, 0.005)
    t0 = time.perf_counter()
    compact = hiap_fx.finalize(prepared)
    return compact, t_prepare, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seconds", type=float)
    args = ap.parse_args()
    seconds = args.seconds or (2.0 if args.quick else 10.0)
    header = ["| model | MACs kept | batch | dense ms | compact ms | speedup | speedup / MAC ratio |",
              "|---|---|---|---|---|---|---|"]
    lines = list(header)
    models = sorted((RESULTS / "models").glob("*.pt")) if (RESULTS / "models").exists() else []
    if models:
        from hiap_fx.app.demo import dense_fashion_mnist_vit

        dense, _, _ = dense_fashion_mnist_vit()
        x = torch.randn(1, 1, 28, 28)
        for path in models:
            # whole pickled modules that benchmarks/frontier.py wrote on this machine (Torch-Pruning
            # models are not graph modules, so not hiap_fx.save files): trusted by construction
            compact = torch.load(path, weights_only=False).eval()
            lines += rows_for(f"Fashion-MNIST ViT, {path.stem}", dense, compact, x, seconds)
            print(lines[-1], flush=True)
    timing = ["| model | prepare s | finalize s (incl. verification) |", "|---|---|---|"]
    if not args.quick:
        import timm

        for name in ("deit_small_patch16_224", "vit_base_patch16_224"):
            model = timm.create_model(name, pretrained=False).eval()
            x = torch.randn(1, 3, 224, 224)
            compact, t_prep, t_fin = hiap_shaped(model, x, 0.5)
            timing.append(f"| {name} | {t_prep:.2f} | {t_fin:.2f} |")
            lines += rows_for(f"{name} (HiAP-shaped 50%)", model, compact, x, seconds)
            print(lines[-1], flush=True)
    print(f"\n{torch.get_num_threads()} threads\n")
    print("\n".join(lines))
    if len(timing) > 2:
        print()
        print("\n".join(timing))


if __name__ == "__main__":
    main()
