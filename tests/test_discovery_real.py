"""Discovery on real model definitions (random init): timm, HuggingFace transformers, torchvision.

Expected structure is read from each model's own configuration, never from hiap_fx.
"""

from __future__ import annotations

import pytest
import timm
import torch
import transformers
from conftest import assert_close_outputs

import hiap_fx


def _timm_expected(model):
    heads, hidden = [], []
    for m in model.modules():
        if hasattr(m, "num_heads") and any(isinstance(c, torch.nn.Linear) for c in m.children()):
            head_dim = getattr(m, "head_dim", None)
            if head_dim is None and isinstance(getattr(m, "qkv", None), torch.nn.Linear):
                head_dim = m.qkv.out_features // (3 * m.num_heads)
            if head_dim is None and isinstance(getattr(m, "q", None), torch.nn.Linear):
                head_dim = m.q.out_features // m.num_heads
            heads.append((int(m.num_heads), int(head_dim)))
        fc1 = getattr(m, "fc1", None) or getattr(m, "fc1_g", None)
        if isinstance(fc1, torch.nn.Linear) and hasattr(m, "fc2"):
            hid = m.fc2.in_features
            hidden.append(hid)
    return heads, hidden


def _check(model, x, heads, hidden):
    prepared = hiap_fx.prepare(model, x)
    plan = prepared.plan
    assert [(s.num_heads, s.head_dim) for s in plan.attention] == heads
    assert [s.hidden for s in plan.ffn] == hidden
    assert all(s.residual is not None for s in plan.attention + plan.ffn)
    x2 = torch.randn(3, *x.shape[1:])
    with torch.no_grad():
        assert_close_outputs(model(x2), prepared(x2), rel=1e-5)
    return plan


TIMM_CASES = [
    ("deit_tiny_patch16_224", dict(img_size=64)),
    ("deit_small_patch16_224", dict(img_size=64)),
    ("vit_small_patch16_224", dict(img_size=64)),
    ("vit_base_patch16_224", dict(img_size=64, depth=4)),
    ("eva02_tiny_patch14_224", dict(img_size=56)),
    ("beit_base_patch16_224", dict(img_size=64, depth=3)),
    ("swin_tiny_patch4_window7_224", {}),
    ("pvt_v2_b0", {}),
    ("flexivit_small", dict(img_size=64)),
    ("vit_medium_patch16_reg4_gap_256", dict(img_size=64, depth=3)),
    ("cait_xxs24_224", dict(img_size=64, depth=3)),
]


@pytest.mark.parametrize("name,kwargs", TIMM_CASES, ids=[c[0] for c in TIMM_CASES])
def test_timm(name, kwargs):
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    size = kwargs.get("img_size", model.pretrained_cfg["input_size"][-1])
    heads, hidden = _timm_expected(model)
    _check(model, torch.randn(1, 3, size, size), heads, hidden)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_eva02_fused_and_unfused(fused):
    from timm.layers import set_fused_attn

    set_fused_attn(fused)
    try:
        model = timm.create_model("eva02_tiny_patch14_224", img_size=56, depth=2).eval()
    finally:
        set_fused_attn(True)
    assert model.blocks[0].attn.fused_attn is fused
    heads, hidden = _timm_expected(model)
    plan = _check(model, torch.randn(1, 3, 56, 56), heads, hidden)
    assert {s.kind for s in plan.attention} == {"sdpa" if fused else "manual"}
    assert all(s.gated for s in plan.ffn)
    assert all(s.q.dims_mixed and s.k.dims_mixed and not s.v.dims_mixed for s in plan.attention)


def test_relative_position_bias_is_a_side_tensor():
    model = timm.create_model("beit_base_patch16_224", img_size=64, depth=2).eval()
    plan = hiap_fx.prepare(model, torch.randn(1, 3, 64, 64)).plan
    side = plan.attention[0].side
    assert [(t.param, t.axis) for t in side] == [
        ("blocks.0.attn.relative_position_bias_table", 1)]


def test_talking_heads_are_side_tensors():
    model = timm.create_model("cait_xxs24_224", img_size=64, depth=2, depth_token_only=1).eval()
    plan = hiap_fx.prepare(model, torch.randn(1, 3, 64, 64)).plan
    kinds = {t.kind for t in plan.attention[0].side}
    assert kinds == {"head_mixing_in", "head_mixing_out"}


