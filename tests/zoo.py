"""A zoo of tiny, hand-written vision transformers used as test subjects.

Everything here is plain PyTorch (no timm, no hiap_fx).  The models are
deliberately written with *different* code spellings -- fused / separate /
chunked / q+kv projections, SDPA vs. manual attention, module vs. functional
ops, pre- vs. post-norm, plain vs. gated FFN -- so that structure discovery
has to work from graph patterns rather than from module names.

Public API
----------
* ``ViTSpec`` / ``SpecViT``: a configurable ViT covering the combinations.
* ``all_specs()``: every ``qkv x attn x norm x ffn x pool`` combination.
* ``expected_for_spec(spec)``: the true structure of a ``SpecViT``.
* Fixed factories: ``tiny_vit_separate``, ``tiny_vit_functional``,
  ``tiny_vit_einops_free_unflatten``, ``tiny_vit_mha``,
  ``tiny_vit_encoder_layer``; their true structure is in ``EXPECTED``.
* ``FACTORIES`` (name -> factory) and ``FX_TRACEABLE`` (names whose attention
  is visible to a plain ``symbolic_trace``; the MHA/TransformerEncoder ones
  hide it inside leaf ``torch.nn`` modules).
* ``DropPath``, ``ZooTracer`` (a tracer that keeps ``DropPath`` a leaf),
  ``zoo_trace(model)`` and ``example_input(model_or_spec, batch)``.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

import hiap_fx

__all__ = [
    "ViTSpec",
    "SpecViT",
    "DropPath",
    "ZooTracer",
    "zoo_trace",
    "all_specs",
    "expected_for_spec",
    "example_input",
    "tiny_vit_separate",
    "tiny_vit_functional",
    "tiny_vit_einops_free_unflatten",
    "tiny_vit_mha",
    "tiny_vit_encoder_layer",
    "EXPECTED",
    "FACTORIES",
    "FX_TRACEABLE",
    "QKV_KINDS",
    "ATTN_KINDS",
    "NORM_KINDS",
    "FFN_KINDS",
    "POOL_KINDS",
]

QKV_KINDS: tuple[str, ...] = ("fused", "separate", "chunked", "q_kv")
ATTN_KINDS: tuple[str, ...] = ("sdpa", "manual")
NORM_KINDS: tuple[str, ...] = ("pre", "post")
FFN_KINDS: tuple[str, ...] = ("plain", "gated")
POOL_KINDS: tuple[str, ...] = ("cls", "mean")


# --------------------------------------------------------------------------
# Shared small pieces
# --------------------------------------------------------------------------


@hiap_fx.register_safe_module  # a user's own leaf: hiap_fx.load may rebuild it from a file
class DropPath(nn.Module):
    """Stochastic depth; the identity when not training or when ``rate == 0``."""

    def __init__(self, rate: float = 0.0) -> None:
        super().__init__()
        self.rate = float(rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        shape = (x.shape[0],) + (1,) * (x.dim() - 1)
        mask = x.new_empty(shape).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"rate={self.rate}"


class ZooTracer(torch.fx.Tracer):
    """``torch.fx`` tracer that keeps ``DropPath`` as a leaf module."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, DropPath):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def zoo_trace(model: nn.Module) -> torch.fx.GraphModule:
    """Symbolically trace ``model`` with :class:`ZooTracer`."""
    graph = ZooTracer().trace(model)
    name = type(model).__name__
    return torch.fx.GraphModule(model, graph, name)


def _uniform_(t: torch.Tensor, fan_in: int) -> torch.Tensor:
    """In-place U(-1/sqrt(fan_in), 1/sqrt(fan_in)), like ``nn.Linear``'s default."""
    bound = 1.0 / math.sqrt(fan_in)
    with torch.no_grad():
        return t.uniform_(-bound, bound)


