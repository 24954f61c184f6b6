"""Clear failures: typed HiapErrors that say what, where and what to do."""

from __future__ import annotations

import pydantic
import pytest
import torch
from torch import nn

import hiap_fx
from zoo import FACTORIES, example_input


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


def test_invalid_config_names_field():
    with pytest.raises(pydantic.ValidationError, match="frontend"):
        hiap_fx.PruneConfig(frontend="jit")


def test_errors_are_hiap_errors():
    for cls in (hiap_fx.CaptureError, hiap_fx.NoAttentionError, hiap_fx.InputError,
                hiap_fx.DiscoveryError):
        assert issubclass(cls, hiap_fx.HiapError)


def test_forced_export_front_end_matches():
    model = FACTORIES["tiny_vit_functional"]()
    x = example_input(model, 1)
    prepared = hiap_fx.prepare(model, x, hiap_fx.PruneConfig(frontend="export"))
    assert prepared.plan.frontend == "export"
    x2 = example_input(model, 4, seed=1)
    with torch.no_grad():
        assert torch.allclose(model(x2), prepared(x2), atol=1e-5)
