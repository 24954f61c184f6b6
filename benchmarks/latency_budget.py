"""cost="latency": does the measured latency of the compact model land on target_latency?

For each model and target: prepare with ``PruneConfig(cost="latency", target_latency=t,
latency_batch=1)`` (calibration timed on this machine, cached), prune for ``--steps`` steps,
finalize, then time the user's dense model and the compact model at batch 1 in one interleaved
run. Reported: the latency model's prediction, the measured ratio and its distance from the
target (goal: within 5%).

- ``deit_small_patch16_224``: random weights, 224 px, synthetic images labelled by the dense
  model itself (distillation does the rest), batch 2;
- ``demo``: the demo's dense Fashion-MNIST ViT (trained and cached by ``bash run.sh demo``) on
  Fashion-MNIST, batch 128.

    python benchmarks/latency_budget.py                     # both models, targets 0.5 and 0.7
    python benchmarks/latency_budget.py --models demo --steps 100

Each finished (model, target) is cached in benchmarks/results/latency_budget.json: an
interrupted run continues where it stopped (``--fresh`` starts over).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

import hiap_fx
from hiap_fx.app.bench import interleaved_medians
from hiap_fx.files.atomic import write_text

RESULTS = Path(__file__).resolve().parent / "results" / "latency_budget.json"


def deit_small(steps: int):
    import timm

    torch.manual_seed(0)
    dense = timm.create_model("deit_small_patch16_224").eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2 * steps, 3, 224, 224, generator=g)
    with torch.no_grad():
        y = torch.cat([dense(chunk).argmax(-1) for chunk in x.split(32)])
    data = DataLoader(TensorDataset(x, y), batch_size=2, shuffle=True, drop_last=True,
                      generator=torch.Generator().manual_seed(0))
    return dense, data, x[:1], dict(lr=1e-4)


def demo(steps: int):
    from hiap_fx.app.data import fashion_mnist
    from hiap_fx.app.demo import dense_fashion_mnist_vit

    dense, _, _ = dense_fashion_mnist_vit()
    train = fashion_mnist(True)
    data = DataLoader(train, batch_size=128, shuffle=True, drop_last=True,
                      generator=torch.Generator().manual_seed(0))
    return dense, data, train[0][0][None], dict(lr=5e-4)


MODELS = {"deit_small_patch16_224": deit_small, "demo": demo}


def run_one(name: str, target: float, steps: int, seconds: float) -> dict:
    dense, data, x1, extra = MODELS[name](steps)
    cfg = hiap_fx.PruneConfig(cost="latency", target_latency=target, latency_batch=1, **extra)
    t0 = time.perf_counter()
    prepared = hiap_fx.prepare(dense, x1, cfg)
    calibration = time.perf_counter() - t0
    result = hiap_fx.prune(prepared, data, steps=steps, progress=False)
    p = result.prepared
    td, tc = interleaved_medians([dense, result.compact], x1, 1, seconds)
    return {"model": name, "target": target, "steps": steps, "prepare_s": calibration,
            "predicted": p.budget_ratio(), "predicted_ms": 1e3 * p.hard_latency(),
            "calibrated_dense_ms": 1e3 * p.dense_latency, "dense_ms": 1e3 * td, "compact_ms": 1e3 * tc,
            "measured": tc / td, "macs": p.hard_macs() / p.dense_macs}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--targets", nargs="+", type=float, default=[0.5, 0.7])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--fresh", action="store_true")
    args = ap.parse_args()
    done = {} if args.fresh or not RESULTS.exists() else json.loads(RESULTS.read_text())
    for name in args.models:
        for target in args.targets:
            key = f"{name}@{target}@{args.steps}"
            if key not in done:
                done[key] = run_one(name, target, args.steps, args.seconds)
                write_text(RESULTS, json.dumps(done, indent=1))
            r = done[key]
            print(f"{key}: predicted {r['predicted']:.3f}, measured {r['measured']:.3f}", flush=True)
    print(f"\nmachine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}\n")
    print("| model | target latency | steps | predicted | dense ms | compact ms | measured ratio | "
          "off target | MACs kept | calibration + prepare s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in done.values():
        off = r["measured"] / r["target"] - 1
        print(f"| {r['model']} | {r['target']:.2f} | {r['steps']} | {r['predicted']:.3f} | "
              f"{r['dense_ms']:.2f} | {r['compact_ms']:.2f} | {r['measured']:.3f} | {100 * off:+.1f}% | "
              f"{100 * r['macs']:.1f}% | {r['prepare_s']:.1f} |")


if __name__ == "__main__":
    main()
