"""Teach hiap_fx an attention it does not know out of the box, then prune it end to end.

The model below computes attention in its own fused kernel, ``fused_attention``: a custom
operator (``torch.library.custom_op``, the way CUDA / Triton / flash-attn kernels are exposed to
PyTorch) on tensors laid out ``[batch, tokens, heads, dim]``. Both torch.fx and torch.export keep
it as one opaque node, so hiap_fx's built-in discovery (``scaled_dot_product_attention`` and
``q @ k^T -> softmax -> @ v``) finds no attention and refuses (``NoAttentionError``, naming the
opaque operator). One registration fixes that:

    hiap_fx.register_attention_kernel(hiap_fx.AttentionKernel(
        name="fused_attention", function=fused_attention, layout="BNHD", scale_arg="scale"))

From then on every pass handles the kernel: discovery finds its q/k/v projections, heads and
output projection by index flow; gating puts head, value-dim and q/k-dim masks on its operands;
the cost model counts it as ``rows x key tokens x (q/k dims + v dims)`` per kept head; finalize
calls the same operator on the kept heads only, with the dense ``scale`` pinned so q/k-dim cuts
do not change it, and verifies output and MACs (``register_flop_formula`` below tells torch's
FlopCounterMode, and so ``hiap_fx.count_macs``, what one call costs). Run:

    python examples/custom_pass.py [--steps 60]
"""

from __future__ import annotations

import argparse
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import register_flop_formula

import hiap_fx


@torch.library.custom_op("hiap_example::fused_attention", mutates_args=())
def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    scale: Optional[float] = None) -> torch.Tensor:
    """Softmax attention on ``[batch, tokens, heads, dim]`` tensors, registered as a custom
    operator: a stand-in for a fused CUDA / Triton kernel, which torch.fx and torch.export both
    keep as one opaque node. The scale defaults to ``dim ** -0.5``."""
    return _reference_attention(q, k, v, scale).contiguous()


def _reference_attention(q, k, v, scale=None):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    attn = (q @ k.transpose(-2, -1) * scale).softmax(-1)
    return (attn @ v).transpose(1, 2)


@fused_attention.register_fake
def _(q, k, v, scale=None):
    return q.new_empty(*q.shape[:-1], v.shape[-1])


def _save_inputs(ctx, inputs, output) -> None:
    q, k, v, scale = inputs
    ctx.save_for_backward(q, k, v)
    ctx.scale = scale


def _backward(ctx, grad):
    """A real kernel ships its own backward; this one differentiates the reference code."""
    with torch.enable_grad():
        q, k, v = (t.detach().requires_grad_() for t in ctx.saved_tensors)
        out = _reference_attention(q, k, v, ctx.scale)
        return (*torch.autograd.grad(out, (q, k, v), grad), None)


fused_attention.register_autograd(_backward, setup_context=_save_inputs)


@register_flop_formula(torch.ops.hiap_example.fused_attention)
def _fused_attention_flops(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    """What FlopCounterMode (and so hiap_fx.count_macs) counts for one call: 2 x MACs."""
    b, n, h, d = q_shape
    return 2 * b * h * n * k_shape[1] * (d + v_shape[-1])


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, c // self.heads).unbind(2)
        x = x + self.proj(fused_attention(q, k, v).reshape(b, n, c))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TinyViT(nn.Module):
    """Patch embedding, a class token, ``depth`` blocks (of the attention above unless another
    ``block`` class is given), a linear head."""

    def __init__(self, dim: int = 48, heads: int = 4, depth: int = 3, classes: int = 4,
                 block: type[nn.Module] = Block) -> None:
        super().__init__()
        self.embed = nn.Conv2d(1, dim, 4, 4)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, 17, dim) * 0.02)
        self.blocks = nn.ModuleList(block(dim, heads) for _ in range(depth))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x[:, 0]))