# --------------------------------------------------------------------------
# Configurable ViT
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class ViTSpec:
    """Configuration of a :class:`SpecViT`.

    ``inner = heads * head_dim`` may differ from ``dim``.  For ``ffn='gated'``
    ``mlp_hidden`` is the width after the gate (``fc1`` outputs twice that).
    """

    img_size: int = 16
    patch: int = 4
    in_chans: int = 3
    dim: int = 32
    depth: int = 2
    heads: int = 4
    head_dim: int = 8
    mlp_hidden: int = 64
    num_classes: int = 10
    qkv: str = "fused"  # 'fused' | 'separate' | 'chunked' | 'q_kv'
    attn: str = "sdpa"  # 'sdpa' | 'manual'
    norm: str = "pre"  # 'pre' | 'post'
    ffn: str = "plain"  # 'plain' | 'gated'
    pool: str = "cls"  # 'cls' | 'mean'
    qkv_bias: bool = True
    layer_scale: bool = False
    drop_path: float = 0.0
    extra_tokens: int = 0  # learned register tokens appended after the class token

    def __post_init__(self) -> None:
        for field, allowed in (
            ("qkv", QKV_KINDS),
            ("attn", ATTN_KINDS),
            ("norm", NORM_KINDS),
            ("ffn", FFN_KINDS),
            ("pool", POOL_KINDS),
        ):
            value = getattr(self, field)
            if value not in allowed:
                raise ValueError(f"ViTSpec.{field}={value!r}; expected one of {allowed}")
        if self.img_size % self.patch:
            raise ValueError("img_size must be a multiple of patch")

    @property
    def inner(self) -> int:
        """Attention width ``heads * head_dim``."""
        return self.heads * self.head_dim

    @property
    def num_patches(self) -> int:
        """Number of patch tokens."""
        return (self.img_size // self.patch) ** 2


class _SpecAttention(nn.Module):
    """Multi-head self-attention whose q/k/v spelling is chosen by the spec."""

    def __init__(self, spec: ViTSpec) -> None:
        super().__init__()
        self.kind = spec.qkv
        self.manual = spec.attn == "manual"
        self.num_heads = spec.heads
        self.head_dim = spec.head_dim
        self.scale = spec.head_dim**-0.5
        inner, bias = spec.inner, spec.qkv_bias
        if spec.qkv in ("fused", "chunked"):
            self.qkv = nn.Linear(spec.dim, 3 * inner, bias=bias)
        elif spec.qkv == "separate":
            self.q = nn.Linear(spec.dim, inner, bias=bias)
            self.k = nn.Linear(spec.dim, inner, bias=bias)
            self.v = nn.Linear(spec.dim, inner, bias=bias)
        else:  # q_kv
            self.q = nn.Linear(spec.dim, inner, bias=bias)
            self.kv = nn.Linear(spec.dim, 2 * inner, bias=bias)
        self.proj = nn.Linear(inner, spec.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        if self.kind == "fused":
            qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        elif self.kind == "chunked":
            q, k, v = self.qkv(x).chunk(3, dim=-1)
            q = q.reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)
            k = k.reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)
            v = v.reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        elif self.kind == "separate":
            q = self.q(x).reshape(B, N, self.num_heads, self.head_dim).permute(0, 2, 1, 3)
            k = self.k(x).reshape(B, N, self.num_heads, self.head_dim).permute(0, 2, 1, 3)
            v = self.v(x).reshape(B, N, self.num_heads, self.head_dim).permute(0, 2, 1, 3)
        else:  # q_kv, as in pvt_v2
            q = self.q(x).reshape(B, N, self.num_heads, self.head_dim).permute(0, 2, 1, 3)
            kv = self.kv(x).reshape(B, -1, 2, self.num_heads, self.head_dim)
            k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)

        if self.manual:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            attn = attn.softmax(dim=-1)
            x = attn @ v
        else:
            x = F.scaled_dot_product_attention(q, k, v)
        x = x.transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim)
        return self.proj(x)


class _PlainMlp(nn.Module):
    """Linear -> GELU -> Linear."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _GatedMlp(nn.Module):
    """SwiGLU: one Linear(dim, 2*hidden), chunk, silu(a) * b, Linear(hidden, dim)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, 2 * hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(F.silu(a) * b)


