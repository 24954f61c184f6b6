"""A small grouped-query-attention model (kv heads shared by groups of query heads), written three
ways: k/v repeated with ``repeat_interleave``, with Llama's ``repeat_kv`` (expand + reshape), or
left to ``sdpa(enable_gqa=True)``; plus a manual-softmax variant, and ``interleave_rope``: q and
k RMS-normalised per head and rotated (rotary halves) per kv head *before* the repeat, as in
Sapiens2's middle blocks and most LLM-style encoders."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GQA(nn.Module):
    """q: heads x head_dim; k, v: kv_heads x head_dim, each shared by heads // kv_heads queries."""

    def __init__(self, dim: int = 32, heads: int = 4, kv_heads: int = 2, head_dim: int = 8,
                 repeat: str = "interleave", manual: bool = False) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.repeat, self.manual = repeat, manual
        self.q = nn.Linear(dim, heads * head_dim)
        self.k = nn.Linear(dim, kv_heads * head_dim)
        self.v = nn.Linear(dim, kv_heads * head_dim)
        self.o = nn.Linear(heads * head_dim, dim)
        if repeat == "interleave_rope":
            self.q_norm, self.k_norm = nn.RMSNorm(head_dim), nn.RMSNorm(head_dim)
            with torch.no_grad():
                self.q_norm.weight.add_(torch.rand(head_dim))
                self.k_norm.weight.add_(torch.rand(head_dim))


    def _rotate(self, t):
        """Rotary embedding over two halves of each head's dims, one angle per (token, dim pair)."""
        half = self.head_dim // 2  # a Python int: no branch on a traced size
        if half == 0:
            return t
        # tables for the sequence's length in the activations' dtype, as HF's rotary embeddings
        angle = torch.arange(t.shape[-2], dtype=t.dtype)[:, None] * (0.3 + torch.arange(half, dtype=t.dtype))
        cos, sin = angle.cos().repeat(1, 2), angle.sin().repeat(1, 2)
        if self.head_dim % 2:
            cos, sin = F.pad(cos, (0, 1), value=1.0), F.pad(sin, (0, 1))
        a, b = t[..., :half], t[..., half:2 * half]
        rotated = torch.cat([-b, a, t[..., 2 * half:]] if self.head_dim % 2 else [-b, a], -1)
        return t * cos + rotated * sin

    def forward(self, x):
        B, N, _ = x.shape
        q = self.q(x).view(B, N, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(B, N, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(B, N, self.kv_heads, self.head_dim).transpose(1, 2)
        group = self.heads // self.kv_heads
        if self.repeat == "interleave_rope":
            q, k = self._rotate(self.q_norm(q)), self._rotate(self.k_norm(k))
        if self.repeat in ("interleave", "interleave_rope"):
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        elif self.repeat == "expand":  # transformers' repeat_kv
            k, v = (t[:, :, None].expand(B, self.kv_heads, group, N, self.head_dim)
                    .reshape(B, self.heads, N, self.head_dim) for t in (k, v))
        if self.manual:
            attn = (q @ k.transpose(-2, -1) * self.head_dim ** -0.5).softmax(-1)
            out = attn @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, enable_gqa=self.repeat == "sdpa")
        return self.o(out.transpose(1, 2).reshape(B, N, -1))


class GQANet(nn.Module):
    """Token embedding, one pre-norm GQA block with an FFN, mean pooling, classifier."""

    def __init__(self, **attn_kwargs) -> None:
        super().__init__()
        self.emb = nn.Linear(5, 32)
        self.norm = nn.LayerNorm(32)
        self.attn = GQA(**attn_kwargs)
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 32)
        self.head = nn.Linear(32, 3)

    def forward(self, x):
        x = self.emb(x)
        x = x + self.attn(self.norm(x))
        x = x + self.fc2(F.gelu(self.fc1(x)))
        return self.head(x.mean(1))
