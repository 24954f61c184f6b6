"""Gates and the symbolic cost model on the models of the discovery tests.

For every model: dense MACs equal the corrected counter on the original model; with every gate
on, the prepared model reproduces the original output and hard MACs equal dense MACs; the
expected MACs have a non-zero gradient for every gate; for random hard decisions (including ones
that close whole sub-layers) the cost model agrees with an independent count of the selected
sub-network and with the counted MACs of the finalized compact model, whose output equals eval
mode at another batch size too.
"""

from __future__ import annotations

import pytest
import timm
import torch
import transformers
from conftest import assert_close_outputs
from independent_macs import independent_macs, randomise_gates
from zoo import FACTORIES, example_input

import hiap_fx


def _hf(arch: str):
    cfg = getattr(transformers, f"{arch}Config")(
        image_size=32, patch_size=8, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=96, num_labels=5)
    return getattr(transformers, f"{arch}ForImageClassification")(cfg).eval(), torch.randn(2, 3, 32, 32)


def _torchvision():
    from torchvision.models import VisionTransformer

    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64,
                              mlp_dim=128, num_classes=7).eval()
    return model, torch.randn(2, 3, 32, 32)


def _timm(name: str, size: int, **kwargs):
    return timm.create_model(name, **kwargs).eval(), torch.randn(2, 3, size, size)


def _eva(fused: bool):
    from timm.layers import set_fused_attn

    set_fused_attn(fused)
    try:
        return _timm("eva02_tiny_patch14_224", 56, img_size=56, depth=2)
    finally:
        set_fused_attn(True)


MODELS = {
    "deit_tiny": lambda: _timm("deit_tiny_patch16_224", 64, img_size=64, depth=3),
    "deit_small": lambda: _timm("deit_small_patch16_224", 64, img_size=64, depth=2),
    "vit_small": lambda: _timm("vit_small_patch16_224", 64, img_size=64, depth=2),
    "vit_base": lambda: _timm("vit_base_patch16_224", 64, img_size=64, depth=2),
    "eva02_fused": lambda: _eva(True),
    "eva02_unfused": lambda: _eva(False),
    "beit": lambda: _timm("beit_base_patch16_224", 64, img_size=64, depth=2),
    "swin": lambda: _timm("swin_tiny_patch4_window7_224", 224, depths=(1, 1, 1, 1)),
    "pvt_v2": lambda: _timm("pvt_v2_b0", 64, depths=(1, 1, 1, 1)),
    "flexivit": lambda: _timm("flexivit_small", 64, img_size=64, depth=2),
    "vit_reg4": lambda: _timm("vit_medium_patch16_reg4_gap_256", 64, img_size=64, depth=2),
    "cait": lambda: _timm("cait_xxs24_224", 64, img_size=64, depth=2, depth_token_only=1),
    "swinv2_cpb": lambda: _timm("swinv2_tiny_window8_256", 256, depths=(1, 1, 1, 1)),
    "hf_vit": lambda: _hf("ViT"),
    "hf_deit": lambda: _hf("DeiT"),
    "torchvision_vit": _torchvision,
}
MODELS.update({f"zoo_{k}": (lambda f=f: (f(), example_input(f(), batch=2))) for k, f in FACTORIES.items()})


@pytest.mark.parametrize("name", sorted(MODELS))
def test_gated_model_and_cost(name):
    model, x = MODELS[name]()
    prepared = hiap_fx.prepare(model, x).eval()
    gates = prepared.gate_modules()
    assert gates, "no gates inserted"
    assert {g.kind for g in gates.values()} <= {"head", "head_dim", "qk_dim", "ffn", "neuron"}

    dense = hiap_fx.count_macs(model, x)
    assert prepared.dense_macs == dense
    assert prepared.hard_macs() == dense
    assert independent_macs(prepared) == dense
    x2 = torch.randn_like(x)
    with torch.no_grad():
        assert_close_outputs(model(x2), prepared(x2), rel=1e-6)

    expected = prepared.expected_macs()
    expected.backward()
    for key, gate in gates.items():
        assert gate.logits.grad is not None and bool((gate.logits.grad != 0).all()), key

    n_params = sum(p.numel() for p in model.parameters())
    for seed, p_off in [(0, 0.4), (1, 0.4), (2, 0.4), (3, 0.9)]:
        randomise_gates(prepared, seed, p_off)
        hard = prepared.hard_macs()
        assert hard == independent_macs(prepared), seed
        assert hard < dense
        compact = hiap_fx.finalize(prepared)  # verifies output and MACs on the example inputs
        assert hiap_fx.count_macs(compact, x) == hard
        assert sum(p.numel() for p in compact.parameters()) < n_params
        x3 = torch.randn(3, *x.shape[1:])  # another batch size
        with torch.no_grad():
            assert_close_outputs(prepared(x3), compact(x3), rel=1e-4)