class _LayerScale(nn.Module):
    """Per-channel learnable gamma multiplied on a branch output."""

    def __init__(self, dim: int, init: float = 0.1) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class _SpecBlock(nn.Module):
    """One transformer block (pre- or post-norm)."""

    def __init__(self, spec: ViTSpec) -> None:
        super().__init__()
        self.pre_norm = spec.norm == "pre"
        self.norm1 = nn.LayerNorm(spec.dim)
        self.attn = _SpecAttention(spec)
        self.norm2 = nn.LayerNorm(spec.dim)
        mlp_cls = _GatedMlp if spec.ffn == "gated" else _PlainMlp
        self.mlp = mlp_cls(spec.dim, spec.mlp_hidden)
        self.ls1: nn.Module = _LayerScale(spec.dim) if spec.layer_scale else nn.Identity()
        self.ls2: nn.Module = _LayerScale(spec.dim) if spec.layer_scale else nn.Identity()
        self.drop_path1 = DropPath(spec.drop_path)
        self.drop_path2 = DropPath(spec.drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_norm:
            x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
            x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        else:
            x = self.norm1(x + self.drop_path1(self.ls1(self.attn(x))))
            x = self.norm2(x + self.drop_path2(self.ls2(self.mlp(x))))
        return x


class SpecViT(nn.Module):
    """A small ViT built from a :class:`ViTSpec`; returns ``(B, num_classes)`` logits."""

    def __init__(self, spec: ViTSpec) -> None:
        super().__init__()
        self.spec = spec
        self.img_size = spec.img_size
        self.in_chans = spec.in_chans
        self.patch_embed = nn.Conv2d(spec.in_chans, spec.dim, spec.patch, stride=spec.patch)
        self.use_cls = spec.pool == "cls"
        n_tokens = spec.num_patches + (1 if self.use_cls else 0) + spec.extra_tokens
        if self.use_cls:
            self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, spec.dim))
        if spec.extra_tokens:
            self.reg_tokens = nn.Parameter(0.02 * torch.randn(1, spec.extra_tokens, spec.dim))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, n_tokens, spec.dim))
        self.blocks = nn.Sequential(*[_SpecBlock(spec) for _ in range(spec.depth)])
        self.norm = nn.LayerNorm(spec.dim)
        self.head = nn.Linear(spec.dim, spec.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        B = x.shape[0]
        if self.spec.extra_tokens:
            x = torch.cat([self.reg_tokens.expand(B, -1, -1), x], dim=1)
        if self.use_cls:
            x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)
        x = x + self.pos_embed
        x = self.blocks(x)
        x = self.norm(x)
        x = x[:, 0] if self.use_cls else x.mean(dim=1)
        return self.head(x)


def all_specs(**overrides: object) -> list[ViTSpec]:
    """Every ``qkv x attn x norm x ffn x pool`` combination (other fields from ``overrides``)."""
    return [
        ViTSpec(qkv=q, attn=a, norm=n, ffn=f, pool=p, **overrides)  # type: ignore[arg-type]
        for q, a, n, f, p in itertools.product(QKV_KINDS, ATTN_KINDS, NORM_KINDS, FFN_KINDS, POOL_KINDS)
    ]


def expected_for_spec(spec: ViTSpec) -> dict:
    """True structure of ``SpecViT(spec)``: depth, heads, head_dim, hidden (per block)."""
    return dict(
        depth=spec.depth,
        heads=spec.heads,
        head_dim=spec.head_dim,
        hidden=[spec.mlp_hidden] * spec.depth,
    )


def example_input(model_or_spec: nn.Module | ViTSpec, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """A deterministic ``(batch, in_chans, img_size, img_size)`` image batch."""
    img, chans = model_or_spec.img_size, model_or_spec.in_chans
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, chans, img, img, generator=gen)


# --------------------------------------------------------------------------
# Fixed model 1: BERT-style, separate q/k/v, post-norm, mean pooling, ReLU
# --------------------------------------------------------------------------


