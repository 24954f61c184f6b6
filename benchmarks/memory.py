"""Memory and time of prepare + finalize on large ViTs (issue M): peak RSS beyond the user's own
model, per stage, as a multiple of the model's weight bytes, and the seconds of each stage.

Each model runs in a fresh process (its peak resident set is its own): the model is built with
random weights, then ``prepare`` (the stages' times come from the ``hiap_fx.timing`` logger),
then a random half of every gate's units is closed and ``finalize`` runs (verification on, as by
default). The peak resident set is reset before each stage (``/proc/self/clear_refs``), so each
stage's peak is its own; "beyond the model" subtracts the resident set after building the model.

    python benchmarks/memory.py                        # ViT-B, ViT-L, ViT-g (DINOv2), cached
    python benchmarks/memory.py --models vit_base_patch16_224 --img 224 --fresh
    python benchmarks/memory.py --report               # the markdown table from the cache

Results: ``benchmarks/results/memory/<model>.json`` (one file per model, written when it
finishes: an interrupted run resumes).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results" / "memory"
DEFAULT_MODELS = ["vit_base_patch16_224", "vit_large_patch16_224", "vit_giant_patch14_dinov2"]


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # resets VmHWM (the peak resident set) to the current resident set


def _trim() -> None:
    """Collect garbage and hand freed heap pages back to the system (glibc ``malloc_trim``), so
    the resident set counts live memory, not what the allocator keeps for reuse."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: the resident set may include freed pages
        pass


class _Timings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.seconds: dict[str, float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        stage, seconds = record.args  # type: ignore[misc]
        self.seconds[str(stage)] = self.seconds.get(str(stage), 0.0) + float(seconds)


def measure(name: str, img: int, p_off: float, threads: int) -> dict[str, Any]:
    """One model, in this process: peak RSS beyond the model and seconds per stage."""
    import timm
    import torch

    import hiap_fx
    from hiap_fx.app.coverage import randomise_gates

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    # warm up: libraries hiap_fx loads on first use (sympy, the tracer's caches) are not a cost
    # of the model; a tiny ViT through prepare and finalize loads them before the baseline
    tiny = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=16).eval()
    warm = hiap_fx.prepare(tiny, torch.randn(1, 3, 32, 32), hiap_fx.PruneConfig(target_macs=None))
    randomise_gates(warm, seed=0, p_off=p_off)
    hiap_fx.finalize(warm.eval())
    del tiny, warm
    kwargs = {"img_size": img} if img else {}
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    size = model.pretrained_cfg["input_size"][1:] if not img else (img, img)
    x = torch.randn(1, 3, *size)
    weights = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    _trim()
    base = _status_kib("VmRSS")
    timings = _Timings()
    logger = logging.getLogger("hiap_fx.timing")
    logger.addHandler(timings)
    logger.setLevel(logging.DEBUG)

    _reset_peak()
    t0 = time.perf_counter()
    prepared = hiap_fx.prepare(model, x, hiap_fx.PruneConfig(target_macs=None))
    prepare_s = time.perf_counter() - t0
    prepare_peak = _status_kib("VmHWM") - base
    prepare_stages = dict(timings.seconds)
    timings.seconds.clear()
    randomise_gates(prepared, seed=0, p_off=p_off)
    _trim()
    held = _status_kib("VmRSS") - base  # the prepared model between the stages

    _reset_peak()
    t0 = time.perf_counter()
    compact = hiap_fx.finalize(prepared.eval())
    finalize_s = time.perf_counter() - t0
    finalize_peak = _status_kib("VmHWM") - base
    kept = sum(p.numel() * p.element_size() for p in compact.parameters())
    w = weights / 1024.0
    return {
        "model": name, "input": list(x.shape), "params_m": round(weights / 4 / 1e6, 1),
        "weights_mib": round(w / 1024.0, 1),
        "prepare_s": round(prepare_s, 2), "finalize_s": round(finalize_s, 2),
        "prepare_peak_x": round(prepare_peak / w, 2), "prepared_held_x": round(held / w, 2),
        "finalize_peak_x": round(finalize_peak / w, 2), "peak_x": round(max(prepare_peak, finalize_peak) / w, 2),
        "compact_weights_x": round(kept / weights, 2),
        "prepare_stages_s": {k: round(v, 2) for k, v in prepare_stages.items()},
        "finalize_stages_s": {k: round(v, 2) for k, v in timings.seconds.items()},
        "threads": threads, "torch": torch.__version__, "machine": platform.machine(),
        "cpus": os.cpu_count(),
    }


def run_isolated(name: str, img: int, p_off: float, threads: int, timeout: float,
                 src: str = "") -> dict[str, Any]:
    """:func:`measure` in a fresh process; ``src``: a directory whose ``hiap_fx`` is measured
    instead of this checkout's (another commit, for a before/after in the same run)."""
    cmd = [sys.executable, __file__, "--one", name, "--img", str(img), "--p-off", str(p_off),
           "--threads", str(threads)]
    env = dict(os.environ, PYTHONPATH=os.path.abspath(src)) if src else None
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"model": name, "error": f"exit {done.returncode}: {tail[:300]}"}
    return json.loads(lines[-1])


def report(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | weights MiB | prepare s | finalize s | prepare peak (x weights) | "
             "held between (x) | finalize peak (x) | compact (x) |", "|" + "---|" * 8]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | error: {r['error']} |" + " |" * 6)
            continue
        lines.append(f"| {r['model']} | {r['weights_mib']:,.0f} | {r['prepare_s']:.1f} | {r['finalize_s']:.1f} | "
                     f"{r['prepare_peak_x']:.2f} | {r['prepared_held_x']:.2f} | {r['finalize_peak_x']:.2f} | "
                     f"{r['compact_weights_x']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    ap.add_argument("--img", type=int, default=0, help="image size (0: the model's own)")
    ap.add_argument("--p-off", type=float, default=0.5, help="share of every gate's units closed")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=3600.0)
    ap.add_argument("--fresh", action="store_true", help="measure again even if cached")
    ap.add_argument("--report", action="store_true", help="print the table from the cache only")
    ap.add_argument("--src", default="", help="measure the hiap_fx of this directory (e.g. a git "
                    "worktree of an older commit) instead of this checkout's")
    ap.add_argument("--label", default="", help="cache subdirectory for these results (with --src)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.img, args.p_off, args.threads)), flush=True)
        return
    from hiap_fx.files.atomic import write_text

    results = RESULTS / args.label if args.label else RESULTS
    results.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.models:
        path = results / f"{name}.json"
        if path.exists() and not args.fresh or args.report:
            if path.exists():
                rows.append(json.loads(path.read_text()))
            continue
        row = run_isolated(name, args.img, args.p_off, args.threads, args.timeout, args.src)
        if "error" not in row:
            write_text(path, json.dumps(row, indent=1) + "\n")
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(report(rows))


if __name__ == "__main__":
    main()
