"""Clear failures: typed HiapErrors that say what, where and what to do."""

from __future__ import annotations

import copy
import warnings

import pydantic
import pytest
import torch
from torch import nn
from zoo import FACTORIES, example_input

import hiap_fx


class _ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        x = self.conv(x).mean((2, 3))
        return self.fc2(torch.relu(self.fc1(x)))


class _DataDependent(nn.Module):
    """Attention whose path depends on the data: neither fx nor torch.export can capture it."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = _Branchy()

    def forward(self, x):
        return self.inner(x)


class _Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 24)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)
        if q.sum() > 0:
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return v


def test_model_without_attention():
    with pytest.raises(hiap_fx.NoAttentionError, match="no prunable attention found in _ConvNet"):
        hiap_fx.prepare(_ConvNet(), torch.randn(1, 3, 8, 8))


def test_untraceable_construct_names_module_and_remedy():
    with pytest.raises(hiap_fx.CaptureError) as info:
        hiap_fx.prepare(_DataDependent(), torch.randn(2, 5, 8))
    msg = str(info.value)
    assert "inner (_Branchy)" in msg
    assert "concrete_args" in msg and "register_module_rewrite" in msg


def test_wrong_input_shape():
    model = FACTORIES["tiny_vit_separate"]()
    with pytest.raises(hiap_fx.InputError, match="fails on example_inputs"):
        hiap_fx.prepare(model, torch.randn(1, 3, 7, 7))


def test_inputs_must_be_tensors():
    with pytest.raises(hiap_fx.InputError, match="not a tensor"):
        hiap_fx.prepare(FACTORIES["tiny_vit_separate"](), [3])


@pytest.mark.parametrize("field,value", [("frontend", "jit"), ("target_macs", 1.5), ("target_macs", 0.0),
                                         ("align", 0), ("alpha", -0.1), ("tau_end", 0.0), ("nonsense", 1)])
def test_invalid_config_names_field(field, value):
    with pytest.raises(hiap_fx.ConfigError, match=field) as info:
        hiap_fx.PruneConfig(**{field: value})
    # the contract's pydantic.ValidationError, and a HiapError like every other refusal
    assert isinstance(info.value, pydantic.ValidationError) and isinstance(info.value, hiap_fx.HiapError)


def test_invalid_config_assignment_names_field():
    config = hiap_fx.PruneConfig()
    with pytest.raises(hiap_fx.ConfigError, match="budget_ramp"):
        config.budget_ramp = 2.0
    assert issubclass(hiap_fx.ConfigError, ValueError) and issubclass(hiap_fx.ConfigError, pydantic.ValidationError)


def _tiny():
    torch.manual_seed(0)
    model = FACTORIES["tiny_vit_separate"]().eval()
    return model, example_input(model, 2)


def test_finalize_needs_a_prepared_model():
    model, _ = _tiny()
    with pytest.raises(hiap_fx.InputError, match="finalize\\(\\) needs a hiap_fx.PreparedModel, got"):
        hiap_fx.finalize(model)


def test_state_dict_from_another_architecture():
    model, x = _tiny()
    prepared = hiap_fx.prepare(model, x)
    other = hiap_fx.prepare(FACTORIES["tiny_vit_functional"]().eval(), example_input(
        FACTORIES["tiny_vit_functional"](), 2))
    with pytest.raises(hiap_fx.StateError, match="does not fit this prepared model.*missing"):
        prepared.load_state_dict(other.state_dict())
    with pytest.raises(hiap_fx.StateError, match="missing"):  # the dense weights have no gates
        prepared.load_state_dict(model.state_dict())
    prepared.load_state_dict(copy.deepcopy(prepared.state_dict()))  # its own state still loads


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_gate_logits_are_refused_with_the_gate(bad):
    model, x = _tiny()
    prepared = hiap_fx.prepare(model, x)
    key, gate = next(iter(prepared.gate_modules().items()))
    with torch.no_grad():
        gate.logits[1] = bad
    with pytest.raises(hiap_fx.StateError, match=f"gate {key} has 1 non-finite"):
        hiap_fx.finalize(prepared)
    with pytest.raises(hiap_fx.StateError):
        prepared.hard_macs()


def test_every_gate_closed_gives_a_finite_valid_model():
    model, x = _tiny()
    prepared = hiap_fx.prepare(model, x).eval()
    with torch.no_grad():
        for gate in prepared.gate_modules().values():
            gate.logits.fill_(-5.0)
    compact = hiap_fx.finalize(prepared)  # verified: equals the all-closed gated model
    with torch.no_grad():
        out = compact(example_input(model, 3, seed=1))
    assert out.shape == (3, 10) and torch.isfinite(out).all()
    assert hiap_fx.count_macs(compact, x) == prepared.hard_macs() < prepared.dense_macs
    assert not prepared.plan.attention or all(site.residual is not None for site in prepared.plan.attention)


def test_inputs_in_another_dtype_than_the_weights_are_refused_with_the_fix():
    model, x = _tiny()
    with pytest.raises(hiap_fx.InputError, match="example input 0 is torch.float32, the model's weights "
                       "are torch.bfloat16.*x.to"):
        hiap_fx.prepare(copy.deepcopy(model).to(torch.bfloat16), x)
    with pytest.raises(hiap_fx.InputError, match="example input 0 is torch.bfloat16"):
        hiap_fx.prepare(model.float(), x.to(torch.bfloat16))


def test_model_and_inputs_on_different_devices():
    model, x = _tiny()
    with pytest.raises(hiap_fx.InputError, match="different devices \\(cpu, meta\\)"):
        hiap_fx.prepare(model, x.to("meta"))


def test_diverged_training_is_reported_with_the_step():
    from torch.utils.data import TensorDataset

    model, x = _tiny()
    data = TensorDataset(torch.randn(8, *x.shape[1:]), torch.randint(0, 10, (8,)))
    with torch.no_grad():
        model.classifier.weight.fill_(float("nan"))
    with pytest.raises(hiap_fx.StateError, match="loss is nan at step 0"):
        hiap_fx.prune(model, torch.utils.data.DataLoader(data, batch_size=4), steps=2, progress=False)


def test_the_users_model_is_never_mutated():
    model, x = _tiny()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [(n, type(m)) for n, m in model.named_modules()]
    prepared = hiap_fx.prepare(model, x)
    from independent_macs import randomise_gates
    randomise_gates(prepared, 0, 0.5)
    hiap_fx.finalize(prepared)
    from torch.utils.data import DataLoader, TensorDataset
    data = DataLoader(TensorDataset(torch.randn(8, *x.shape[1:]), torch.randint(0, 10, (8,))), batch_size=4)
    hiap_fx.prune(model, data, steps=2, progress=False)
    assert model.training and [(n, type(m)) for n, m in model.named_modules()] == modules
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_errors_are_hiap_errors():
    for cls in (hiap_fx.CaptureError, hiap_fx.NoAttentionError, hiap_fx.InputError,
                hiap_fx.DiscoveryError, hiap_fx.ConfigError, hiap_fx.StateError):
        assert issubclass(cls, hiap_fx.HiapError)


def test_forced_export_front_end_matches():
    model = FACTORIES["tiny_vit_functional"]()
    x = example_input(model, 1)
    prepared = hiap_fx.prepare(model, x, hiap_fx.PruneConfig(frontend="export"))
    assert prepared.plan.frontend == "export"
    x2 = example_input(model, 4, seed=1)
    with torch.no_grad():
        assert torch.allclose(model(x2), prepared(x2), atol=1e-5)


class _SubLNBlock(nn.Module):
    """Attention whose head outputs are normalised together and then go through an activation
    before the projection: no head can be cut exactly, but the FFN can. (A norm right before
    the projection, BEiT-3's sub-LN, is cut exactly: tests/test_hybrid_attention.py.)"""

    def __init__(self, dim: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.qkv, self.norm, self.proj = nn.Linear(dim, 3 * dim), nn.LayerNorm(dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 32), nn.Linear(32, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        x = x + self.proj(torch.nn.functional.gelu(self.norm(a)))
        return x + self.fc2(torch.relu(self.fc1(x)))


def test_unprunable_attention_is_reported_and_the_ffn_still_pruned():
    torch.manual_seed(0)
    model, x = _SubLNBlock().eval(), torch.randn(2, 5, 16)
    with pytest.warns(hiap_fx.HiapWarning, match="none of its 1 attention.*normalised or mixed"):
        prepared = hiap_fx.prepare(model, x)
    assert not prepared.plan.attention and len(prepared.plan.ffn) == 1
    assert any(u.what.startswith("attention") for u in prepared.plan.unclaimed)
    assert {g.kind for g in prepared.gate_modules().values()} == {"ffn", "neuron"}
    from independent_macs import randomise_gates
    randomise_gates(prepared, 0, 0.5)
    compact = hiap_fx.finalize(prepared.eval())
    assert hiap_fx.count_macs(compact, x) == prepared.hard_macs() < prepared.dense_macs


class _TwoMaps(nn.Module):
    """Differential attention: two softmax maps over the same values, subtracted."""

    def __init__(self, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(dim, 5 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 32), nn.Linear(32, dim)

    def forward(self, x):
        b, n, c = x.shape
        q1, k1, q2, k2, v = self.qkv(x).reshape(b, n, 5, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        F_ = torch.nn.functional
        a = F_.scaled_dot_product_attention(q1, k1, v) - 0.5 * F_.scaled_dot_product_attention(q2, k2, v)
        x = x + self.proj(a.transpose(1, 2).reshape(b, n, c))
        return x + self.fc2(torch.relu(self.fc1(x)))


class _Cascaded(nn.Module):
    """EfficientViT-MSRA's cascaded heads: each head's output is added to the next one's input."""

    def __init__(self, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.qkvs = nn.ModuleList(nn.Linear(dim // heads, 3 * (dim // heads)) for _ in range(heads))
        self.proj = nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 32), nn.Linear(32, dim)

    def forward(self, x):
        outs, feat = [], None
        for chunk, qkv in zip(x.chunk(len(self.qkvs), dim=-1), self.qkvs):
            feat = chunk if feat is None else feat + chunk
            q, k, v = qkv(feat).chunk(3, dim=-1)
            feat = torch.nn.functional.scaled_dot_product_attention(q, k, v)
            outs.append(feat)
        x = x + self.proj(torch.cat(outs, -1))
        return x + self.fc2(torch.relu(self.fc1(x)))


@pytest.mark.parametrize("net, form", [(_TwoMaps, "differential attention"), (_Cascaded, "cascaded heads")])
def test_refusals_name_the_attention_form(net, form):
    """Attention that cannot be cut exactly is reported with the form that stops it; what is
    sited (the FFN, the last cascaded head, whose output only reaches the projection) is still
    pruned exactly."""
    torch.manual_seed(0)
    model, x = net().eval(), torch.randn(2, 5, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hiap_fx.HiapWarning)
        prepared = hiap_fx.prepare(model, x)
    reasons = [u.reason for u in prepared.plan.unclaimed if u.what.startswith("attention")]
    assert reasons and all(form in r and "stay dense" in r for r in reasons), reasons
    assert len(prepared.plan.ffn) == 1 and len(prepared.plan.attention) == (1 if net is _Cascaded else 0)
    from independent_macs import randomise_gates
    randomise_gates(prepared, 0, 0.5)
    compact = hiap_fx.finalize(prepared.eval())
    with torch.no_grad():
        assert torch.allclose(compact(x), prepared(x), atol=1e-5)
