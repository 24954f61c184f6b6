"""Timing on this machine: medians of ``torch.utils.benchmark`` block runs, in inference mode."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils import benchmark

CACHE_ENV = "HIAP_FX_CACHE_DIR"


def median_seconds(fn: Callable[[], Any], min_time: float = 0.05) -> float:
    """Median seconds of one call of ``fn`` (blocks of calls for at least ``min_time`` seconds
    after an estimation run that also warms up), with this process's thread count."""
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    with torch.inference_mode():
        return float(timer.blocked_autorange(min_run_time=min_time).median)


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