def test_kv_only_projection_pvt():
    model = timm.create_model("pvt_v2_b0").eval()
    plan = hiap_fx.prepare(model, torch.randn(1, 3, 224, 224)).plan
    site = plan.attention[0]
    assert site.k.node == site.v.node != site.q.node
    assert any(s.side for s in plan.ffn)  # the depthwise conv inside the FFN is cut with it


@pytest.mark.parametrize("arch", ["ViT", "DeiT"])
def test_huggingface(arch):
    cfg_cls = getattr(transformers, f"{arch}Config")
    cls = getattr(transformers, f"{arch}ForImageClassification")
    cfg = cfg_cls(image_size=32, patch_size=8, hidden_size=48, num_hidden_layers=2,
                  num_attention_heads=4, intermediate_size=96, num_labels=5)
    model = cls(cfg).eval()
    plan = _check(model, torch.randn(1, 3, 32, 32), [(4, 12)] * 2, [96] * 2)
    assert plan.frontend == "export"
    out = hiap_fx.prepare(model, torch.randn(1, 3, 32, 32))(torch.randn(2, 3, 32, 32))
    assert type(out).__name__ == "ImageClassifierOutput"


def test_torchvision_vit():
    from torchvision.models import VisionTransformer

    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4,
                              hidden_dim=64, mlp_dim=128, num_classes=7).eval()
    plan = _check(model, torch.randn(1, 3, 32, 32), [(4, 16)] * 2, [128] * 2)
    assert any("nn.MultiheadAttention" in n for n in plan.notes)


@pytest.mark.parametrize("name,kwargs,size,params", [
    ("vit_relpos_medium_patch16_cls_224", dict(img_size=64, depth=2), 64,
     {"blocks.0.attn.rel_pos.mlp.fc2.weight", "blocks.0.attn.rel_pos.mlp.fc2.bias"}),
    ("swinv2_tiny_window8_256", dict(depths=(1, 1, 1, 1)), 256,
     {"layers.0.blocks.0.attn.cpb_mlp.2.weight", "layers.0.blocks.0.attn.logit_scale"}),
])
def test_per_head_bias_made_by_an_mlp(name, kwargs, size, params):
    model = timm.create_model(name, **kwargs).eval()
    plan = hiap_fx.prepare(model, torch.randn(1, 3, size, size)).plan
    assert {t.param for t in plan.attention[0].side} == params
    assert all(t.axis == 0 for t in plan.attention[0].side)


def test_post_norm_ffn_of_swin_v2_is_gated_by_neuron():
    """Swin V2 adds norm(mlp(x)) to the stream: the norm of a zero branch is not zero, so the
    whole block cannot go, but its neurons can; both attention and FFN sites are found."""
    from independent_macs import independent_macs, randomise_gates

    model = timm.create_model("swinv2_cr_tiny_ns_224", img_size=64).eval()
    x = torch.randn(1, 3, 64, 64)
    prepared = hiap_fx.prepare(model, x)
    hidden = [m.fc2.in_features for n, m in model.named_modules() if n.endswith(".mlp")]
    assert [s.hidden for s in prepared.plan.ffn] == hidden and len(hidden) == 12
    assert all(s.residual is None for s in prepared.plan.ffn)
    assert sum("post-norm" in n for n in prepared.plan.notes) == 12
    assert not any(k.endswith(".ffn") for k in prepared.gate_modules())
    randomise_gates(prepared, 0, 0.4)
    compact = hiap_fx.finalize(prepared.eval())  # output and MACs verified
    assert hiap_fx.count_macs(compact, x) == prepared.hard_macs() == independent_macs(prepared)


def test_shifted_windows_with_as_many_windows_as_heads():
    """Swin's masked logits are reshaped to (-1, windows, heads, N, N): with windows == heads only
    the heads entry may change when heads are cut (found by index flow, not by value)."""
    from timm.models.swin_transformer import SwinTransformer

    torch.manual_seed(0)
    model = SwinTransformer(img_size=32, patch_size=4, window_size=4, embed_dim=16, depths=(2,),
                            num_heads=(4,), num_classes=3).eval()
    x = torch.randn(1, 3, 32, 32)
    prepared = hiap_fx.prepare(model, x).eval()
    for seed in range(3):
        for key, gate in prepared.gate_modules().items():
            with torch.no_grad():
                gate.logits.fill_(3.0)
                if key.endswith("blocks.1.attn.head"):
                    gate.logits[seed] = -3.0  # 3 of 4 heads left, next to 4 windows
        compact = hiap_fx.finalize(prepared)  # output and MACs verified
        x2 = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            assert_close_outputs(prepared(x2), compact(x2), rel=1e-4)
