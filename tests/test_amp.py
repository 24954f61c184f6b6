"""Mixed precision: training under autocast (bf16 on CPU) works, both through ``prune(amp=...)``
and in an own loop, and the compact model verifies in float32."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from zoo import FACTORIES, example_input

import hiap_fx


def _model_and_data():
    torch.manual_seed(0)
    model = FACTORIES["tiny_vit_separate"]().eval()
    x = example_input(model, 32)
    data = DataLoader(TensorDataset(x, torch.randint(0, 10, (32,))), batch_size=8)
    return model, data


def test_prune_under_bf16_autocast_lands_and_verifies_in_float32():
    model, data = _model_and_data()
    config = hiap_fx.PruneConfig(target_macs=0.6, amp="bf16", lr=1e-3)
    result = hiap_fx.prune(model, data, config, steps=12, progress=False)
    assert all(p.dtype == torch.float32 for p in result.compact.parameters())
    assert abs(result.report.kept_ratio - 0.6) <= 0.01  # finalize verified output and MACs in fp32
    assert all(torch.isfinite(g.logits).all() for g in result.prepared.gate_modules().values())
    initial = hiap_fx.prepare(model, next(iter(data))[0][:2], config).gate_modules()
    moved = [k for k, g in result.prepared.gate_modules().items()
             if not torch.allclose(g.logits, initial[k].logits)]
    assert moved, "the gates did not train under autocast"


def test_own_loop_under_autocast():
    model, data = _model_and_data()
    x0 = next(iter(data))[0][:2]
    prepared = hiap_fx.prepare(model, x0, hiap_fx.PruneConfig(target_macs=0.6)).train()
    opt = torch.optim.AdamW(prepared.parameters(), lr=1e-2)
    for step, (x, y) in enumerate(data):
        prepared.schedule(step, 4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = prepared(x)
        assert logits.dtype == torch.bfloat16
        loss = F.cross_entropy(logits.float(), y) + prepared.hiap_loss()
        opt.zero_grad()
        loss.backward()
        assert all(torch.isfinite(g.logits.grad).all() for g in prepared.gate_modules().values())
        opt.step()
    compact = hiap_fx.finalize(prepared)  # verifies in float32
    with torch.no_grad():
        assert compact(x0).dtype == torch.float32


def test_bf16_weights_end_to_end():
    """A model whose weights are bf16 (no autocast): prepare, train and finalize in bf16; gate
    logits and the controller stay float32, the masks follow the activations' dtype, the compact
    model is bf16 and verified against the hard-gated model in bf16 (tolerance of bf16)."""
    model, data = _model_and_data()
    model = model.to(torch.bfloat16)
    bf16 = DataLoader(TensorDataset(*(t if not t.is_floating_point() else t.to(torch.bfloat16)
                                      for t in data.dataset.tensors)), batch_size=8)
    config = hiap_fx.PruneConfig(target_macs=0.6, lr=1e-3)
    # no recovery fine-tune, so that the compact model is finalize's, comparable with the gated one
    result = hiap_fx.prune(model, bf16, config, steps=12, finetune_steps=0, progress=False)
    prepared = result.prepared
    assert all(g.logits.dtype == torch.float32 for g in prepared.gate_modules().values())
    assert all(p.dtype == torch.bfloat16 for p in result.compact.parameters())
    assert abs(result.report.kept_ratio - 0.6) <= 0.01
    x = next(iter(bf16))[0]
    with torch.no_grad():
        want, got = prepared.eval()(x), result.compact(x)
    assert got.dtype == torch.bfloat16
    assert (want.float() - got.float()).abs().max() <= 6.3e-2 * want.float().abs().max()
    assert hiap_fx.count_macs(result.compact, prepared.example_inputs) == prepared.hard_macs()
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())  # the user's model untouched
