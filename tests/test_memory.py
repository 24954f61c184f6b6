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


@pytest.mark.parametrize("build", list(_cases()))
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


def _facts(cg) -> dict[str, tuple]:
    from hiap_fx.graph.ir import DTYPE_KEY, MACS_KEY, SHAPE_KEY

    return {n.name: (n.meta.get(SHAPE_KEY), n.meta.get(DTYPE_KEY), n.meta.get(MACS_KEY)) for n in cg.gm.graph.nodes}


def _same_value(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype \
            and a.shape == b.shape and (torch.equal(a, b) if not a.is_floating_point()  # rewrites
                                        else torch.allclose(a, b, rtol=1e-5, atol=1e-6, equal_nan=True))  # round
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b))
    return a == b


def _timm_cases():
    import timm

    for name in ("vit_tiny_patch16_224", "swin_tiny_patch4_window7_224", "levit_128s", "coat_lite_tiny",
                 "mvitv2_tiny", "efficientvit_m0"):
        yield pytest.param(lambda n=name: (timm.create_model(n).eval(), torch.randn(1, 3, 224, 224)), id=name)


@pytest.mark.parametrize("build", [*_cases(), *_timm_cases(), *(pytest.param(lambda f=f: (lambda net: (net, example(net, 1)))(
    HybridNet(f, heads=3).eval()), id=f"hybrid-{f}") for f in ("window", "einsum", "v_left", "conv_qkv", "nested"))])
def test_counting_on_meta_tensors_records_what_a_real_run_records(build):
    """The count stage runs on meta tensors (no compute): every node's shape, dtype and MACs,
    and every value a later pass reads, are what counting on the real example records."""
    from hiap_fx.passes.capture import capture
    from hiap_fx.passes.normalise import normalise
    from hiap_fx.passes.propagate import count, propagate

    model, x = build()
    cg = capture(model, x)
    assert cg.facts_fresh and cg.values  # the capture check recorded the facts
    normalise(cg)
    count(cg)
    fake_facts, fake_values = _facts(cg), dict(cg.values)
    fake_dependent = set(cg.input_dependent)
    propagate(cg, count=True)
    real_facts = _facts(cg)
    assert fake_facts == real_facts
    assert any(macs for _, _, macs in real_facts.values())
    assert fake_dependent == cg.input_dependent
    # a real run also keeps small input-dependent float tensors that rewrites added (none at
    # the sizes of real models): read as sentinels anyway, they are the only difference
    only_real = {k for k in set(cg.values) - set(fake_values)
                 if not (k in cg.input_dependent and cg.values[k].is_floating_point())}
    assert not only_real, f"values only a real run records: {sorted(only_real)}"
    assert set(fake_values) <= set(cg.values)
    differ = [k for k in fake_values if not _same_value(fake_values[k], cg.values[k])]
    assert not differ, [(k, fake_values[k], cg.values[k]) for k in differ[:3]]
