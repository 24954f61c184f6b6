"""Index flow details that discovery relies on."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import finalizes_exactly
from torch import nn

import hiap_fx
from hiap_fx.graph.flow import SENTINEL, IndexFlow, feature_index
from hiap_fx.graph.ir import tensor_shape
from hiap_fx.passes.capture import capture
from hiap_fx.passes.normalise import normalise


class _PaddedKeys(nn.Module):
    """Keys and values padded with zero tokens after their projection (as halo blocks are)."""

    def __init__(self, dim: int = 12, heads: int = 3) -> None:
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        k, v = F.pad(k, (0, 0, 1, 2)), F.pad(v, (0, 0, 1, 2))
        o = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(o.transpose(1, 2).reshape(B, N, C))


def test_padding_holds_no_feature():
    """A pad's new positions carry the sentinel, not feature 0."""
    cg = normalise(capture(_PaddedKeys().eval(), torch.randn(1, 4, 12), frontend="fx"))
    lin = next(n for n in cg.gm.graph.nodes if n.op == "call_function" and "linear" in str(n.target))
    pads = [n for n in cg.gm.graph.nodes if "pad" in n.name]
    index = IndexFlow(cg).run({lin: feature_index(tensor_shape(lin), -1)}).index
    at = index[pads[0]]
    assert bool((at[:, :, 0] == SENTINEL).all()) and bool((at[:, :, -2:] == SENTINEL).all())
    assert bool((at[:, :, 1:-2] >= 0).all())


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_keys_padded_after_their_projection_are_cut_with_the_heads(frontend):
    torch.manual_seed(0)
    net = _PaddedKeys().eval()
    x = torch.randn(1, 4, 12)
    prepared = hiap_fx.prepare(net, x, hiap_fx.PruneConfig(target_macs=None, frontend=frontend))
    assert len(prepared.plan.attention) == 1, prepared.plan.unclaimed
    finalizes_exactly(prepared, x, torch.randn(3, 4, 12), seed=2, p_off=0.4)
