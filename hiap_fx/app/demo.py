"""The embedded default job: a small timm ViT trained on Fashion-MNIST (seeded, cached), pruned
with HiAP to a MAC target in one phase, finalized, measured and reported."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Optional

import torch
from pydantic import BaseModel, Field
from torch import nn
from torch.utils.data import DataLoader

from hiap_fx.app.bench import BenchReport, bench_models
from hiap_fx.app.data import fashion_mnist, shift_flip
from hiap_fx.files.atomic import write_text, write_with
from hiap_fx.training.classify import evaluate, train_classifier
from hiap_fx.training.report import PruneReport

DEMO_ARCH: dict[str, Any] = dict(img_size=28, patch_size=7, in_chans=1, num_classes=10,
                                 embed_dim=64, depth=6, num_heads=4, mlp_ratio=4.0)


class DenseRecipe(BaseModel):
    """How a dense Fashion-MNIST ViT is trained (AdamW, warm-up + cosine, label smoothing 0.1)."""

    epochs: int
    lr: float = 1e-3
    batch_size: int = 128
    seed: int = 0
    augment: bool = Field(False, description="random shifts of up to 2 px and left-right flips")


DEMO_RECIPE = DenseRecipe(epochs=3)
CONVERGED_RECIPES = {7: DenseRecipe(epochs=24, augment=True), 4: DenseRecipe(epochs=12, augment=True)}
"""The benchmarks' teachers by patch size: trained until test accuracy stops improving (the
per-epoch curve is cached beside the weights and shown in docs/benchmarks.md); patch 4 has three
times the tokens, so a step costs about three times as much and it gets half the epochs."""


def demo_model(**overrides: Any) -> nn.Module:
    """The demo's architecture: timm's ``VisionTransformer`` with 6 blocks of width 64, 4 heads,
    patch 7 on 28x28 grey images (17 tokens), 10 classes; random weights."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(**{**DEMO_ARCH, **overrides})


def cache_dir() -> Path:
    """Where trained dense models are cached (``$HIAP_CACHE`` or ``~/.cache/hiap_fx``)."""
    return Path(os.environ.get("HIAP_CACHE") or Path.home() / ".cache" / "hiap_fx")


def dense_fashion_mnist_vit(train_data: Optional[DataLoader] = None, progress: bool = True,
                            recipe: DenseRecipe = DEMO_RECIPE, **arch: Any) -> tuple[nn.Module, Path, bool]:
    """The demo's dense model (or another ``arch``) trained on Fashion-MNIST with ``recipe``,
    loaded from the cache when a model of the same architecture, recipe and torch version was
    trained before; returns (model, cache file, whether it came from the cache). Beside the
    weights, ``<file>.json`` records the test accuracy after every epoch and the training time."""
    train_key = recipe.model_dump(exclude=None if recipe.augment else {"augment"})  # as before augment
    key = json.dumps({"arch": {**DEMO_ARCH, **arch}, "train": train_key,
                      "torch": torch.__version__.split("+")[0]}, sort_keys=True)
    path = cache_dir() / f"fmnist_vit_{hashlib.sha256(key.encode()).hexdigest()[:12]}.pt"
    model = demo_model(**arch)
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval(), path, True
    if train_data is None:
        train_data = DataLoader(fashion_mnist(True, download=True), batch_size=recipe.batch_size,
                                shuffle=True, drop_last=True,
                                generator=torch.Generator().manual_seed(recipe.seed))
    test = DataLoader(fashion_mnist(False, download=True), batch_size=500)
    curve: list[float] = []
    started = time.perf_counter()
    torch.manual_seed(recipe.seed)
    model = demo_model(**arch)
    train_classifier(model, train_data, epochs=recipe.epochs, lr=recipe.lr, seed=recipe.seed,
                     progress=progress, augment=shift_flip if recipe.augment else None,
                     on_epoch=lambda epoch, m: curve.append(evaluate(m, test)))
    write_with(path, lambda tmp: torch.save(model.state_dict(), tmp))
    info = {"arch": {**DEMO_ARCH, **arch}, "recipe": recipe.model_dump(), "test_accuracy_per_epoch": curve,
            "seconds": time.perf_counter() - started, "threads": torch.get_num_threads()}
    write_text(path.with_suffix(".json"), json.dumps(info, indent=1))
    return model.eval(), path, False


