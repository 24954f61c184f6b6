"""The corrected MAC counter, and per-node MACs of the plan against it."""

from __future__ import annotations

import pytest
import timm
import torch
from zoo import FACTORIES, SpecViT, ViTSpec, example_input

import hiap_fx


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_deit_small_contract_number(fused):
    from timm.layers import set_fused_attn

    set_fused_attn(fused)
    try:
        model = timm.create_model("deit_small_patch16_224").eval()
    finally:
        set_fused_attn(True)
    assert hiap_fx.count_macs(model, torch.randn(1, 3, 224, 224)) == 4_598_882_304


def test_counter_equals_flopcounter_without_fused_cpu_attention():
    from torch.utils.flop_counter import FlopCounterMode

    model = SpecViT(ViTSpec(attn="manual")).eval()
    x = example_input(model, 2)
    with FlopCounterMode(display=False) as counter:
        model(x)
    assert hiap_fx.count_macs(model, x) == counter.get_total_flops() // 2 > 0


@pytest.mark.parametrize("name", ["tiny_vit_separate", "tiny_vit_functional", "tiny_vit_mha"])
def test_plan_total_macs_matches_counter_zoo(name):
    model = FACTORIES[name]()
    x = example_input(model, 1)
    prepared = hiap_fx.prepare(model, x)
    assert prepared.plan.total_macs == hiap_fx.count_macs(model, x)


@pytest.mark.parametrize("name,kwargs", [
    ("swin_tiny_patch4_window7_224", {}),
    ("eva02_tiny_patch14_224", dict(img_size=56)),
    ("pvt_v2_b0", {}),
])
def test_plan_total_macs_matches_counter_timm(name, kwargs):
    model = timm.create_model(name, **kwargs).eval()
    size = kwargs.get("img_size", 224)
    x = torch.randn(1, 3, size, size)
    assert hiap_fx.prepare(model, x).plan.total_macs == hiap_fx.count_macs(model, x)
