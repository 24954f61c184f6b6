"""CI smoke test of the accuracy-frontier benchmark path (benchmarks/frontier.py --quick): every
kind of method trains, lands on both budgets, is cached per run and reprinted without training."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import frontier  # noqa: E402


@pytest.mark.slow
def test_quick_frontier_runs_caches_and_reports(tmp_path, monkeypatch):
    methods = ["HiAP", "HiAP one phase (paper)", "L1 global + FT", "random + FT"]
    lines = frontier.main(["--quick", "--out", str(tmp_path), "--methods", *methods, "--threads", "2"])
    rows = [json.loads(p.read_text()) for p in sorted((tmp_path / "p7").glob("*.json"))]
    assert {(r["method"], r["target"]) for r in rows} == {(m, t) for m in methods for t in frontier.TARGETS}
    for r in rows:
        assert abs(r["macs_ratio"] - r["target"]) <= 0.015, r
        assert 0.0 <= r["accuracy"] <= 1.0 and r["steps"] == 12
    assert (tmp_path / "frontier.png").stat().st_size > 0
    assert len(list((tmp_path / "models" / "p7").glob("*.pt"))) == len(rows)
    table = "\n".join(lines)
    assert all(f"| {m} |" in table for m in methods) and "30% of dense MACs kept" in table

    def no_training(*args, **kwargs):
        raise AssertionError("a cached run was trained again")

    monkeypatch.setattr(frontier, "run_one", no_training)
    again = frontier.main(["--quick", "--out", str(tmp_path), "--methods", *methods])
    assert again == lines
