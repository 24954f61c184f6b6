"""The attention census behind the coverage run, its per-model cache and its summary."""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from torch import nn

from hiap_fx.app.census import count_attention_calls
from hiap_fx.app.coverage import attention_summary, run_coverage


class _Mixed(nn.Module):
    """One sdpa, one manual attention (with a learned temperature), a radix softmax over conv
    channels and a classifier softmax: two attention calls."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.temperature = nn.Parameter(torch.ones(1))
        self.conv = nn.Conv1d(8, 8, 1)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).reshape(x.shape[0], x.shape[1], 3, 2, 4).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v)
        attn = ((q @ k.transpose(-2, -1)) * self.temperature).softmax(dim=-1)
        b = attn @ v
        radix = self.conv(x.transpose(1, 2)).softmax(dim=1)  # over channels: not attention
        y = (a + b).transpose(1, 2).flatten(2) + radix.transpose(1, 2)
        return self.head(y.mean(1)).softmax(-1)


def test_census_counts_attention_calls_only():
    census = count_attention_calls(_Mixed().eval(), torch.randn(2, 5, 8))
    assert (census.sdpa, census.softmax, census.other_softmax) == (1, 1, 2)
    assert census.calls == 2


def test_attention_summary_counts_sited_calls_per_source():
    rows = [{"model": "a", "status": "ok", "calls": 10, "sited": 10},
            {"model": "b", "status": "ok", "calls": 4, "sited": 1, "reason": "q of matmul_3: why"},
            {"model": "c", "status": "refused", "calls": 6, "reason": "NoAttentionError: because"},
            {"model": "hf:D", "status": "ok", "calls": 2, "sited": 2},
            {"model": "e", "status": "skipped", "calls": 40},
            {"model": "f", "status": "ok", "calls": 0, "sited": 0}]
    text = "\n".join(attention_summary(rows))
    assert "| timm | 3 | 1 | 1 | 0 | 1 | 20 | 11 | 55.0% |" in text
    assert "| HF transformers | 1 | 1 | 0 | 0 | 0 | 2 | 2 | 100.0% |" in text
    assert "**59.1%**" in text  # 13 of 22 calls
    assert "1 models, 6 calls: NoAttentionError: because" in text


def test_cached_rows_are_reused_and_missing_ones_reported_pending(tmp_path):
    row = {"model": "m1", "status": "ok", "calls": 3, "sited": 3}
    (tmp_path / "m1.json").write_text(json.dumps(row))
    table = run_coverage(["m1", "m2"], cache_dir=str(tmp_path), cached_only=True)
    assert "| m1 | ok |" in table and "| m2 |" not in table
    assert "1 more not probed yet" in table
