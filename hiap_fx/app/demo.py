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
from pydantic import BaseModel
from torch import nn
from torch.utils.data import DataLoader

from hiap_fx.app.bench import BenchReport, bench_models
from hiap_fx.app.data import fashion_mnist
from hiap_fx.files.atomic import write_text, write_with
from hiap_fx.training.classify import train_classifier
from hiap_fx.training.report import PruneReport

DEMO_ARCH: dict[str, Any] = dict(img_size=28, patch_size=7, in_chans=1, num_classes=10,
                                 embed_dim=64, depth=6, num_heads=4, mlp_ratio=4.0)
DEMO_DENSE_TRAINING: dict[str, Any] = dict(epochs=3, lr=1e-3, batch_size=128, seed=0)


def demo_model(**overrides: Any) -> nn.Module:
    """The demo's architecture: timm's ``VisionTransformer`` with 6 blocks of width 64, 4 heads,
    patch 7 on 28x28 grey images (17 tokens), 10 classes; random weights."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(**{**DEMO_ARCH, **overrides})


def cache_dir() -> Path:
    """Where trained dense models are cached (``$HIAP_CACHE`` or ``~/.cache/hiap_fx``)."""
    return Path(os.environ.get("HIAP_CACHE") or Path.home() / ".cache" / "hiap_fx")


def dense_fashion_mnist_vit(train_data: Optional[DataLoader] = None, progress: bool = True,
                            **arch: Any) -> tuple[nn.Module, Path, bool]:
    """The demo's dense model trained on Fashion-MNIST, loaded from the cache when a model of the
    same architecture, recipe and torch version was trained before; returns (model, cache file,
    whether it came from the cache)."""
    key = json.dumps({"arch": {**DEMO_ARCH, **arch}, "train": DEMO_DENSE_TRAINING,
                      "torch": torch.__version__.split("+")[0]}, sort_keys=True)
    path = cache_dir() / f"fmnist_vit_{hashlib.sha256(key.encode()).hexdigest()[:12]}.pt"
    model = demo_model(**arch)
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval(), path, True
    cfg = DEMO_DENSE_TRAINING
    if train_data is None:
        train_data = DataLoader(fashion_mnist(True, download=True), batch_size=cfg["batch_size"], shuffle=True,
                                drop_last=True, generator=torch.Generator().manual_seed(cfg["seed"]))
    torch.manual_seed(cfg["seed"])
    model = demo_model(**arch)
    train_classifier(model, train_data, epochs=cfg["epochs"], lr=cfg["lr"], seed=cfg["seed"],
                     progress=progress)
    write_with(path, lambda tmp: torch.save(model.state_dict(), tmp))
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
        f"{100 * (r.target_macs or 1):.0f}% of dense MACs, one training phase of {r.steps} steps "
        f"({r.seconds:.0f} s), no fine-tuning",
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
