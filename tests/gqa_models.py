"""A small grouped-query-attention model (kv heads shared by groups of query heads), written three
ways: k/v repeated with ``repeat_interleave``, with Llama's ``repeat_kv`` (expand + reshape), or
left to ``sdpa(enable_gqa=True)``; plus a manual-softmax variant."""

from __future__ import annotations

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

    def forward(self, x):
        B, N, _ = x.shape
        q = self.q(x).view(B, N, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(B, N, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(B, N, self.kv_heads, self.head_dim).transpose(1, 2)
        group = self.heads // self.kv_heads
        if self.repeat == "interleave":
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
