"""Gumbel-Sigmoid gates: exact on-probability, straight-through gradients, deterministic eval."""

from __future__ import annotations

import pytest
import torch

from hiap_fx.gated.gates import Gate


def test_hard_on_frequency_matches_sigmoid_logit():
    torch.manual_seed(0)
    gate = Gate(7, "head", "s")
    with torch.no_grad():
        gate.logits.copy_(torch.tensor([-3.0, -1.0, -0.3, 0.0, 0.4, 1.5, 3.0]))
    gate.train()
    for tau in (2.0, 0.5):
        gate.set_temperature(tau)
        draws = torch.stack([gate().detach() for _ in range(20000)])
        freq = draws.mean(0)
        expected = torch.sigmoid(gate.logits.detach())
        # binomial std <= 0.0036 at n=20000: 5 sigma
        assert torch.allclose(freq, expected, atol=0.018), (tau, freq, expected)
        assert set(draws.unique().tolist()) <= {0.0, 1.0}


def test_straight_through_gradient_flows():
    gate = Gate(5, "neuron", "s").train()
    gate.set_temperature(1.0)
    (gate() * torch.arange(5.0)).sum().backward()
    assert gate.logits.grad is not None and gate.logits.grad.abs().sum() > 0


def test_eval_is_deterministic_threshold_at_zero():
    gate = Gate(4, "ffn", "s").eval()
    with torch.no_grad():
        gate.logits.copy_(torch.tensor([-0.1, 0.0, 0.1, 5.0]))
    assert gate().tolist() == [0.0, 0.0, 1.0, 1.0]
    assert torch.equal(gate(), gate())


def test_default_init_starts_on_and_validates():
    gate = Gate(3, "head_dim", "s")
    assert float(gate.probability().detach().min()) > 0.9
    with pytest.raises(ValueError):
        gate.set_temperature(0.0)
    with pytest.raises(ValueError):
        Gate(0, "head", "s")
