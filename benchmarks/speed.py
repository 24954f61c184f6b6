"""Does the MAC cut turn into CPU speed? Compact vs dense latency (medians of interleaved runs,
eval, inference mode) as a ratio to the MAC ratio:

- DeiT-Small and ViT-B/16 (random weights, 224 px) pruned to 50% MACs with HiAP-shaped,
  heterogeneous decisions (random gate logits landed on the budget by land_on_budget: heads of
  different widths, different neuron counts per layer), side by side with Torch-Pruning's model of
  the same MACs (its ViT recipe, benchmarks/baselines.py), all three timed in one interleaved
  run, at batch 1 and 8; plus prepare and finalize time. (The Fashion-MNIST frontier models are
  timed by ``benchmarks/frontier.py --latency``.)

    python benchmarks/speed.py                        # everything, ~10 s per batch size and model
    python benchmarks/speed.py --models deit_tiny_patch16_224 --seconds 2
    python benchmarks/speed.py --quick                # DeiT-Tiny only, 2 s
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

import hiap_fx
from hiap_fx.app.bench import bench_models, interleaved_medians
from hiap_fx.gated.budget import land_on_budget
from hiap_fx.graph.counting import count_macs

RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(Path(__file__).resolve().parent))  # baselines.py


def rows_for(name: str, dense, compact, x, seconds: float, batches=(1, 32)) -> list[str]:
    rep = bench_models(dense, compact, x, list(batches), seconds)
    mac_ratio = rep.dense_macs / max(rep.compact_macs, 1)
    return [f"| {name} | {100 / mac_ratio:.1f}% | {r.batch} | {r.dense_ms:.2f} | {r.compact_ms:.2f} | "
            f"{r.speedup:.2f}x | {r.speedup / mac_ratio:.2f} |" for r in rep.rows]


def peer_rows(name: str, dense, x, target: float, seconds: float, batches=(1, 8)) -> tuple[list[str], str]:
    """HiAP-shaped compact model and Torch-Pruning's model of the same MACs, timed against the
    dense model in one interleaved run per batch size."""
    from baselines import torch_pruning_vit

    compact, t_prep, t_fin = hiap_shaped(dense, x, target)
    dense_macs = count_macs(dense, x)
    hiap_macs = count_macs(compact, x)
    peer = torch_pruning_vit(dense, x, hiap_macs / dense_macs)
    peer_macs = count_macs(peer, x)
    lines = []
    for batch in batches:
        td, th, tp = interleaved_medians([dense, compact, peer], x, batch, seconds)
        for method, t, macs in (("hiap_fx (HiAP-shaped)", th, hiap_macs), ("Torch-Pruning", tp, peer_macs)):
            ratio = dense_macs / macs
            lines.append(f"| {name} | {method} | {100 / ratio:.1f}% | {batch} | {1e3 * td:.1f} | "
                         f"{1e3 * t:.1f} | {td / t:.2f}x | {td / t / ratio:.2f} |")
            print(lines[-1], flush=True)
    return lines, f"| {name} | {t_prep:.2f} | {t_fin:.2f} |"


def draw_hiap_shaped(prepared, target: float, seed: int) -> None:
    """Random gate logits (heterogeneous heads, widths and neuron counts) landed on ``target`` of
    the prepared model's budgeted cost (MACs, or latency with cost="latency")."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in prepared.gate_modules().values():
            gate.logits.copy_(torch.randn(gate.logits.shape, generator=g) * 2 + 2)
    land_on_budget(prepared, target, 0.005)


def hiap_shaped(model, x: torch.Tensor, target: float, seed: int = 0):
    """Prepare, draw heterogeneous gate logits, land them on ``target``, finalize; with timings."""
    t0 = time.perf_counter()
    prepared = hiap_fx.prepare(model, x).eval()
    t_prepare = time.perf_counter() - t0
    draw_hiap_shaped(prepared, target, seed)
    t0 = time.perf_counter()
    compact = hiap_fx.finalize(prepared)
    return compact, t_prepare, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seconds", type=float)
    ap.add_argument("--models", nargs="+")
    args = ap.parse_args()
    seconds = args.seconds or (2.0 if args.quick else 10.0)
    models = args.models or (["deit_tiny_patch16_224"] if args.quick
                             else ["deit_small_patch16_224", "vit_base_patch16_224"])
    peers = ["| model | method | MACs kept | batch | dense ms | compact ms | speedup | speedup / MAC ratio |",
             "|---|---|---|---|---|---|---|---|"]
    timing = ["| model | prepare s | finalize s (incl. verification) |", "|---|---|---|"]
    if models:
        import timm

        for name in models:
            torch.manual_seed(0)
            model = timm.create_model(name, pretrained=False).eval()
            x = torch.randn(1, *model.pretrained_cfg["input_size"])
            lines, times = peer_rows(name, model, x, 0.5, seconds)
            peers += lines
            timing.append(times)
    print(f"\nmachine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}\n")
    for table in (peers, timing):
        if len(table) > 2:
            print("\n".join(table) + "\n")


if __name__ == "__main__":
    main()
