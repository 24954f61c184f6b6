"""What closing a gate means, checked against edits of the original model, plus the cost model's
token re-evaluation, the objective, the budget controller and persistence."""

from __future__ import annotations

import copy
import io

import pydantic
import pytest
import timm
import torch
from conftest import assert_close_outputs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from independent_macs import independent_macs, randomise_gates
from torch import nn
from zoo import ATTN_KINDS, FFN_KINDS, QKV_KINDS, SpecViT, ViTSpec, example_input

import hiap_fx


class _Zero(nn.Module):
    def forward(self, x, *args, **kwargs):
        return torch.zeros_like(x)


def _deit(depth=2, size=64):
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_patch16_224", img_size=size, depth=depth).eval()


def _prepared(model, size=64, **cfg):
    """Prepared with exact unit selection (align=1) unless a test asks for rounding."""
    x = torch.randn(2, 3, size, size)
    cfg = {"align": 1, **cfg}
    return hiap_fx.prepare(model, x, hiap_fx.PruneConfig(**cfg)).eval(), torch.randn(3, 3, size, size)


def _set(gate, off):
    with torch.no_grad():
        gate.logits.fill_(3.0)
        gate.logits[list(off)] = -3.0


def _same(a, b):
    with torch.no_grad():
        assert_close_outputs(a, b, rel=1e-5)


def test_closed_head_equals_zeroed_output_columns():
    model = _deit()
    prepared, x = _prepared(model)
    _set(prepared.gate_modules()["blocks.0.attn.head"], [1])
    ref = copy.deepcopy(model)
    with torch.no_grad():
        ref.blocks[0].attn.proj.weight[:, 64:128] = 0
    _same(ref(x), prepared(x))


def test_closed_value_dims_equal_zeroed_output_columns():
    model = _deit()
    prepared, x = _prepared(model)
    _set(prepared.gate_modules()["blocks.1.attn.head_dim"], [2 * 64 + 0, 2 * 64 + 5, 7])
    ref = copy.deepcopy(model)
    with torch.no_grad():
        ref.blocks[1].attn.proj.weight[:, [128, 133, 7]] = 0
    _same(ref(x), prepared(x))


def test_closed_neurons_equal_zeroed_fc2_columns():
    model = _deit()
    prepared, x = _prepared(model)
    _set(prepared.gate_modules()["blocks.0.mlp.neuron"], [0, 10, 500])
    ref = copy.deepcopy(model)
    with torch.no_grad():
        ref.blocks[0].mlp.fc2.weight[:, [0, 10, 500]] = 0
    _same(ref(x), prepared(x))


@pytest.mark.parametrize("what", ["ffn_block", "all_heads", "all_value_dims"])
def test_closed_sub_layer_equals_removed_branch(what):
    model = _deit()
    prepared, x = _prepared(model)
    gates = prepared.gate_modules()
    ref = copy.deepcopy(model)
    site = prepared.plan.attention[1]
    if what == "ffn_block":
        _set(gates["blocks.1.mlp.ffn"], [0])
        ref.blocks[1].mlp = _Zero()
        removed = prepared.plan.ffn[1].macs
    else:
        gate = gates["blocks.1.attn.head" if what == "all_heads" else "blocks.1.attn.head_dim"]
        _set(gate, range(gate.logits.numel()))
        ref.blocks[1].attn = _Zero()
        removed = site.macs
    _same(ref(x), prepared(x))
    assert prepared.hard_macs() == prepared.dense_macs - removed == independent_macs(prepared)


def test_qk_dims_shared_by_q_and_k():
    model = _deit()
    prepared, x = _prepared(model, qk_dims=True)
    gate = prepared.gate_modules()["blocks.0.attn.qk_dim"]
    closed = [3, 64 + 1, 64 + 2, 2 * 64 + 63]
    _set(gate, closed)
    ref = copy.deepcopy(model)
    with torch.no_grad():  # timm's fused qkv rows: [q | k | v], each head-major
        ref.blocks[0].attn.qkv.weight[closed] = 0
        ref.blocks[0].attn.qkv.bias[closed] = 0
        ref.blocks[0].attn.qkv.weight[[192 + c for c in closed]] = 0
        ref.blocks[0].attn.qkv.bias[[192 + c for c in closed]] = 0
    _same(ref(x), prepared(x))
    assert prepared.hard_macs() == independent_macs(prepared) < prepared.dense_macs
    # the attention scale stays that of the original head dim
    sdpa = [n for n in prepared.graph_module.graph.nodes if "scaled_dot_product" in str(n.target)]
    assert sdpa and all(abs(n.kwargs["scale"] - 64 ** -0.5) < 1e-12 for n in sdpa)


