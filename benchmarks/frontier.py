"""The accuracy frontier: HiAP against the baselines at 50% and 30% of dense MACs, on two
Fashion-MNIST ViTs (the demo's 6-block ViT at patch 7, 17 tokens, and at patch 4, 50 tokens,
where attention is a larger share), each from its converged teacher (benchmarks/teachers.py).

Every method gets the same number of training steps from the same teacher with the same loss
(0.3 CE + 0.7 T^2 KL, T = 4, AdamW, lr 5e-4 cosine): HiAP searches with gates and then (by
default) fine-tunes the finalized model inside the same steps; the baselines cut once at step 0
and fine-tune for all of them (``hiap_fx.training.recovery``).

    python benchmarks/frontier.py                        # everything (resumable)
    python benchmarks/frontier.py --threads 1 &  python benchmarks/frontier.py --threads 1   # 2 workers
    python benchmarks/frontier.py --report --latency     # tables, plots, CPU latency of seed-0 models
    python benchmarks/frontier.py --quick --out /tmp/f   # CI smoke: tiny teacher, 12 steps

Each finished run is cached as one JSON file under benchmarks/results/frontier/p<patch>/ (a run
whose file exists, with the same resolved config, is not trained again; ``--rerun`` forces it), so
an interrupted benchmark continues where it stopped, and several workers share the runs (each
claims one with a lock file; benchmarks/claims.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

sys.path.insert(0, str(Path(__file__).resolve().parent))

import baselines  # noqa: E402
from claims import claim, release  # noqa: E402

import hiap_fx  # noqa: E402
from hiap_fx.app.data import fashion_mnist  # noqa: E402
from hiap_fx.files.atomic import write_text, write_with  # noqa: E402
from hiap_fx.training.classify import evaluate  # noqa: E402
from hiap_fx.training.recovery import endless, recovery_finetune  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = (0.5, 0.3)
PATCHES = (7, 4)
LR = 5e-4
STEPS = 468  # one epoch of Fashion-MNIST at batch 128
#: HiAP variants: config overrides of the library defaults ("HiAP" is the defaults themselves)
#: the ablations vary one knob each from this base (the default before the FT ablation moved
#: finetune_fraction from 0.3 to 0.5)
ABLATION_BASE: dict[str, Any] = {"importance_init": 2.0, "finetune_fraction": 0.3}
HIAP: dict[str, dict[str, Any]] = {
    "HiAP": {},
    "HiAP one phase (paper)": {"importance_init": 0.0, "finetune_fraction": 0.0},
    **{name: {**ABLATION_BASE, **change} for name, change in {
        "HiAP ablation base (FT 30%)": {},
        "HiAP FT 50%": {"finetune_fraction": 0.5},
        "HiAP FT 70%": {"finetune_fraction": 0.7},
        "HiAP no recovery FT": {"finetune_fraction": 0.0},
        "HiAP no importance init": {"importance_init": 0.0},
        "HiAP importance 4": {"importance_init": 4.0},
        "HiAP ramp 0.3": {"budget_ramp": 0.3},
        "HiAP gate lr 0.3": {"gate_lr": 0.3},
        "HiAP alpha 0.3": {"alpha": 0.3},
        "HiAP macro only": {"head_dims": False, "neurons": False},
        "HiAP micro only": {"heads": False, "ffn_blocks": False},
        "HiAP lambda 5:1": {"lambda_macro": 5.0},
    }.items()},
}
#: HiAP steering CPU latency (batch 64) to the measured latency of the best baseline at the same MAC
#: budget (its seed-0 model / the dense teacher, ``latency_p<patch>.json``): the two meet at equal
#: latency. Calibration times this machine: run it on an idle machine (cached afterwards).
MATCHED = "HiAP latency-matched"
LATENCY_BATCH = 64
HIAP[MATCHED] = {"cost": "latency", "latency_batch": LATENCY_BATCH}
BASELINES: dict[str, Callable[[nn.Module, torch.Tensor, float, int], nn.Module]] = {
    "uniform + FT": lambda d, x, t, s: baselines.uniform_structured(d, x, t),
    "L1 FFN + FT": lambda d, x, t, s: baselines.l1_ffn(d, x, t),
    "L1 global + FT": lambda d, x, t, s: baselines.l1_global(d, x, t),
    "Torch-Pruning + FT": lambda d, x, t, s: baselines.torch_pruning_vit(d, x, t),
    "random + FT": lambda d, x, t, s: baselines.random_structured(d, x, t, seed=s),
}
MAIN = ("HiAP", *BASELINES)
ABLATIONS = tuple(m for m in HIAP if m != "HiAP")


def slug(method: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in method.lower()).strip("_")


def hiap_config(method: str, target: float, seed: int, matched: Optional[float] = None) -> hiap_fx.PruneConfig:
    """The config of a HiAP variant at MAC budget ``target`` (the latency-matched one steers to
    the latency fraction ``matched`` instead)."""
    if method == MATCHED:
        return hiap_fx.PruneConfig(target_macs=None, target_latency=matched, lr=LR, seed=seed, **HIAP[method])
    return hiap_fx.PruneConfig(target_macs=target, lr=LR, seed=seed, **HIAP[method])


def matched_target(out: Path, patch: int, target: float) -> Optional[tuple[str, float]]:
    """(best baseline by mean accuracy at ``target``, its measured latency fraction), or None
    while either is not there yet."""
    rows = [r for r in rows_of(out) if r["patch"] == patch]
    means = {m: statistics.mean(r["accuracy"] for r in sel) for m in BASELINES
             if (sel := select(rows, patch, m, target))}
    store = out / f"latency_p{patch}.json"
    if not means or not store.exists():
        return None
    best = max(means, key=means.__getitem__)
    latency = json.loads(store.read_text()).get(f"{slug(best)}_{round(100 * target)}")
    return (best, latency) if latency else None


def run_one(method: str, target: float, seed: int, dense: nn.Module, train: DataLoader,
            test: DataLoader, steps: int, matched: Optional[float] = None) -> tuple[dict, Optional[nn.Module]]:
    """Train one method to one target from ``dense`` in ``steps`` steps; its result row and model
    (None, with the reason in the row, when the method cannot reach the target)."""
    example = next(iter(train))[0][:2]
    x1 = example[:1]
    t0 = time.perf_counter()
    row: dict[str, Any] = {"method": method, "target": target, "seed": seed, "steps": steps}
    if method in HIAP:
        cfg = hiap_config(method, target, seed, matched)
        row["config"] = cfg.model_dump()
        result = hiap_fx.prune(dense, train, cfg, steps=steps, eval_data=test, eval_every=steps,
                               progress=False)
        model = result.compact
        row["accuracy_before_finetune"] = result.report.accuracy_before_finetune
        row["finetune_steps"] = result.report.finetune_steps
        row["sites"] = [s.model_dump() for s in result.report.sites]
        row["history"] = [h.model_dump() for h in result.report.history]
    else:
        try:
            model = BASELINES[method](dense, example, target, seed)
        except baselines.Unreachable as exc:
            return {**row, "unreachable": str(exc)}, None
        row["accuracy_before_finetune"] = evaluate(model, test)
        row["finetune_steps"] = steps
        torch.manual_seed(seed)
        recovery_finetune(model, endless(train), steps, hiap_fx.PruneConfig(lr=LR, seed=seed), dense)
    row["seconds"] = time.perf_counter() - t0
    row["macs_ratio"] = hiap_fx.count_macs(model, x1) / hiap_fx.count_macs(dense, x1)
    row["params"] = sum(p.numel() for p in model.parameters())
    row["accuracy"] = evaluate(model, test)
    return row, model


# ---------------------------------------------------------------------------------------------
# data and teachers


def loaders(quick: bool) -> tuple[DataLoader, DataLoader]:
    train_set, test_set = fashion_mnist(True, download=True), fashion_mnist(False, download=True)
    if quick:
        train_set, test_set = Subset(train_set, range(2048)), Subset(test_set, range(1000))
    train = DataLoader(train_set, batch_size=128, shuffle=True, drop_last=True,
                       generator=torch.Generator().manual_seed(0))
    return train, DataLoader(test_set, batch_size=500)


def teacher(patch: int, quick: bool, train: DataLoader) -> tuple[nn.Module, dict]:
    """The converged teacher (cached), or for ``--quick`` a one-epoch model of a data subset."""
    if not quick:
        from teachers import converged_teacher

        return converged_teacher(patch)
    from hiap_fx.app.demo import demo_model
    from hiap_fx.training.classify import train_classifier

    torch.manual_seed(0)
    model = train_classifier(demo_model(patch_size=patch), train, epochs=1, progress=False)
    return model, {"recipe": "quick: 1 epoch of 2048 images"}


# ---------------------------------------------------------------------------------------------
# the table, the significance note, the plots


def rows_of(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("p*/*.json"))]


def stats(values: Sequence[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def select(rows: list[dict], patch: int, method: str, target: float) -> list[dict]:
    return [r for r in rows if r["patch"] == patch and r["method"] == method and r["target"] == target
            and "unreachable" not in r]


def unreachable(rows: list[dict], patch: int, method: str, target: float) -> Optional[str]:
    return next((r["unreachable"] for r in rows if r["patch"] == patch and r["method"] == method
                 and r["target"] == target and "unreachable" in r), None)


def table(rows: list[dict], patch: int, target: float, dense_acc: float,
          latency: dict[str, float]) -> list[str]:
    lines = [f"**patch {patch}, {100 * target:.0f}% of dense MACs kept** (teacher {100 * dense_acc:.2f}%)", "",
             "| method | accuracy % (mean ± std) | before FT % | MACs kept | latency (batch 64) | seeds |",
             "|---|---|---|---|---|---|"]
    for method in [*MAIN, *ABLATIONS]:
        sel = select(rows, patch, method, target)
        why = unreachable(rows, patch, method, target)
        if why:
            lines.append(f"| {method} | {why} | | | | |")
        if not sel:
            continue
        mean, std = stats([100 * r["accuracy"] for r in sel])
        before = [100 * r["accuracy_before_finetune"] for r in sel if r.get("accuracy_before_finetune") is not None]
        macs = statistics.mean(100 * r["macs_ratio"] for r in sel)
        lat = latency.get(f"{slug(method)}_{round(100 * target)}")
        label = method
        if method == MATCHED and sel[0].get("matched"):
            m = sel[0]["matched"]
            label = f"{method} (to {m['baseline']}: {100 * m['latency']:.0f}%)"
        lines.append(f"| {label} | {mean:.2f} ± {std:.2f} | "
                     f"{f'{statistics.mean(before):.2f}' if before else '-'} | {macs:.1f}% | "
                     f"{f'{100 * lat:.0f}%' if lat else '-'} | {len(sel)} |")
    return lines + [""]


def matched_note(rows: list[dict], patch: int, target: float) -> Optional[str]:
    """HiAP steering latency against the baseline whose measured latency it was given."""
    ours = select(rows, patch, MATCHED, target)
    if not ours or not ours[0].get("matched"):
        return None
    base = ours[0]["matched"]["baseline"]
    mine, theirs = [100 * r["accuracy"] for r in ours], [100 * r["accuracy"] for r in select(rows, patch, base, target)]
    (a, sa), (b, sb) = stats(mine), stats(theirs)
    return (f"- patch {patch}, at the latency of {base} ({100 * ours[0]['matched']['latency']:.0f}% of dense, "
            f"{100 * target:.0f}% MACs budget): HiAP steering latency {a:.2f} ± {sa:.2f}% vs {b:.2f} ± {sb:.2f}% "
            f"({a - b:+.2f} pp; {len(mine)} vs {len(theirs)} seeds).")


def significance(rows: list[dict], patch: int, target: float) -> Optional[str]:
    """HiAP's mean against the best baseline's: the difference in units of the pooled std."""
    ours = [100 * r["accuracy"] for r in select(rows, patch, "HiAP", target)]
    others = {m: [100 * r["accuracy"] for r in select(rows, patch, m, target)] for m in BASELINES}
    others = {m: v for m, v in others.items() if v}
    if len(ours) < 2 or not others:
        return None
    best = max(others, key=lambda m: statistics.mean(others[m]))
    theirs = others[best]
    diff = statistics.mean(ours) - statistics.mean(theirs)
    pooled = ((statistics.variance(ours) + (statistics.variance(theirs) if len(theirs) > 1 else 0.0)) / 2) ** 0.5
    verdict = "more than" if abs(diff) > pooled else "within"
    return (f"- patch {patch}, {100 * target:.0f}% MACs: HiAP {diff:+.2f} pp vs the best baseline "
            f"({best}); pooled std {pooled:.2f} pp, so the difference is {verdict} one pooled std "
            f"({abs(diff) / pooled if pooled else float('inf'):.1f}x; {len(ours)} vs {len(theirs)} seeds).")


def findings(rows: list[dict], patch: int, target: float) -> Optional[str]:
    """The paper's structural findings, checked on the HiAP runs: how early heads and neurons
    close, how different the FFN widths end across depth, how many sub-layers go."""
    sel = [r for r in select(rows, patch, "HiAP", target) if r.get("history")]
    if not sel:
        return None
    early_heads, early_neurons, removed, spread = [], [], [], []
    for r in sel:
        h = r["history"]
        first, last, quarter = h[0], h[-1], h[max(0, len(h) // 4 - 1)]
        if first["heads_kept"] > last["heads_kept"]:
            early_heads.append((first["heads_kept"] - quarter["heads_kept"]) / (first["heads_kept"] - last["heads_kept"]))
        if first["neurons_kept"] > last["neurons_kept"]:
            early_neurons.append((first["neurons_kept"] - quarter["neurons_kept"])
                                 / (first["neurons_kept"] - last["neurons_kept"]))
        kept = [s["neurons_kept"] / s["neurons"] for s in r["sites"] if s["kind"] == "ffn" and s["neurons"]]
        spread.append(max(kept) - min(kept) if kept else 0.0)
        removed.append(sum(s["removed"] for s in r["sites"]))

    def avg(v: list[float]) -> str:
        return f"{100 * statistics.mean(v):.0f}%" if v else "n/a"
    return (f"- patch {patch}, {100 * target:.0f}% MACs: a quarter into the search, {avg(early_heads)} of "
            f"the final head reduction and {avg(early_neurons)} of the neuron reduction were done; "
            f"kept-neuron fraction spread across depth {avg(spread)}; sub-layers removed per run "
            f"{statistics.mean(removed):.1f}.")


def plot(rows: list[dict], teachers: dict[int, float], latency: dict[int, dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    patches = sorted({r["patch"] for r in rows}, reverse=True)
    with_latency = any(latency.get(p) for p in patches)
    fig, axes = plt.subplots(len(patches), 2 if with_latency else 1, squeeze=False,
                             figsize=(12 if with_latency else 7, 4 * len(patches)), constrained_layout=True)
    for i, patch in enumerate(patches):
        for j, (xlabel, xof) in enumerate([("% of dense MACs kept", lambda m, t, sel: statistics.mean(
                                               100 * r["macs_ratio"] for r in sel)),
                                           ("% of dense CPU latency (batch 64)", lambda m, t, sel: 100 * latency.get(
                                               patch, {}).get(f"{slug(m)}_{round(100 * t)}", float("nan")))]
                                          [: 2 if with_latency else 1]):
            ax = axes[i][j]
            for method in MAIN + ("HiAP one phase (paper)",):
                pts = []
                for target in TARGETS:
                    sel = select(rows, patch, method, target)
                    if sel:
                        mean, std = stats([100 * r["accuracy"] for r in sel])
                        pts.append((xof(method, target, sel), mean, std))
                if pts:
                    xs, ys, es = zip(*pts)
                    style = "o-" if method == "HiAP" else ("^:" if method.startswith("HiAP") else "s--")
                    ax.errorbar(xs, ys, yerr=es, fmt=style, capsize=3, label=method)
            ax.axhline(100 * teachers[patch], color="grey", ls="--", lw=1, label="dense teacher")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("test accuracy %")
            ax.set_title(f"Fashion-MNIST ViT, patch {patch}")
            ax.legend(fontsize=7)
    write_with(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# latency of the saved seed-0 models


def measure_latency(out: Path, patch: int, dense: nn.Module, seconds: float) -> dict[str, float]:
    """Latency / dense latency at batch 64 of every saved seed-0 model of ``patch``, each timed
    interleaved with the dense teacher (cached in ``latency_p<patch>.json``)."""
    from hiap_fx.app.bench import interleaved_medians

    store = out / f"latency_p{patch}.json"
    done: dict[str, float] = json.loads(store.read_text()) if store.exists() else {}
    x = torch.randn(1, 1, 28, 28)
    for path in sorted((out / "models" / f"p{patch}").glob("*.pt")):
        if path.stem in done:
            continue
        # whole modules this script pickled on this machine (Torch-Pruning's are not graph
        # modules, so not hiap_fx.save files): trusted by construction
        model = torch.load(path, weights_only=False).eval()
        d, m = interleaved_medians([dense, model], x, 64, seconds)
        done[path.stem] = m / d
        write_text(store, json.dumps(done, indent=1))
    return done


# ---------------------------------------------------------------------------------------------


def planned(patch: int, methods: Sequence[str], seeds: Sequence[int], ablation_seeds: Sequence[int],
            ablation_targets: Sequence[float], targets: Sequence[float] = TARGETS) -> list[tuple]:
    """The runs of one model, seed by seed (so the first seed of every method comes first)."""
    runs = []
    for seed in sorted(set(seeds) | set(ablation_seeds)):
        for target in targets:
            for method in methods:
                if method in MAIN and seed in seeds or (seed in ablation_seeds and target in ablation_targets):
                    runs.append((patch, method, target, seed))
    return runs


def main(argv: Optional[Sequence[str]] = None) -> list[str]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CI smoke: patch 7, one seed, main methods, "
                    "12 steps, a one-epoch teacher on 2048 images")
    ap.add_argument("--patches", type=int, nargs="+", choices=PATCHES)
    ap.add_argument("--methods", nargs="+", choices=[*HIAP, *BASELINES])
    ap.add_argument("--seeds", type=int, nargs="+", help="seeds of the main methods (default 0 1 2)")
    ap.add_argument("--ablation-seeds", type=int, nargs="+", help="seeds of the HiAP ablations (default 0)")
    ap.add_argument("--ablation-patches", type=int, nargs="+", default=[7],
                    help="models the ablations run on (default: patch 7)")
    ap.add_argument("--targets", type=float, nargs="+", default=list(TARGETS), choices=TARGETS,
                    help="budgets to train, in this order (default: 0.5 0.3)")
    ap.add_argument("--ablation-targets", type=float, nargs="+", default=list(TARGETS),
                    choices=TARGETS, help="budgets the ablations run at (default: both)")
    ap.add_argument("--steps", type=int, help=f"training steps per run (default {STEPS}; quick 12)")
    ap.add_argument("--threads", type=int, help="torch threads (1 per shard when running 2 shards)")
    ap.add_argument("--rerun", action="store_true", help="train the selected runs again")
    ap.add_argument("--report", action="store_true", help="print the tables from the cache, train nothing")
    ap.add_argument("--latency", action="store_true", help="also time the seed-0 models (idle machine)")
    ap.add_argument("--out", type=Path, help="results folder (default benchmarks/results/frontier[_quick])")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or RESULTS / ("frontier_quick" if args.quick else "frontier")
    patches = args.patches or ([7] if args.quick else list(PATCHES))
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    ablation_seeds = args.ablation_seeds or [0]
    methods = args.methods or ([*MAIN] if args.quick else [*MAIN, *ABLATIONS])
    steps = args.steps or (12 if args.quick else STEPS)
    train, test = loaders(args.quick)
    teachers: dict[int, float] = {}
    latency: dict[int, dict[str, float]] = {}
    for patch in patches:
        dense, info = teacher(patch, args.quick, train)
        teachers[patch] = evaluate(dense, test)
        runs = planned(patch, [m for m in methods if patch in args.ablation_patches or m in MAIN],
                       seeds, ablation_seeds, args.ablation_targets, args.targets)
        for _, method, target, seed in runs:
            path = out / f"p{patch}" / f"{slug(method)}_{round(100 * target)}_s{seed}.json"
            cached = json.loads(path.read_text()) if path.exists() else None
            match = matched_target(out, patch, target) if method == MATCHED else None
            if method == MATCHED and match is None:
                if not args.report:
                    print(f"p{patch} {method} {100 * target:.0f}%: no baseline latency measured yet "
                          "(run --latency first)", flush=True)
                continue
            fresh = cached is not None and cached["steps"] == steps and (
                method not in HIAP or cached.get("config") == hiap_config(
                    method, target, seed, match[1] if match else None).model_dump())
            if args.report or (fresh and not args.rerun) or not claim(path):
                continue
            try:
                row, model = run_one(method, target, seed, dense, train, test, steps,
                                     match[1] if match else None)
                if match:
                    row["matched"] = {"baseline": match[0], "latency": match[1]}
            finally:
                release(path)
            row["patch"], row["teacher_accuracy"] = patch, teachers[patch]
            write_text(path, json.dumps(row))
            if model is None:
                print(f"p{patch} {method:24s} {100 * target:.0f}%: {row['unreachable']}", flush=True)
                continue
            if seed == 0:
                (out / "models" / f"p{patch}").mkdir(parents=True, exist_ok=True)
                write_with(out / "models" / f"p{patch}" / f"{slug(method)}_{round(100 * target)}.pt",
                           lambda tmp: torch.save(model, tmp))
            before = row["accuracy_before_finetune"]
            print(f"p{patch} {method:24s} {100 * target:.0f}% s{seed}: acc {100 * row['accuracy']:.2f}% "
                  f"(before FT {'-' if before is None else f'{100 * before:.2f}%'}) MACs "
                  f"{100 * row['macs_ratio']:.1f}% {row['seconds']:.0f} s", flush=True)
        if args.latency:
            latency[patch] = measure_latency(out, patch, dense, 1.0 if args.quick else 2.5)
    rows = [r for r in rows_of(out) if r["patch"] in teachers]
    lines: list[str] = []
    for patch in patches:
        for target in TARGETS:
            lines += table(rows, patch, target, teachers[patch], latency.get(patch, {}))
    lines += [s for s in (significance(rows, p, t) for p in patches for t in TARGETS) if s]
    lines += [s for s in (matched_note(rows, p, t) for p in patches for t in TARGETS) if s]
    lines += ["", *[s for s in (findings(rows, p, t) for p in patches for t in TARGETS) if s]]
    print("\n".join(lines))
    if rows:
        plot(rows, teachers, latency, out / "frontier.png")
    return lines


if __name__ == "__main__":
    main()
