"""Shared fixtures and helpers for the hiap_fx tests."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
# one share of the cores per xdist worker: oversubscribed OpenMP threads spin and make the many
# small ops of tiny models an order of magnitude slower
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))


def finalizes_exactly(prepared, x, xs, seed: int, p_off: float) -> torch.nn.Module:
    """Random decisions (``p_off`` of the units closed) finalize into a compact model equal to
    the hard-gated one on ``xs``, counting on ``x`` the MACs the cost model predicts."""
    from independent_macs import randomise_gates

    import hiap_fx

    randomise_gates(prepared, seed, p_off)
    compact = hiap_fx.finalize(prepared.eval())
    with torch.no_grad():
        assert_close_outputs(prepared(xs), compact(xs), rel=1e-4)
    assert hiap_fx.count_macs(compact, x) == prepared.hard_macs()
    return compact


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def assert_close_outputs(a, b, rel: float = 1e-5) -> None:
    """Outputs of the same structure hold the same tensors (max abs diff <= rel * max abs)."""
    from hiap_fx.passes.capture import outputs_match

    ok, err = outputs_match(a, b, rtol=rel)
    assert ok, f"outputs differ: relative error {err:.3e}"


def kernel_calls(compact: torch.nn.Module) -> int:
    """sdpa calls plus softmaxes (the manual kernel's) in a compact graph."""
    names = [str(getattr(n.target, "__name__", n.target)) for n in compact.graph.nodes
             if n.op in ("call_function", "call_method")]
    return sum(1 for t in names if "scaled_dot_product" in t or "softmax" in t)


def site_removed(prepared, site) -> bool:
    from hiap_fx.gated.decisions import Decisions

    return not Decisions(prepared.decisions()).live_heads(site)


@pytest.fixture(autouse=True)
def _latency_cache(tmp_path_factory, monkeypatch):
    """Latency calibrations go to a cache of this test session, not the user's home."""
    from hiap_fx.passes.latency.timing import CACHE_ENV

    monkeypatch.setenv(CACHE_ENV, str(tmp_path_factory.getbasetemp() / "hiap_fx_cache"))