def test_rotary_sites_get_no_qk_dim_gates():
    from timm.layers import set_fused_attn

    model = timm.create_model("eva02_tiny_patch14_224", img_size=56, depth=1).eval()
    set_fused_attn(True)
    prepared, _ = _prepared(model, size=56, qk_dims=True)
    assert not any(k.endswith("qk_dim") for k in prepared.gate_modules())
    assert any("q/k dims are mixed" in n for n in prepared.plan.notes)


def test_align_rounds_kept_counts_up():
    model = _deit()
    prepared, x = _prepared(model, align=8)
    randomise_gates(prepared, seed=1, p_off=0.5)
    for key, gate in prepared.gate_modules().items():
        if gate.kind in ("neuron", "head_dim"):
            counts = gate.hard().view(gate.groups, -1).sum(-1)
            assert bool((counts % 8 == 0).all()), key
    assert prepared.hard_macs() == independent_macs(prepared)


def test_granularities_switch_off():
    prepared, _ = _prepared(_deit(), heads=False, head_dims=False, ffn_blocks=True, neurons=False)
    assert {g.kind for g in prepared.gate_modules().values()} == {"ffn"}


def test_cost_at_another_token_count_equals_the_counter():
    prepared, _ = _prepared(_deit(size=64))
    cm = prepared.cost_model
    assert cm.tokens is not None and cm.example_tokens == 17
    big = _deit(size=96)
    dense = [int(v) for v in cm.dense_values()]
    assert cm.evaluate(dense, tokens=37, batch=3) == hiap_fx.count_macs(big, torch.randn(3, 3, 96, 96))
    assert cm.at(tokens=37, batch=3).free_symbols == set(s.symbol for s in cm.sources)


def test_windowed_model_has_no_token_symbol():
    model = timm.create_model("swin_tiny_patch4_window7_224", depths=(1, 1, 1, 1)).eval()
    prepared = hiap_fx.prepare(model, torch.randn(1, 3, 224, 224))
    assert prepared.cost_model.tokens is None
    with pytest.raises(hiap_fx.HiapError, match="token"):
        prepared.cost_model.at(tokens=100)


def test_loss_gradient_closes_units_in_fixed_lambda_mode():
    prepared, _ = _prepared(_deit(), target_macs=None)
    prepared.train()
    loss = prepared.hiap_loss()
    cm, dense = prepared.cost_model, prepared.dense_macs
    want = (2.0 * prepared.expected_macs("macro") + prepared.expected_macs("micro")) / dense
    assert torch.isclose(loss.double(), want, rtol=1e-5)
    loss.backward()
    for key, gate in prepared.gate_modules().items():
        assert bool((gate.logits.grad > 0).all()), key  # descent lowers every logit
    assert float(prepared.budget.multiplier) == 1.0 and cm.macro_expr.free_symbols


def test_feasibility_reopens_a_collapsing_attention():
    prepared, _ = _prepared(_deit(), target_macs=None, lambda_macro=0.0, lambda_micro=0.0)
    gate = prepared.gate_modules()["blocks.0.attn.head"]
    _set(gate, range(3))
    prepared.train()
    loss = prepared.hiap_loss()
    assert float(loss.detach()) > 0.5
    loss.backward()
    assert bool((gate.logits.grad < 0).all())


def test_budget_controller_moves_towards_the_target_and_is_saved():
    prepared, _ = _prepared(_deit(), target_macs=0.3, budget_lr=0.1, budget_kp=2.0)
    prepared.train()
    ratio = float(prepared.expected_macs().detach()) / prepared.dense_macs
    for _ in range(5):
        prepared.hiap_loss()
    gap = ratio - 0.3  # PI: integral 5 * lr * gap plus kp * gap
    assert float(prepared.budget.multiplier) == pytest.approx(5 * 0.1 * gap + 2.0 * gap, rel=1e-5)
    assert float(prepared.budget.last_ratio) == pytest.approx(ratio, rel=1e-6)
    state = prepared.state_dict()
    assert "budget.multiplier" in state
    other, _ = _prepared(_deit(), target_macs=0.3)
    other.load_state_dict(state)
    assert float(other.budget.multiplier) == float(prepared.budget.multiplier)

    # below the target the multiplier turns negative (gates re-open), down to the floor of -1
    easy, _ = _prepared(_deit(), target_macs=1.0, budget_lr=1.0)
    easy.train()
    for _ in range(20):
        easy.hiap_loss()
    assert float(easy.budget.multiplier) == -1.0