def quadrant_batch(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """16x16 noise images with a bright 8x8 square in one quadrant; the label is the quadrant."""
    x = torch.randn(n, 1, 16, 16, generator=gen) * 0.5
    y = torch.randint(0, 4, (n,), generator=gen)
    for i, q in enumerate(y.tolist()):
        r, c = divmod(q, 2)
        x[i, 0, 8 * r:8 * r + 8, 8 * c:8 * c + 8] += 1.5
    return x, y


def accuracy_of(model: nn.Module, gen: torch.Generator) -> float:
    x, y = quadrant_batch(512, gen)
    with torch.no_grad():
        return (model.eval()(x).argmax(-1) == y).float().mean().item()


def train_dense(model: nn.Module, gen: torch.Generator, steps: int = 150) -> nn.Module:
    """A few hundred images are enough for this task; the pruning run starts from this model."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(steps):
        x, y = quadrant_batch(64, gen)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def train_and_finalize(prepared: hiap_fx.PreparedModel, gen: torch.Generator, steps: int):
    """The own-loop path on the quadrant task: task loss + ``hiap_loss()`` for ``steps`` steps
    (weights and gate logits with their own learning rates), land on the budget, then
    ``finalize`` (which verifies output and MACs). Returns the compact model and its largest
    difference to the hard-gated model on fresh images."""
    gates = [g.logits for g in prepared.gate_modules().values()]
    gate_ids = {id(g) for g in gates}
    weights = [p for p in prepared.parameters() if id(p) not in gate_ids]
    optimizer = torch.optim.AdamW([{"params": weights, "lr": 1e-3},
                                   {"params": gates, "lr": 10 * prepared.config.gate_init / steps,
                                    "weight_decay": 0.0}])
    prepared.train()
    for step in range(steps):
        prepared.schedule(step, steps)
        x, y = quadrant_batch(64, gen)
        loss = F.cross_entropy(prepared(x), y) + prepared.hiap_loss()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    prepared.land_on_budget()
    compact = hiap_fx.finalize(prepared)
    x, _ = quadrant_batch(256, gen)
    with torch.no_grad():
        gap = (compact(x) - prepared.eval()(x)).abs().max().item()
    return compact, gap


def main(steps: int = 60, target: float = 0.5) -> dict:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = train_dense(TinyViT(), gen)
    example, _ = quadrant_batch(2, gen)

    # 1. Out of the box: the FFNs are found, the attention is not, and prepare says why.
    try:
        hiap_fx.prepare(model, example)
        raise SystemExit("expected hiap_fx to refuse this model before the kernel is registered")
    except hiap_fx.NoAttentionError as exc:
        print(f"before registering: {type(exc).__name__}: {str(exc)[:160]}...")

    # 2. Teach it the kernel: layout and the keyword that carries its softmax scale.
    hiap_fx.register_attention_kernel(hiap_fx.AttentionKernel(
        name="fused_attention", function=fused_attention, layout="BNHD", scale_arg="scale"))
    config = hiap_fx.PruneConfig(target_macs=target, qk_dims=True)
    prepared = hiap_fx.prepare(model, example, config)
    print(prepared.plan.summary())

    # 3. Train: task loss + HiAP loss, the documented own-loop path; 4. finalize and verify.
    compact, gap = train_and_finalize(prepared, gen, steps)
    dense_accuracy, accuracy = accuracy_of(model, gen), accuracy_of(compact, gen)
    dense, kept = hiap_fx.count_macs(model, example), hiap_fx.count_macs(compact, example)
    heads = {s.name: int(prepared.decisions().get(f"{s.name}.head", torch.ones(s.num_heads)).sum())
             for s in prepared.plan.attention}
    print(f"kernel sites: {[s.kernel for s in prepared.plan.attention]}")
    print(f"heads kept per site: {heads}")
    print(f"MACs: {dense:,} -> {kept:,} ({100 * kept / dense:.1f}%), accuracy {100 * dense_accuracy:.1f}% "
          f"-> {100 * accuracy:.1f}%, max |compact - prepared| = {gap:.1e}")
    return {"dense_macs": dense, "compact_macs": kept, "dense_accuracy": dense_accuracy,
            "accuracy": accuracy, "gap": gap,
            "sites": len(prepared.plan.attention), "heads": heads}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--target", type=float, default=0.5)
    args = parser.parse_args()
    main(args.steps, args.target)