class _BertSelfAttention(nn.Module):
    """Separate query/key/value Linears, ``view + transpose``, matmul + F.softmax."""

    def __init__(self, hidden_size: int, n_heads: int, head_size: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.head_size = head_size
        all_head = n_heads * head_size
        self.query = nn.Linear(hidden_size, all_head)
        self.key = nn.Linear(hidden_size, all_head)
        self.value = nn.Linear(hidden_size, all_head)
        self.dropout = nn.Dropout(0.1)
        self.dense = nn.Linear(all_head, hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        B, N, _ = hidden.shape
        H, D = self.n_heads, self.head_size
        q = self.query(hidden).view(B, N, H, D).transpose(1, 2)
        k = self.key(hidden).view(B, N, H, D).transpose(1, 2)
        v = self.value(hidden).view(B, N, H, D).transpose(1, 2)
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_size)
        probs = self.dropout(F.softmax(scores, dim=-1))
        ctx = torch.matmul(probs, v)
        ctx = ctx.transpose(1, 2).contiguous().view(B, N, H * D)
        return self.dense(ctx)


class _BertLayer(nn.Module):
    """Post-norm block: ``x = ln(x + attn(x))``, ``x = ln(x + ffn(x))``."""

    def __init__(self, hidden_size: int, n_heads: int, head_size: int, intermediate: int) -> None:
        super().__init__()
        self.attention = _BertSelfAttention(hidden_size, n_heads, head_size)
        self.attention_ln = nn.LayerNorm(hidden_size, eps=1e-12)
        self.intermediate = nn.Linear(hidden_size, intermediate)
        self.intermediate_act = nn.ReLU()
        self.output = nn.Linear(intermediate, hidden_size)
        self.output_dropout = nn.Dropout(0.1)
        self.output_ln = nn.LayerNorm(hidden_size, eps=1e-12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attention_ln(x + self.attention(x))
        h = self.output_dropout(self.output(self.intermediate_act(self.intermediate(x))))
        return self.output_ln(x + h)


class _TinyViTSeparate(nn.Module):
    """dim 48, 3 heads x 16, mlp 96, depth 2; patchify by reshape + Linear, mean pool."""

    img_size = 16
    in_chans = 3

    def __init__(self) -> None:
        super().__init__()
        self.patch = 4
        self.to_patch = nn.Linear(3 * 4 * 4, 48)
        self.position = nn.Parameter(0.02 * torch.randn(1, 16, 48))
        self.encoder = nn.ModuleList([_BertLayer(48, 3, 16, 96) for _ in range(2)])
        self.classifier = nn.Linear(48, 10)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        B, C, H, W = pixels.shape
        p = self.patch
        x = pixels.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1)
        x = self.to_patch(x.reshape(B, (H // p) * (W // p), p * p * C))
        x = x + self.position
        for layer in self.encoder:
            x = layer(x)
        return self.classifier(x.mean(1))


def tiny_vit_separate(seed: int = 0) -> nn.Module:
    """BERT-style ViT: separate q/k/v, post-norm, ReLU, mean pooling (eval mode)."""
    torch.manual_seed(seed)
    return _TinyViTSeparate().eval()


# --------------------------------------------------------------------------
# Fixed model 2: fully functional, raw parameters, F.linear / F.layer_norm
# --------------------------------------------------------------------------


class _FunctionalBlock(nn.Module):
    """Pre-norm block written with raw Parameters and ``torch.nn.functional``."""

    def __init__(self, dim: int, heads: int, head_dim: int, hidden: int) -> None:
        super().__init__()
        self.dim, self.heads, self.head_dim = dim, heads, head_dim
        inner = heads * head_dim
        self.ln1_w = nn.Parameter(torch.ones(dim))
        self.ln1_b = nn.Parameter(torch.zeros(dim))
        self.w_qkv = nn.Parameter(_uniform_(torch.empty(3 * inner, dim), dim))
        self.b_qkv = nn.Parameter(_uniform_(torch.empty(3 * inner), dim))
        self.w_o = nn.Parameter(_uniform_(torch.empty(dim, inner), inner))
        self.b_o = nn.Parameter(_uniform_(torch.empty(dim), inner))
        self.ln2_w = nn.Parameter(torch.ones(dim))
        self.ln2_b = nn.Parameter(torch.zeros(dim))
        self.w_in = nn.Parameter(_uniform_(torch.empty(hidden, dim), dim))
        self.b_in = nn.Parameter(_uniform_(torch.empty(hidden), dim))
        self.w_out = nn.Parameter(_uniform_(torch.empty(dim, hidden), hidden))
        self.b_out = nn.Parameter(_uniform_(torch.empty(dim), hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        h = F.layer_norm(x, (C,), self.ln1_w, self.ln1_b, eps=1e-6)
        H, D = self.heads, self.head_dim
        qkv = F.linear(h, self.w_qkv, self.b_qkv).reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        a = F.scaled_dot_product_attention(q, k, v, scale=1.0 / math.sqrt(D))
        a = a.permute(0, 2, 1, 3).reshape(B, N, H * D)
        x = x + F.linear(a, self.w_o, self.b_o)
        h = F.layer_norm(x, (C,), self.ln2_w, self.ln2_b, eps=1e-6)
        h = F.linear(F.gelu(F.linear(h, self.w_in, self.b_in)), self.w_out, self.b_out)
        return x + h


class _TinyViTFunctional(nn.Module):
    """dim 40, 5 heads x 8, mlp 80, depth 2; F.conv2d patches, cls pooling."""

    img_size = 16
    in_chans = 3

    def __init__(self) -> None:
        super().__init__()
        self.patch_w = nn.Parameter(_uniform_(torch.empty(40, 3, 4, 4), 3 * 4 * 4))
        self.patch_b = nn.Parameter(_uniform_(torch.empty(40), 3 * 4 * 4))
        self.cls = nn.Parameter(0.02 * torch.randn(1, 1, 40))
        self.pos = nn.Parameter(0.02 * torch.randn(1, 17, 40))
        self.block0 = _FunctionalBlock(40, 5, 8, 80)
        self.block1 = _FunctionalBlock(40, 5, 8, 80)
        self.norm_w = nn.Parameter(torch.ones(40))
        self.norm_b = nn.Parameter(torch.zeros(40))
        self.head_w = nn.Parameter(_uniform_(torch.empty(10, 40), 40))
        self.head_b = nn.Parameter(_uniform_(torch.empty(10), 40))

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(img, self.patch_w, self.patch_b, stride=4)
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat((self.cls.expand(x.shape[0], -1, -1), x), dim=1) + self.pos
        x = self.block1(self.block0(x))
        x = F.layer_norm(x, (40,), self.norm_w, self.norm_b, eps=1e-6)
        return F.linear(x[:, 0], self.head_w, self.head_b)


def tiny_vit_functional(seed: int = 0) -> nn.Module:
    """Functional ViT: raw Parameters, F.linear, fused qkv indexed by [0]/[1]/[2] (eval mode)."""
    torch.manual_seed(seed)
    return _TinyViTFunctional().eval()


# --------------------------------------------------------------------------
# Fixed model 3: unflatten qkv, q @ k.mT, nn.Softmax, per-block hidden widths
# --------------------------------------------------------------------------


class _UnflattenAttention(nn.Module):
    """Fused qkv split with ``unflatten(-1, (3, H, D))`` and ``unbind(2)``."""

    def __init__(self, dim: int, heads: int = 2, head_dim: int = 12) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.to_qkv = nn.Linear(dim, 3 * heads * head_dim, bias=False)
        self.softmax = nn.Softmax(dim=-1)
        self.to_out = nn.Linear(heads * head_dim, dim)
        self.scale = head_dim**-0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.to_qkv(x).unflatten(-1, (3, self.heads, self.head_dim))
        q, k, v = qkv.unbind(dim=2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        weights = self.softmax((q @ k.mT) * self.scale)
        out = (weights @ v).transpose(1, 2).flatten(2)
        return self.to_out(out)


class _UnflattenBlock(nn.Module):
    """Pre-norm (RMSNorm) block with an ``nn.Sequential`` FFN of a given hidden width."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.n1 = nn.RMSNorm(dim, eps=1e-6)
        self.mix = _UnflattenAttention(dim)
        self.n2 = nn.RMSNorm(dim, eps=1e-6)
        self.ff = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mix(self.n1(x)) + x
        return self.ff(self.n2(x)) + x


class _TinyViTUnflatten(nn.Module):
    """dim 24, 2 heads x 12, hidden [64, 96], depth 2; cls pooling."""

    img_size = 16
    in_chans = 3

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 24, kernel_size=4, stride=4)
        self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, 24))
        self.pos_embedding = nn.Parameter(0.02 * torch.randn(1, 17, 24))
        self.layers = nn.ModuleList([_UnflattenBlock(24, 64), _UnflattenBlock(24, 96)])
        self.final_norm = nn.RMSNorm(24, eps=1e-6)
        self.fc = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x).flatten(2).mT
        cls = self.cls_token.expand(x.shape[0], 1, 24)
        x = torch.cat([cls, x], 1) + self.pos_embedding
        for blk in self.layers:
            x = blk(x)
        return self.fc(self.final_norm(x)[:, 0, :])


def tiny_vit_einops_free_unflatten(seed: int = 0) -> nn.Module:
    """ViT with ``unflatten`` qkv, ``q @ k.mT``, nn.Softmax and per-block FFN widths (eval mode)."""
    torch.manual_seed(seed)
    return _TinyViTUnflatten().eval()


# --------------------------------------------------------------------------
# Fixed models 4/5: torch.nn.MultiheadAttention / TransformerEncoder
# --------------------------------------------------------------------------


class _MhaBlock(nn.Module):
    """Pre-norm block around ``nn.MultiheadAttention(batch_first=True)``."""

    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class _TinyViTMha(nn.Module):
    """dim 32, 4 heads x 8, mlp 64, depth 2; cls pooling."""

    img_size = 16
    in_chans = 3

    def __init__(self) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, 32, 4, stride=4)
        self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, 32))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, 17, 32))
        self.blocks = nn.Sequential(_MhaBlock(32, 4, 64), _MhaBlock(32, 4, 64))
        self.norm = nn.LayerNorm(32)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


class _TinyViTEncoderLayer(nn.Module):
    """d_model 32, 2 heads x 16, feedforward 48, 2 ``TransformerEncoderLayer``s; mean pool."""

    img_size = 16
    in_chans = 3

    def __init__(self) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, 32, 4, stride=4)
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, 16, 32))
        layer = nn.TransformerEncoderLayer(
            32, 2, 48, batch_first=True, norm_first=True, dropout=0.0
        )
        self.encoder = nn.TransformerEncoder(
            layer, num_layers=2, norm=nn.LayerNorm(32), enable_nested_tensor=False
        )
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed
        return self.head(self.encoder(x).mean(dim=1))


def tiny_vit_mha(seed: int = 0) -> nn.Module:
    """ViT whose blocks call ``nn.MultiheadAttention`` (eval mode)."""
    torch.manual_seed(seed)
    return _TinyViTMha().eval()


def tiny_vit_encoder_layer(seed: int = 0) -> nn.Module:
    """ViT built on ``nn.TransformerEncoder`` with ``norm_first=True`` (eval mode)."""
    torch.manual_seed(seed)
    return _TinyViTEncoderLayer().eval()


EXPECTED: dict[str, dict] = {
    "tiny_vit_separate": dict(depth=2, heads=3, head_dim=16, hidden=[96, 96]),
    "tiny_vit_functional": dict(depth=2, heads=5, head_dim=8, hidden=[80, 80]),
    "tiny_vit_einops_free_unflatten": dict(depth=2, heads=2, head_dim=12, hidden=[64, 96]),
    "tiny_vit_mha": dict(depth=2, heads=4, head_dim=8, hidden=[64, 64]),
    "tiny_vit_encoder_layer": dict(depth=2, heads=2, head_dim=16, hidden=[48, 48]),
}

FACTORIES: dict[str, Callable[..., nn.Module]] = {
    "tiny_vit_separate": tiny_vit_separate,
    "tiny_vit_functional": tiny_vit_functional,
    "tiny_vit_einops_free_unflatten": tiny_vit_einops_free_unflatten,
    "tiny_vit_mha": tiny_vit_mha,
    "tiny_vit_encoder_layer": tiny_vit_encoder_layer,
}

FX_TRACEABLE: tuple[str, ...] = (
    "tiny_vit_separate",
    "tiny_vit_functional",
    "tiny_vit_einops_free_unflatten",
)
