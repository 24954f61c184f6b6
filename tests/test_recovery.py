"""Weight-importance gate initialisation and the recovery fine-tune inside ``prune``."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_prune import config, synthetic_data, tiny_vit

import hiap_fx
from hiap_fx.gated.importance import (
    gate_scores,
    init_from_importance,
    neuron_scores,
    rank_spread,
    value_dim_scores,
)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=2, max_size=40),
       st.floats(-4, 4), st.floats(0.1, 5))
def test_rank_spread_orders_logits_like_scores(values, center, spread):
    scores = torch.tensor(values)
    logits = rank_spread(scores, center, spread)
    # float32 logits: a few ulps of the larger of center and spread
    assert logits.min() == pytest.approx(center - spread, abs=1e-5)
    assert logits.max() == pytest.approx(center + spread, abs=1e-5)
    i, j = torch.meshgrid(torch.arange(len(values)), torch.arange(len(values)), indexing="ij")
    stronger = scores[i] > scores[j]
    assert bool((logits[i] > logits[j])[stronger].all())  # a higher score never starts lower


def test_scores_are_the_units_own_weight_norms():
    model = tiny_vit()
    prepared = hiap_fx.prepare(model, torch.randn(2, 1, 16, 16), hiap_fx.PruneConfig(align=1))
    params = dict(prepared.graph_module.named_parameters())
    ffn = prepared.plan.ffn[0]
    blk = model.blocks[0]
    expected = blk.mlp.fc1.weight.abs().sum(1) + blk.mlp.fc2.weight.abs().sum(0)
    assert torch.allclose(neuron_scores(params, ffn), expected.detach())
    attn = prepared.plan.attention[0]
    dim, heads = 8, 4
    v_rows = blk.attn.qkv.weight[2 * heads * dim:].abs().sum(1).view(heads, dim)
    out_cols = blk.attn.proj.weight.abs().sum(0).view(heads, dim)
    assert torch.allclose(value_dim_scores(params, attn), (v_rows + out_cols).detach())
    keys = set(gate_scores(params, prepared.plan, prepared.site_gates()))
    assert keys == {k for k, g in prepared.gate_modules().items() if g.logits.numel() > 1}


def test_importance_init_closes_the_weakest_units_first():
    model = tiny_vit()
    x = torch.randn(2, 1, 16, 16)
    flat = hiap_fx.prepare(model, x, hiap_fx.PruneConfig(align=1, importance_init=0.0))
    spread = hiap_fx.prepare(model, x, hiap_fx.PruneConfig(align=1, importance_init=2.0))
    params = dict(spread.graph_module.named_parameters())
    scores = gate_scores(params, spread.plan, spread.site_gates())
    for key, gate in spread.gate_modules().items():
        assert torch.all(flat.gate_modules()[key].logits == 3.0)
        if key in scores:
            assert torch.allclose(gate.logits, rank_spread(scores[key], 3.0, 2.0))
            # one common downward shift (what budget pressure does) turns off the weakest first
            with torch.no_grad():
                gate.logits -= 3.5
            off = gate.logits <= 0
            assert off.any() and scores[key][off].max() <= scores[key][~off].min()
        else:
            assert torch.all(gate.logits == 3.0)  # single-unit gates (FFN blocks) start flat


def test_prune_spends_the_last_steps_fine_tuning_the_compact_model():
    data = synthetic_data()
    cfg = config(target_macs=0.5, importance_init=1.0)
    result = hiap_fx.prune(tiny_vit(), data, cfg, steps=40, finetune_steps=16, eval_data=data,
                           progress=False)
    r = result.report
    assert r.steps == 40 and r.finetune_steps == 16 and r.history[-1].step == 24
    assert abs(r.kept_ratio - 0.5) <= 0.01
    assert r.accuracy_before_finetune is not None and r.compact_accuracy is not None
    # the compact model was trained after finalize: it no longer equals the gated model
    x = next(iter(data))[0]
    with torch.no_grad():
        assert not torch.allclose(result.compact(x), result.prepared.eval()(x), atol=1e-4)
    assert r.compact_macs == hiap_fx.count_macs(result.compact, x[:1])
    assert "recovery fine-tune steps" in r.to_markdown()
    # the config field gives the same split
    by_fraction = hiap_fx.prune(tiny_vit(), data, config(target_macs=0.5, finetune_fraction=0.4),
                                steps=40, progress=False)
    assert by_fraction.report.finetune_steps == 16


def test_finetune_steps_must_leave_the_search_a_step_and_resume_keeps_the_split(tmp_path):
    data = synthetic_data(n=160)
    with pytest.raises(hiap_fx.InputError, match="finetune_steps"):
        hiap_fx.prune(tiny_vit(), data, config(), steps=10, finetune_steps=10, progress=False)
    with pytest.raises(hiap_fx.InputError, match="finetune_steps"):
        hiap_fx.prune(tiny_vit(), data, config(), steps=10, finetune_steps=-1, progress=False)
    cfg = config(target_macs=0.5, seed=1)
    whole = hiap_fx.prune(tiny_vit(), data, cfg, steps=14, finetune_steps=4, progress=False)
    ckpt = tmp_path / "run.pt"
    assert hiap_fx.prune(tiny_vit(), data, cfg, steps=14, finetune_steps=4, checkpoint=ckpt,
                         checkpoint_every=3, stop_after=6, progress=False) is None
    with pytest.raises(hiap_fx.InputError, match="fine-tuning: 4 then"):
        hiap_fx.prune(ckpt, data, steps=14, finetune_steps=2, progress=False)
    resumed = hiap_fx.prune(ckpt, data, progress=False)
    assert resumed.report.finetune_steps == 4 and resumed.report.steps == 14
    a, b = whole.compact.state_dict(), resumed.compact.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_gates_whose_weights_cannot_be_read_keep_the_constant_start_with_a_note():
    prepared = hiap_fx.prepare(tiny_vit(), torch.randn(2, 1, 16, 16), hiap_fx.PruneConfig(importance_init=0.0))
    plan, bundles = prepared.plan, prepared.site_gates()
    params = {k: v for k, v in prepared.graph_module.named_parameters() if "mlp" not in k}  # FFNs unreadable
    assert init_from_importance(params, plan, bundles, 3.0, 2.0) > 0
    for key, gate in prepared.gate_modules().items():
        assert torch.all(gate.logits == 3.0) == (".mlp" in key or gate.logits.numel() == 1), key
    assert any("could not be read per unit" in n and "mlp" in n for n in plan.notes)