class DemoResult(BaseModel):
    """Numbers the demo prints (and writes to ``demo.json``)."""

    report: PruneReport
    bench: BenchReport
    dense_training_seconds: float
    dense_cached: bool
    total_seconds: float


def run_demo(out_dir: str = "hiap_demo", target: float = 0.5, prune_epochs: float = 2.0,
             lr: float = 5e-4, batch_size: int = 128, bench_seconds: float = 5.0,
             progress: bool = True) -> DemoResult:
    """Train (or reuse) the dense Fashion-MNIST ViT, prune it to ``target`` of its MACs with HiAP,
    finalize, compare accuracy, MACs, parameters and CPU latency, and write report and plots to
    ``out_dir``."""
    from hiap_fx.app.artifacts import write_outputs
    from hiap_fx.config import PruneConfig
    from hiap_fx.training.prune import prune

    started = time.perf_counter()
    train = fashion_mnist(True, download=True)
    test_loader = DataLoader(fashion_mnist(False, download=True), batch_size=500)
    t0 = time.perf_counter()
    dense, _, cached = dense_fashion_mnist_vit(progress=progress)
    dense_seconds = time.perf_counter() - t0
    loader = DataLoader(train, batch_size=batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(0))
    steps = max(1, int(prune_epochs * len(loader)))
    config = PruneConfig(target_macs=target, lr=lr)
    result = prune(dense, loader, config, steps=steps, eval_data=test_loader, progress=progress)
    write_outputs(result.report, result.compact, result.prepared.plan, out_dir)
    bench = bench_models(dense, result.compact, train[0][0][None], [1, 256], seconds=bench_seconds)
    out = DemoResult(report=result.report, bench=bench, dense_training_seconds=dense_seconds,
                     dense_cached=cached, total_seconds=time.perf_counter() - started)
    write_text(Path(out_dir, "demo.json"), out.model_dump_json(indent=2))
    return out


def format_demo(result: DemoResult, out_dir: str) -> str:
    """The demo's summary table (markdown)."""
    r, b = result.report, result.bench
    lat = {row.batch: row for row in b.rows}
    lines = [
        f"HiAP on a Fashion-MNIST ViT ({r.model}, 6 blocks, width 64, 4 heads): target "
        f"{100 * (r.target_macs or 1):.0f}% of dense MACs, {r.steps} training steps ({r.seconds:.0f} s): "
        + (f"{r.steps - r.finetune_steps} of gated search, then {r.finetune_steps} of recovery "
           f"fine-tune (accuracy before it {100 * (r.accuracy_before_finetune or 0):.2f}%)"
           if r.finetune_steps else "one phase, no fine-tuning"),
        "",
        "| | dense | compact |",
        "|---|---:|---:|",
        f"| test accuracy | {100 * (r.dense_accuracy or 0):.2f}% | {100 * (r.compact_accuracy or 0):.2f}% |",
        f"| MACs / image | {r.dense_macs:,} | {r.compact_macs:,} ({100 * r.kept_ratio:.1f}%) |",
        f"| parameters | {r.dense_params:,} | {r.compact_params:,} |",
    ]
    for batch, row in lat.items():
        lines.append(f"| CPU latency, batch {batch} ({b.threads} threads) | {row.dense_ms:.2f} ms | "
                     f"{row.compact_ms:.2f} ms ({row.speedup:.2f}x) |")
    lines += ["", f"removed sub-layers: {', '.join(r.removed_sublayers) or 'none'}",
              f"report, plots and compact model in {out_dir}/ (report.md, structure.png, history.png, "
              "compact.pt)",
              f"dense model {'reused from cache' if result.dense_cached else 'trained'} "
              f"({result.dense_training_seconds:.0f} s); total {result.total_seconds:.0f} s"]
    return "\n".join(lines)
