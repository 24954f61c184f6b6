"""Does prune() land on the MAC target by itself? One run per target on the demo's dense
Fashion-MNIST ViT (trained or taken from the cache), default PruneConfig apart from the target
and the weights' learning rate; prints a markdown table.

    python benchmarks/budget_targets.py            # targets 0.3 ... 0.9, 1 epoch each
    python benchmarks/budget_targets.py --quick    # targets 0.3, 0.6, 0.9, 150 steps each
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.data import DataLoader

import hiap_fx
from hiap_fx.app.data import fashion_mnist
from hiap_fx.app.demo import dense_fashion_mnist_vit


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--targets", type=float, nargs="+")
    ap.add_argument("--steps", type=int)
    args = ap.parse_args()
    targets = args.targets or ([0.3, 0.6, 0.9] if args.quick else [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    dense, _, _ = dense_fashion_mnist_vit()
    train = DataLoader(fashion_mnist(True, download=True), batch_size=128, shuffle=True, drop_last=True,
                       generator=torch.Generator().manual_seed(0))
    test = DataLoader(fashion_mnist(False, download=True), batch_size=500)
    steps = args.steps or (150 if args.quick else len(train))
    rows = ["| target | kept at end of training | after landing | gap (pp) | logit shift | "
            "dense acc | compact acc | removed sub-layers |", "|---|---|---|---|---|---|---|---|"]
    for t in targets:
        cfg = hiap_fx.PruneConfig(target_macs=t, lr=5e-4)
        r = hiap_fx.prune(dense, train, cfg, steps=steps, eval_data=test, eval_every=steps,
                          progress=False).report
        rows.append(f"| {t:.2f} | {100 * r.trained_ratio:.2f}% | {100 * r.kept_ratio:.2f}% | "
                    f"{r.target_gap_pp:+.2f} | {r.budget_shift:+.3f} | {100 * r.dense_accuracy:.2f}% | "
                    f"{100 * r.compact_accuracy:.2f}% | {len(r.removed_sublayers)} |")
        print(rows[-1], flush=True)
    print(f"\n{steps} steps per run, batch 128, {torch.get_num_threads()} threads\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
