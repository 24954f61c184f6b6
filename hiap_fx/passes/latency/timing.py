"""Timing on this machine (medians of blocks of calls, in inference mode) and the calibration cache."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

CACHE_ENV = "HIAP_FX_CACHE_DIR"


def median_seconds(fn: Callable[[], Any], min_time: float = 0.02, min_blocks: int = 5) -> float:
    """Median seconds of one call of ``fn`` in inference mode: after two warm-up calls, blocks of
    calls (each about a millisecond or one call) are timed until ``min_time`` seconds and at least
    ``min_blocks`` blocks have passed. (``torch.utils.benchmark``'s autorange spends as long again
    estimating its block size, which doubles a calibration of many small ops.)"""
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()

    def run(n: int) -> float:
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    with torch.inference_mode():
        run(1)
        first = run(1)
        n = max(1, min(1000, int(1e-3 / max(first, 1e-7))))
        per_call: list[float] = []
        spent = 0.0
        while spent < min_time or len(per_call) < min_blocks:
            t = run(n)
            spent += t
            per_call.append(t / n)
    return statistics.median(per_call)


def alternating_medians(fns: list[Callable[[], Any]], rounds: int = 3, min_time: float = 0.2) -> list[float]:
    """Median over ``rounds`` of each function's median, the functions timed in turn each round so
    that drift of the machine hits all alike."""
    runs: list[list[float]] = [[] for _ in fns]
    for _ in range(rounds):
        for fn, r in zip(fns, runs):
            r.append(median_seconds(fn, min_time))
    return [statistics.median(r) for r in runs]


def machine_id(device: torch.device) -> str:
    """What a calibration is valid for: processor (or GPU), torch version and threads."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
    return f"{name}|{os.cpu_count()} cpus|torch {torch.__version__}|{torch.get_num_threads()} threads|{device.type}"


def cache_path(key: dict[str, Any]) -> Path:
    """The cache file of a calibration: ``$HIAP_FX_CACHE_DIR`` (default ``~/.cache/hiap_fx``)
    ``/latency/<sha256 of the key>.json``."""
    root = Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "hiap_fx"))
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return root / "latency" / f"{digest}.json"
