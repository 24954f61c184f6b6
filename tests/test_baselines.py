"""The benchmark baselines (benchmarks/baselines.py) hit their MAC targets and stay usable."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import hiap_fx
from hiap_fx.training.recovery import endless, recovery_finetune

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import baselines  # noqa: E402


def _vit():
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=48,
                             depth=3, num_heads=4, mlp_ratio=4.0).eval()


@pytest.mark.parametrize("method", ["uniform_structured", "random_structured", "l1_ffn", "torch_pruning_vit"])
@pytest.mark.parametrize("target", [0.67, 0.5])
def test_baseline_hits_target_and_fine_tunes(method, target):
    dense = _vit()
    x = torch.randn(2, 1, 28, 28)
    pruned = getattr(baselines, method)(dense, x, target)
    ratio = hiap_fx.count_macs(pruned, x[:1]) / hiap_fx.count_macs(dense, x[:1])
    # Torch-Pruning cuts one uniform ratio everywhere (round_to=2): on a width-48 model it can
    # only come within a few points; the benchmark records the MACs each method really hit
    assert abs(ratio - target) <= (0.05 if method == "torch_pruning_vit" else 0.01), ratio
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in dense.parameters())
    data = [(torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))) for _ in range(3)]
    before = {k: v.clone() for k, v in pruned.state_dict().items()}
    recovery_finetune(pruned, endless(data), 4, hiap_fx.PruneConfig(lr=1e-3), dense)
    assert any(not torch.equal(before[k], v) for k, v in pruned.state_dict().items())
    assert torch.isfinite(pruned(x)).all()


def test_random_baseline_differs_from_l1_choice_at_the_same_macs():
    dense = _vit()
    x = torch.randn(2, 1, 28, 28)
    l1 = baselines.uniform_structured(dense, x, 0.5)
    rand = baselines.random_structured(dense, x, 0.5, seed=1)
    assert hiap_fx.count_macs(l1, x[:1]) == hiap_fx.count_macs(rand, x[:1])
    assert not torch.allclose(l1(x), rand(x))
