"""Products with one-hot constants are gathers (hiap_fx.passes.selections): the rewrite computes
the same values, and MaxViT-TF's one-hot relative-position lookups no longer hide the per-head
bias table, so its heads are cut exactly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import finalizes_exactly
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import hiap_fx
from hiap_fx.passes.capture import capture
from hiap_fx.passes.normalise import normalise


class _Lookup(nn.Module):
    """``einsum(equation, table, onehot)`` with a one-hot buffer (some rows select nothing)."""

    def __init__(self, equation: str, onehot: torch.Tensor, table_shape: tuple[int, ...], swap: bool) -> None:
        super().__init__()
        self.equation, self.swap = equation, swap
        self.register_buffer("onehot", onehot)
        self.table = nn.Parameter(torch.randn(table_shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pair = (self.onehot, self.table) if self.swap else (self.table, self.onehot)
        return x + torch.einsum(self.equation, *pair).sum()


@settings(max_examples=25, deadline=None, database=None)
@given(heads=st.integers(1, 3), vocab=st.integers(1, 5), length=st.integers(1, 4), swap=st.booleans(),
       permute=st.booleans(), seed=st.integers(0, 1000))
def test_a_one_hot_product_becomes_the_same_gather(heads, vocab, length, swap, permute, seed):
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randint(-1, vocab, (length, length), generator=gen)  # -1: selects nothing
    onehot = torch.zeros(length, length, vocab)
    for i in range(length):
        for j in range(length):
            if pick[i, j] >= 0:
                onehot[i, j, pick[i, j]] = 1.0
    out = "ixn" if permute else "nix"
    eq = f"ixh,nh->{out}" if swap else f"nh,ixh->{out}"
    net = _Lookup(eq, onehot, (heads, vocab), swap).eval()
    x = torch.randn(2, 3)
    cg = normalise(capture(net, x, frontend="fx"))
    assert "einsum" not in cg.gm.code and "hiap_selection" in cg.gm.code
    assert cg.macs_not_spent == heads * vocab * length * length
    with torch.no_grad():
        assert torch.allclose(cg.gm(x), net(x), atol=1e-5)


class _TfRelPosAttention(nn.Module):
    """MaxViT-TF's window attention bias: a (heads, 2w-1, 2w-1) table spread over the window by
    two einsums against one-hot lookups, added to the logits."""

    def __init__(self, dim: int = 12, heads: int = 3, window: int = 3) -> None:
        super().__init__()
        self.heads, self.window = heads, window
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.table = nn.Parameter(torch.randn(heads, 2 * window - 1, 2 * window - 1))
        lookup = torch.zeros(window, window, 2 * window - 1)
        for i in range(window):
            for j in range(window):
                lookup[i, j, j - i + window - 1] = 1.0
        self.register_buffer("lookup", lookup)
        self.fc1, self.fc2 = nn.Linear(dim, 24), nn.Linear(24, dim)

    def bias(self) -> torch.Tensor:
        t = torch.einsum("nhw,ixh->nixw", self.table, self.lookup)
        t = torch.einsum("nixw,jyw->nijxy", t, self.lookup)
        area = self.window * self.window
        return t.reshape(self.heads, area, area)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=self.bias())
        x = x + self.proj(o.transpose(1, 2).reshape(B, N, C))
        return x + self.fc2(F.gelu(self.fc1(x)))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_one_hot_relative_position_lookups_let_heads_be_cut(frontend):
    torch.manual_seed(0)
    net = _TfRelPosAttention().eval()
    x = torch.randn(1, 9, 12)
    prepared = hiap_fx.prepare(net, x, hiap_fx.PruneConfig(target_macs=None, frontend=frontend))
    assert len(prepared.plan.attention) == 1, prepared.plan.unclaimed
    site = prepared.plan.attention[0]
    assert any(s.kind == "head_bias" and s.param.endswith("table") for s in site.side)
    assert prepared.plan.macs_not_spent > 0
    finalizes_exactly(prepared, x, torch.randn(3, 9, 12), seed=3, p_off=0.4)