def test_eval_mode_does_not_step_the_controller():
    prepared, _ = _prepared(_deit(), target_macs=0.3)
    prepared.hiap_loss()
    assert int(prepared.budget.steps) == 0


def test_save_load_round_trip_and_temperature():
    prepared, x = _prepared(_deit())
    randomise_gates(prepared, seed=2)
    prepared.set_temperature(0.7)
    assert all(float(g.tau) == pytest.approx(0.7) for g in prepared.gate_modules().values())
    buf = io.BytesIO()
    torch.save(prepared, buf)
    buf.seek(0)
    again = torch.load(buf, weights_only=False)
    assert again.hard_macs() == prepared.hard_macs()
    _same(prepared(x), again(x))


def test_config_errors_name_the_field():
    for field, value in [("align", 0), ("target_macs", 0.0), ("tau_end", -1.0), ("heads", "maybe")]:
        with pytest.raises(pydantic.ValidationError, match=field):
            hiap_fx.PruneConfig(**{field: value})


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(qkv=st.sampled_from(QKV_KINDS), attn=st.sampled_from(ATTN_KINDS), ffn=st.sampled_from(FFN_KINDS),
       heads=st.integers(1, 4), head_dim=st.integers(1, 6), depth=st.integers(1, 2),
       hidden=st.integers(1, 24), qk_dims=st.booleans(), align=st.sampled_from([1, 2, 4]),
       seed=st.integers(0, 10_000), p_off=st.floats(0.0, 1.0))
def test_random_configs_and_decisions(qkv, attn, ffn, heads, head_dim, depth, hidden, qk_dims, align,
                                      seed, p_off):
    spec = ViTSpec(qkv=qkv, attn=attn, ffn=ffn, heads=heads, head_dim=head_dim, depth=depth,
                   mlp_hidden=hidden, dim=12)
    torch.manual_seed(0)
    model = SpecViT(spec).eval()
    x = example_input(spec, batch=2)
    prepared = hiap_fx.prepare(model, x, hiap_fx.PruneConfig(qk_dims=qk_dims, align=align)).eval()
    assert prepared.hard_macs() == prepared.dense_macs == hiap_fx.count_macs(model, x)
    randomise_gates(prepared, seed, p_off)
    assert prepared.hard_macs() == independent_macs(prepared)
    with torch.no_grad():
        assert torch.isfinite(prepared(x)).all()


@pytest.mark.parametrize("repeat", ["interleave", "sdpa"])
def test_grouped_query_attention_gates(repeat):
    from gqa_models import GQANet

    model = GQANet(repeat=repeat).eval()
    x = torch.randn(2, 7, 5)
    prepared = hiap_fx.prepare(model, x, hiap_fx.PruneConfig(qk_dims=True, align=1)).eval()
    site = prepared.plan.attention[0]
    assert (site.num_heads, site.num_kv_heads, site.kv_of_head) == (4, 2, [0, 0, 1, 1])
    gates = prepared.gate_modules()
    assert gates["attn.head_dim"].logits.numel() == 2 * 8  # value dims are per kv head
    _set(gates["attn.head_dim"], [8 + 3])  # kv head 1, dim 3: shared by query heads 2 and 3
    _set(gates["attn.head"], [0])
    ref = copy.deepcopy(model)
    with torch.no_grad():
        ref.attn.v.weight[8 + 3] = 0
        ref.attn.v.bias[8 + 3] = 0
        ref.attn.o.weight[:, 0:8] = 0
    _same(ref(x), prepared(x))
    assert prepared.hard_macs() == independent_macs(prepared)
    for seed in range(4):
        randomise_gates(prepared, seed)
        assert prepared.hard_macs() == independent_macs(prepared)
