"""Memory: prepare holds one copy of the weights (the tracer's tree copy shares it), finalize
slices a tree copy sharing the prepared weights and then owns what it keeps. Neither may write
into a tensor it shares: the user's model and the prepared model come out of prepare + finalize
bit for bit unchanged, and the compact model shares no storage with either."""

from __future__ import annotations

import pytest
import torch
from hybrid_zoo import HybridNet, example
from independent_macs import randomise_gates
from zoo import FACTORIES, example_input

import hiap_fx


def _storages(module: torch.nn.Module) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in [*module.parameters(), *module.buffers()] if t.numel()}


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _cases():
    for name in ("tiny_vit_separate", "tiny_vit_mha", "tiny_vit_encoder_layer"):
        yield pytest.param(lambda n=name: (FACTORIES[n]().eval(), example_input(FACTORIES[n](), 1)), id=name)
    for form in ("conv_bn", "bn_rows", "folded", "clipped"):  # normalise rewrites weights (ConvNorm)
        yield pytest.param(lambda f=form: (lambda net: (net, example(net, 1)))(HybridNet(f, heads=3).eval()), id=form)


@pytest.mark.parametrize("build", _cases())
def test_prepare_and_finalize_write_into_no_shared_tensor(build):
    model, x = build()
    user = _snapshot(model)
    prepared = hiap_fx.prepare(model, x, hiap_fx.PruneConfig(target_macs=None))
    assert not _storages(prepared) & _storages(model)  # one copy, the prepared model's own
    randomise_gates(prepared, 3, 0.5)
    before = _snapshot(prepared)
    compact = hiap_fx.finalize(prepared.eval())
    assert not _storages(compact) & (_storages(prepared) | _storages(model))
    after = prepared.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    now = model.state_dict()
    assert all(torch.equal(user[k], now[k]) for k in user)
    with torch.no_grad():  # the compact model is still what the gated model computes
        x3 = torch.randn(3, *x.shape[1:])
        ref, got = prepared(x3), compact(x3)
    assert (ref - got).abs().max() <= 1e-4 * ref.abs().max()
