"""Plots of a pruning report (matplotlib, written to files; no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Union

from hiap_fx.files.atomic import write_with
from hiap_fx.training.report import PruneReport


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_structure(report: PruneReport, path: Union[str, Path]) -> Path:
    """Per-layer kept fraction of heads, value dims (of live heads) and FFN neurons."""
    plt = _pyplot()
    attn = [s for s in report.sites if s.kind == "attention"]
    ffn = [s for s in report.sites if s.kind == "ffn"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), constrained_layout=True)
    ax = axes[0]
    xs = range(len(attn))
    heads = [(s.heads_kept or 0) / (s.heads or 1) for s in attn]
    dims = [(sum(s.head_dims_kept or []) / ((s.heads_kept or 1) * (s.head_dims or 1))) if s.heads_kept else 0.0
            for s in attn]
    width = 0.4
    ax.bar([x - width / 2 for x in xs], heads, width, label="heads kept")
    ax.bar([x + width / 2 for x in xs], dims, width, label="value dims kept (live heads)")
    ax.set_xticks(list(xs), [s.site for s in attn], rotation=60, ha="right", fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_title("attention")
    ax.legend(fontsize=8, loc="lower right")
    ax = axes[1]
    xs = range(len(ffn))
    ax.bar(list(xs), [(s.neurons_kept or 0) / (s.neurons or 1) for s in ffn], color="tab:green")
    ax.set_xticks(list(xs), [s.site for s in ffn], rotation=60, ha="right", fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_title("FFN neurons kept (0 = sub-layer removed)")
    fig.suptitle(f"{report.model}: {100 * report.kept_ratio:.1f}% of dense MACs kept")
    return _save(fig, path)


def plot_history(report: PruneReport, path: Union[str, Path]) -> Path:
    """MACs (expected and kept) and eval accuracy over training."""
    plt = _pyplot()
    h = report.history
    fig, ax = plt.subplots(figsize=(7, 3.8), constrained_layout=True)
    steps = [p.step for p in h]
    ax.plot(steps, [100 * p.expected_ratio for p in h], label="expected MACs %")
    ax.plot(steps, [100 * p.hard_ratio for p in h], label="kept MACs % (eval mode)")
    if report.target_macs is not None:
        ax.axhline(100 * report.target_macs, color="grey", ls="--", lw=1, label="target")
    ax.set_xlabel("step")
    ax.set_ylabel("% of dense MACs")
    ax.set_ylim(0, 105)
    acc = [(p.step, 100 * p.accuracy) for p in h if p.accuracy is not None]
    if acc:
        ax2 = ax.twinx()
        ax2.plot(*zip(*acc), "o-", color="tab:red", label="accuracy %")
        if report.dense_accuracy is not None:
            ax2.axhline(100 * report.dense_accuracy, color="tab:red", ls=":", lw=1, label="dense accuracy")
        ax2.set_ylabel("eval accuracy %")
        ax2.legend(loc="lower left", fontsize=8)
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title(f"{report.model}: HiAP training")
    return _save(fig, path)


def _save(fig, path: Union[str, Path]) -> Path:
    """Write ``fig`` to ``path`` atomically and close it."""
    path = Path(path)
    write_with(path, lambda tmp: fig.savefig(tmp, dpi=120))
    _pyplot().close(fig)
    return path
