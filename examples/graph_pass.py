"""Teach hiap_fx a new architecture with a graph pass of your own, then prune it end to end.

The deployed model below calls one fused kernel for its whole self-attention block,
``hiap_example::fused_self_attention(x, qkv_weight, qkv_bias, proj_weight, proj_bias, heads)``:
projections and attention in a single custom operator, which torch.fx and torch.export both
keep as one opaque node. No attention kernel registration can help here (the projections are
inside the call), so hiap_fx refuses it. A user pass fixes that: registered at the pipeline point
``"capture"``, it runs on the raw captured graph before normalisation and rewrites every call of
the operator into the canonical ops discovery knows (linear, reshape, sdpa, linear):

    @hiap_fx.register_pass  # after="capture"
    def decompose_fused_self_attention(cg): ...

From then on the ordinary pipeline (``hiap_fx.passes.pipeline``) finds heads, value dims and
FFN neurons, gates them, trains, and finalize slices and verifies. The compact model calls
plain torch ops. Run:

    python examples/graph_pass.py [--steps 60]
"""

from __future__ import annotations

import argparse
import operator
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.utils.flop_counter import register_flop_formula

import hiap_fx

sys.path.insert(0, str(Path(__file__).parent))
from custom_pass import Block, TinyViT, accuracy_of, quadrant_batch, train_and_finalize, train_dense  # noqa: E402


def reference_self_attention(x: torch.Tensor, qkv_weight: torch.Tensor, qkv_bias: torch.Tensor,
                             proj_weight: torch.Tensor, proj_bias: torch.Tensor, heads: int) -> torch.Tensor:
    """What the fused kernel computes, in plain torch (used to train the dense model)."""
    b, n, c = x.shape
    q, k, v = F.linear(x, qkv_weight, qkv_bias).reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
    return F.linear(out, proj_weight, proj_bias)


@torch.library.custom_op("hiap_example::fused_self_attention", mutates_args=())
def fused_self_attention(x: torch.Tensor, qkv_weight: torch.Tensor, qkv_bias: torch.Tensor,
                         proj_weight: torch.Tensor, proj_bias: torch.Tensor, heads: int) -> torch.Tensor:
    """A stand-in for a fused CUDA / Triton self-attention kernel (one opaque node)."""
    return reference_self_attention(x, qkv_weight, qkv_bias, proj_weight, proj_bias, heads).contiguous()


@fused_self_attention.register_fake
def _(x, qkv_weight, qkv_bias, proj_weight, proj_bias, heads):
    return torch.empty_like(x)


@register_flop_formula(torch.ops.hiap_example.fused_self_attention)
def _flops(x_shape, qkv_shape, *args, out_shape=None, **kwargs) -> int:
    b, n, c = x_shape
    return 2 * b * n * (3 * c * c + 2 * n * c + c * c)  # projections + q@k^T + p@v + output


class FusedBlock(Block):
    """custom_pass's block (same layers), with the whole self-attention in one call: the fused
    operator once deployed, its plain-torch reference while the dense model trains."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__(dim, heads)
        self.fused = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attend = torch.ops.hiap_example.fused_self_attention if self.fused else reference_self_attention
        x = x + attend(self.norm1(x), self.qkv.weight, self.qkv.bias, self.proj.weight,
                       self.proj.bias, self.heads)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


def fused_vit() -> TinyViT:
    """custom_pass's TinyViT built from fused blocks."""
    return TinyViT(block=FusedBlock)


def use_fused_kernel(model: nn.Module) -> nn.Module:
    """Switch every fused block to the fused operator (deployment); returns the model."""
    for block in model.modules():
        if isinstance(block, FusedBlock):
            block.fused = True
    return model


FUSED = {torch.ops.hiap_example.fused_self_attention, torch.ops.hiap_example.fused_self_attention.default}


def decompose_fused_self_attention(cg):
    """A user graph pass: every call of the fused operator becomes linear -> reshape/permute ->
    sdpa -> transpose/reshape -> linear on the same weights (the canonical ops discovery knows)."""
    graph: fx.Graph = cg.gm.graph
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in FUSED:
            continue
        x, qkv_weight, qkv_bias, proj_weight, proj_bias, heads = node.args
        with graph.inserting_before(node):
            b, n, c = (graph.call_method("size", (x, i)) for i in range(3))
            qkv = graph.call_function(F.linear, (x, qkv_weight, qkv_bias))
            qkv = graph.call_method("reshape", (qkv, b, n, 3, heads, -1))
            qkv = graph.call_method("permute", (qkv, 2, 0, 3, 1, 4))
            q, k, v = (graph.call_function(operator.getitem, (qkv, i)) for i in range(3))
            out = graph.call_function(F.scaled_dot_product_attention, (q, k, v))
            out = graph.call_method("reshape", (graph.call_method("transpose", (out, 1, 2)), b, n, c))
            out = graph.call_function(F.linear, (out, proj_weight, proj_bias))
        node.replace_all_uses_with(out)
        graph.erase_node(node)
    return cg


def main(steps: int = 60, target: float = 0.5) -> dict:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = use_fused_kernel(train_dense(fused_vit(), gen))  # trained in plain torch, deployed fused
    example, _ = quadrant_batch(2, gen)

    # 1. Out of the box: the attention is hidden in one opaque call; prepare refuses it.
    try:
        hiap_fx.prepare(model, example, hiap_fx.PruneConfig(target_macs=target))
        raise SystemExit("expected hiap_fx to refuse this model before the pass is registered")
    except hiap_fx.NoAttentionError as exc:
        print(f"before the pass: {type(exc).__name__}: {str(exc)[:160]}...")

    # 2. Register the pass at the point 'capture' (raw graph, before normalisation).
    hiap_fx.register_pass(decompose_fused_self_attention, after="capture")
    config = hiap_fx.PruneConfig(target_macs=target)
    prepared = hiap_fx.prepare(model, example, config)
    print(prepared.plan.summary())

    # 3. Train a few steps in an own loop, land on the budget, finalize (sliced and verified).
    compact, gap = train_and_finalize(prepared, gen, steps)
    dense_accuracy, accuracy = accuracy_of(model, gen), accuracy_of(compact, gen)
    dense, kept = hiap_fx.count_macs(model, example), hiap_fx.count_macs(compact, example)
    fused_left = sum(n.target in FUSED for n in compact.graph.nodes)
    print(f"attention sites: {len(prepared.plan.attention)}, FFN sites: {len(prepared.plan.ffn)}")
    print(f"MACs: {dense:,} -> {kept:,} ({100 * kept / dense:.1f}%), accuracy {100 * dense_accuracy:.1f}% "
          f"-> {100 * accuracy:.1f}%, max |compact - prepared| = {gap:.1e}")
    return {"dense_macs": dense, "compact_macs": kept, "dense_accuracy": dense_accuracy,
            "accuracy": accuracy, "gap": gap, "sites": len(prepared.plan.attention),
            "fused_calls_left": fused_left}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--target", type=float, default=0.5)
    args = parser.parse_args()
    main(args.steps, args.target)
