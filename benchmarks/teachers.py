"""The converged dense teachers of the accuracy frontier (benchmarks/frontier.py): the demo's
6-block ViT on Fashion-MNIST at patch 7 (17 tokens) and patch 4 (50 tokens, attention a real share
of the cost), trained with ``CONVERGED_RECIPES`` (seeded; shifts and flips) and cached in
``~/.cache/hiap_fx`` with the test accuracy after every epoch.

    python benchmarks/teachers.py                 # both
    python benchmarks/teachers.py --patch 4 --threads 1
"""

from __future__ import annotations

import argparse
import json

import torch

from hiap_fx.app.demo import CONVERGED_RECIPES, dense_fashion_mnist_vit

PATCHES = (7, 4)


def converged_teacher(patch: int, progress: bool = True) -> tuple[torch.nn.Module, dict]:
    """The converged teacher at ``patch`` (trained on first use) and its training record."""
    model, path, _ = dense_fashion_mnist_vit(progress=progress, recipe=CONVERGED_RECIPES[patch], patch_size=patch)
    return model, json.loads(path.with_suffix(".json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--patch", type=int, nargs="+", default=list(PATCHES))
    ap.add_argument("--threads", type=int)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for patch in args.patch:
        _, info = converged_teacher(patch)
        curve = info["test_accuracy_per_epoch"]
        print(f"patch {patch}: {len(curve)} epochs in {info['seconds'] / 60:.1f} min "
              f"({info['threads']} threads); test accuracy per epoch: "
              + " ".join(f"{100 * a:.2f}" for a in curve))


if __name__ == "__main__":
    main()
