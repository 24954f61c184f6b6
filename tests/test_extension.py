"""The extension API: a registered attention kernel is discovered, gated, costed and sliced like
sdpa; the worked example (examples/custom_pass.py) runs end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from independent_macs import independent_macs, randomise_gates
from torch import nn

import hiap_fx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@torch.fx.wrap
def opaque_bhnd_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """[batch, heads, tokens, dim] attention whose scale comes from the head dim (no scale arg)."""
    attn = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(-1)
    return attn @ v


@torch.fx.wrap
def never_registered_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The same computation under a name no test registers."""
    return (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(-1) @ v


class KernelNet(nn.Module):
    def __init__(self, dim: int = 24, heads: int = 3, registered: bool = True) -> None:
        super().__init__()
        self.heads, self.registered = heads, registered
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        kernel = opaque_bhnd_attention if self.registered else never_registered_attention
        x = x + self.proj(kernel(q, k, v).transpose(1, 2).reshape(b, n, c))
        return x + self.fc2(torch.relu(self.fc1(x)))


def test_unregistered_python_kernel_is_traced_through_by_torch_export():
    """fx keeps the wrapped function whole and sees no attention; prepare then retries with
    torch.export, which inlines the function and finds the q @ k^T -> softmax -> @ v inside."""
    prepared = hiap_fx.prepare(KernelNet(registered=False).eval(), torch.randn(2, 5, 24))
    assert prepared.plan.frontend == "export" and len(prepared.plan.attention) == 1
    assert any("never_registered_attention" in n and "torch.export" in n for n in prepared.plan.notes)


def test_registered_kernel_without_scale_arg_keeps_qk_dims_whole():
    hiap_fx.register_attention_kernel(hiap_fx.AttentionKernel("opaque", opaque_bhnd_attention))
    x = torch.randn(2, 5, 24)
    prepared = hiap_fx.prepare(KernelNet().eval(), x, hiap_fx.PruneConfig(qk_dims=True)).eval()
    site = prepared.plan.attention[0]
    assert (site.kernel, site.num_heads, site.head_dim) == ("opaque", 3, 8)
    kinds = {key.rsplit(".", 1)[-1] for key in prepared.gate_modules()}
    assert {"head", "head_dim", "neuron"} <= kinds and "qk_dim" not in kinds
    assert any("q/k dims are not gated" in n for n in prepared.plan.notes)
    for seed in range(5):
        randomise_gates(prepared, seed, 0.4)
        compact = hiap_fx.finalize(prepared)  # output and MACs verified
        assert hiap_fx.count_macs(compact, x) == prepared.hard_macs() == independent_macs(prepared)


def test_attention_kernel_rejects_unknown_layout():
    with pytest.raises(ValueError, match="layout"):
        hiap_fx.AttentionKernel("bad", opaque_bhnd_attention, layout="NHBD")


@pytest.mark.slow
def test_custom_pass_example_end_to_end():
    """Refused before registration; after it: 3 kernel sites, pruned to the 50% budget, verified,
    and the task (99%+ dense) survives the cut."""
    code = ("import json, sys; sys.path.insert(0, 'examples'); import custom_pass; "
            "print(json.dumps(custom_pass.main(steps=60, target=0.5)))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "before registering: NoAttentionError" in done.stdout
    assert "hiap_example.fused_attention" in done.stdout  # the refusal names the opaque operator
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["sites"] == 3
    assert abs(result["compact_macs"] / result["dense_macs"] - 0.5) <= 0.01
    assert result["gap"] < 1e-4
    assert result["dense_accuracy"] > 0.95 and result["accuracy"] > 0.9


def test_a_pass_at_an_unknown_point_is_refused_at_prepare():
    from hiap_fx.registry import GRAPH_PASSES

    hiap_fx.register_pass(lambda cg: cg, after="before_everything")
    try:
        with pytest.raises(hiap_fx.InputError, match="not a pipeline point; choose one of capture"):
            hiap_fx.prepare(KernelNet().eval(), torch.randn(2, 5, 24))
    finally:
        GRAPH_PASSES.pop()


@pytest.mark.slow
def test_graph_pass_example_end_to_end():
    """A fused self-attention operator: refused without the pass; with a user pass registered after
    'capture' it becomes 3 attention sites, pruned to the 50% budget, verified, no fused call left."""
    code = ("import json, sys; sys.path.insert(0, 'examples'); import graph_pass; "
            "print(json.dumps(graph_pass.main(steps=60, target=0.5)))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "before the pass: NoAttentionError" in done.stdout
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["sites"] == 3 and result["fused_calls_left"] == 0
    assert abs(result["compact_macs"] / result["dense_macs"] - 0.5) <= 0.01
    assert result["gap"] < 1e-4 and result["accuracy"] > 0.9
