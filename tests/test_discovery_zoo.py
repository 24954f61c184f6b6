"""Discovery on hand-written ViTs with many different spellings, incl. property-based configs."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_close_outputs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from zoo import (
    ATTN_KINDS,
    EXPECTED,
    FACTORIES,
    FFN_KINDS,
    NORM_KINDS,
    POOL_KINDS,
    QKV_KINDS,
    SpecViT,
    ViTSpec,
    example_input,
    expected_for_spec,
)

import hiap_fx


def _found(plan):
    return dict(depth=len(plan.attention),
                heads={(s.num_heads, s.head_dim) for s in plan.attention},
                hidden=[s.hidden for s in plan.ffn])


def _check(model, expected, batch=2):
    x = example_input(model, batch=1)
    prepared = hiap_fx.prepare(model, x)
    found = _found(prepared.plan)
    assert found["depth"] == expected["depth"]
    assert found["heads"] == {(expected["heads"], expected["head_dim"])}
    assert found["hidden"] == expected["hidden"]
    assert all(s.residual is not None for s in prepared.plan.attention + prepared.plan.ffn)
    x2 = example_input(model, batch=batch, seed=3)
    with torch.no_grad():
        assert_close_outputs(model(x2), prepared(x2))
    return prepared


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_fixed_zoo_models(name):
    _check(FACTORIES[name](), EXPECTED[name])


def test_fused_qkv_row_layout_is_found():
    spec = ViTSpec(qkv="fused", heads=4, head_dim=8, dim=32)
    plan = hiap_fx.prepare(SpecViT(spec).eval(), example_input(spec, 1)).plan
    site = plan.attention[0]
    inner = spec.heads * spec.head_dim
    for j, proj in enumerate((site.q, site.k, site.v)):
        for h in range(spec.heads):
            for d in range(spec.head_dim):
                assert proj.index[h][d] == j * inner + h * spec.head_dim + d
    assert site.out.index[1][2] == 1 * spec.head_dim + 2


def test_chunked_gated_ffn_pairs_halves():
    spec = ViTSpec(ffn="gated", mlp_hidden=24)
    plan = hiap_fx.prepare(SpecViT(spec).eval(), example_input(spec, 1)).plan
    ffn = plan.ffn[0]
    assert ffn.gated and len(ffn.inputs) == 2
    a, b = ffn.inputs[0].index[0], ffn.inputs[1].index[0]
    assert sorted(a + b) == list(range(48))
    assert {abs(x - y) for x, y in zip(a, b)} == {24}


def test_user_model_is_not_mutated():
    model = FACTORIES["tiny_vit_mha"]()
    before = copy.deepcopy(model.state_dict())
    types = [type(m) for m in model.modules()]
    hiap_fx.prepare(model, example_input(model, 1))
    assert [type(m) for m in model.modules()] == types
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_plan_json_round_trip():
    model = FACTORIES["tiny_vit_separate"]()
    plan = hiap_fx.prepare(model, example_input(model, 1)).plan
    again = hiap_fx.Plan.model_validate_json(plan.model_dump_json())
    assert again == plan
    assert "attention sites: 2" in plan.summary()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(qkv=st.sampled_from(QKV_KINDS), attn=st.sampled_from(ATTN_KINDS),
       norm=st.sampled_from(NORM_KINDS), ffn=st.sampled_from(FFN_KINDS),
       pool=st.sampled_from(POOL_KINDS), heads=st.integers(1, 4), head_dim=st.integers(1, 9),
       depth=st.integers(1, 3), hidden=st.integers(1, 40), layer_scale=st.booleans(),
       drop_path=st.sampled_from([0.0, 0.1]), qkv_bias=st.booleans())
def test_random_configs(qkv, attn, norm, ffn, pool, heads, head_dim, depth, hidden, layer_scale,
                        drop_path, qkv_bias):
    spec = ViTSpec(qkv=qkv, attn=attn, norm=norm, ffn=ffn, pool=pool, heads=heads,
                   head_dim=head_dim, depth=depth, mlp_hidden=hidden, layer_scale=layer_scale,
                   drop_path=drop_path, qkv_bias=qkv_bias, dim=12)
    torch.manual_seed(0)
    _check(SpecViT(spec).eval(), expected_for_spec(spec), batch=3)
