"""Rewrites for torch.nn modules that fx cannot see into or that cannot be cut in place.

``nn.MultiheadAttention`` is an opaque leaf whose heads cannot be sliced (its internal width must
equal ``embed_dim``), and ``nn.TransformerEncoder(Layer)`` branch on tensor properties for their
fast paths. Each is replaced, before tracing, by an equivalent module written in plain ops.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from hiap_fx.errors import CaptureError
from hiap_fx.registry import ModuleRewrite, register_module_rewrite


def _linear(weight: torch.Tensor, bias: Optional[torch.Tensor]) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                    device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin


class DecomposedMultiheadAttention(nn.Module):
    """Numerically equivalent stand-in for ``nn.MultiheadAttention`` with separate q/k/v Linears."""

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        if mha.bias_k is not None or mha.add_zero_attn:
            raise CaptureError(
                "nn.MultiheadAttention with add_bias_kv or add_zero_attn is not supported; "
                "build the model without them or register a module rewrite for it"
            )
        e = mha.embed_dim
        self.num_heads = mha.num_heads
        self.head_dim = e // mha.num_heads
        self.batch_first = mha.batch_first
        self.dropout = mha.dropout
        bias = mha.in_proj_bias
        if mha._qkv_same_embed_dim:
            wq, wk, wv = mha.in_proj_weight.detach().chunk(3, dim=0)
        else:
            wq, wk, wv = (mha.q_proj_weight.detach(), mha.k_proj_weight.detach(),
                          mha.v_proj_weight.detach())
        bq, bk, bv = bias.detach().chunk(3) if bias is not None else (None, None, None)
        self.q_proj, self.k_proj, self.v_proj = _linear(wq, bq), _linear(wk, bk), _linear(wv, bv)
        self.out_proj = _linear(mha.out_proj.weight.detach(),
                                None if mha.out_proj.bias is None else mha.out_proj.bias.detach())

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[torch.Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False):
        if not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        b, n = query.shape[0], query.shape[1]
        s = key.shape[1]
        q = self.q_proj(query).reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(key).reshape(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(value).reshape(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        mask = _merge_masks(attn_mask, key_padding_mask, q.dtype, b, self.num_heads)
        scale = self.head_dim ** -0.5
        weights = None
        if need_weights:
            logits = (q * scale) @ k.transpose(-2, -1)
            if mask is not None:
                logits = logits + mask
            attn = logits.softmax(dim=-1)
            weights = attn.mean(dim=1) if average_attn_weights else attn
            attn = F.dropout(attn, p=self.dropout, training=self.training)
            out = attn @ v
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
                is_causal=is_causal and mask is None, scale=scale)
        out = self.out_proj(out.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim))
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights


def _merge_masks(attn_mask: Optional[torch.Tensor], key_padding_mask: Optional[torch.Tensor],
                 dtype: torch.dtype, b: int, h: int) -> Optional[torch.Tensor]:
    """Additive float mask of shape broadcastable to (B, H, N, S) from nn.MHA's two masks."""
    mask = None
    if attn_mask is not None:
        mask = _to_additive(attn_mask, dtype)
        if mask.dim() == 3:
            mask = mask.reshape(b, h, mask.shape[-2], mask.shape[-1])
    if key_padding_mask is not None:
        kpm = _to_additive(key_padding_mask, dtype)[:, None, None, :]
        mask = kpm if mask is None else mask + kpm
    return mask


def _to_additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


class DecomposedEncoderLayer(nn.Module):
    """Equivalent of ``nn.TransformerEncoderLayer`` (no fast path, attention decomposed)."""

    def __init__(self, layer: nn.TransformerEncoderLayer) -> None:
        super().__init__()
        self.self_attn = DecomposedMultiheadAttention(layer.self_attn)
        self.linear1, self.linear2 = copy.deepcopy(layer.linear1), copy.deepcopy(layer.linear2)
        self.dropout = copy.deepcopy(layer.dropout)
        self.norm1, self.norm2 = copy.deepcopy(layer.norm1), copy.deepcopy(layer.norm2)
        self.dropout1, self.dropout2 = copy.deepcopy(layer.dropout1), copy.deepcopy(layer.dropout2)
        self.norm_first = layer.norm_first
        act = layer.activation
        self.activation = copy.deepcopy(act) if isinstance(act, nn.Module) else _ActivationFn(act)

    def forward(self, src: torch.Tensor, src_mask: Optional[torch.Tensor] = None,
                src_key_padding_mask: Optional[torch.Tensor] = None, is_causal: bool = False):
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal)
            x = x + self._ff_block(self.norm2(x))
        else:
            x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal))
            x = self.norm2(x + self._ff_block(x))
        return x

    def _sa_block(self, x, attn_mask, key_padding_mask, is_causal):
        x = self.self_attn(x, x, x, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                           need_weights=False, is_causal=is_causal)[0]
        return self.dropout1(x)

    def _ff_block(self, x):
        x = self.linear2(self.dropout(self.activation(self.linear1(x))))
        return self.dropout2(x)


class _ActivationFn(nn.Module):
    """Wraps a functional activation (e.g. ``F.relu``) as a module."""

    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


class DecomposedEncoder(nn.Module):
    """Equivalent of ``nn.TransformerEncoder`` (layers in sequence, optional final norm)."""

    def __init__(self, encoder: nn.TransformerEncoder) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            DecomposedEncoderLayer(l) if isinstance(l, nn.TransformerEncoderLayer) else copy.deepcopy(l)
            for l in encoder.layers)
        self.norm = copy.deepcopy(encoder.norm)

    def forward(self, src: torch.Tensor, mask: Optional[torch.Tensor] = None,
                src_key_padding_mask: Optional[torch.Tensor] = None, is_causal: Optional[bool] = None):
        x = src
        for layer in self.layers:
            x = layer(x, src_mask=mask, src_key_padding_mask=src_key_padding_mask,
                      is_causal=bool(is_causal))
        if self.norm is not None:
            x = self.norm(x)
        return x


register_module_rewrite(ModuleRewrite(
    "nn.TransformerEncoder", lambda m: type(m) is nn.TransformerEncoder, DecomposedEncoder))
register_module_rewrite(ModuleRewrite(
    "nn.TransformerEncoderLayer", lambda m: type(m) is nn.TransformerEncoderLayer,
    DecomposedEncoderLayer))
register_module_rewrite(ModuleRewrite(
    "nn.MultiheadAttention", lambda m: isinstance(m, nn.MultiheadAttention),
    DecomposedMultiheadAttention))
