"""Tiny hand-written attention spellings of hybrid and edge models (plain PyTorch, no hiap_fx).

Each block is a pre-norm transformer block over a (B, H, W, C) map or (B, N, C) tokens whose
attention is written the way some efficient family writes it:

* ``grid_out``: the kernel output is reshaped to (B, H, W, C) before the output projection, the
  channel count read from ``x.shape`` (a graph node), a literal, ``-1`` or computed from
  the kernel output (``o.shape[-1] * heads``);
* ``seq_first``: the kernel output is made sequence-first (N, B, C) before the projection;
* ``window``: windowed attention whose output windows are reversed *before* the projection,
  with a window side equal to the head count (a size that must not be rewritten);
* ``res_scale``: MetaFormer's res-scale, ``x * gamma + branch(x)`` for both sub-layers;
* ``conv_qkv``: q/k/v and the output projection are 1x1 convolutions over a (B, C, H, W) map;
* ``einsum``: the kernel as two einsums (``"bhid,bhjd->bhij"``, ``"bhij,bhjd->bhid"``);
* ``v_left``: channels-first heads (B, h, d, N) and values on the left, ``v @ softmax(.)^T``;
* ``bn_rows``: LeViT's linear + BatchNorm1d over its rows (``bn(y.flatten(0, 1)).reshape_as(y)``)
  for q/k/v, and an activation between the kernel output and the projection;
* ``conv_bn``: LeViT's conv mode: q/k/v per head from one 1x1 convolution + BatchNorm2d over a
  (B, C, H, W) map, channels-first heads, ``v @ softmax(q^T k)^T``;
* ``channel``: XCiT's cross-covariance attention: heads as (B, h, d, N), q and k normalised over
  the tokens, a learned temperature per head, a (d x d) attention whose tokens are the head's dims;
* ``nested``: EdgeNeXt's block: the attention's residual stream is inside the FFN's residual
  branch (``shortcut + mlp(x + attn(x))``), so closing the FFN kills the attention too;
* ``clipped``: Gemma4's vision attention: every projection's output clamped to learned bounds,
  an RMS norm per head over q, k and v, a rotary embedding over two halves of each head;
* ``pooled``: MViTv2's attention: q, k, v of each head pooled by a depthwise convolution with
  the heads folded into the batch axis, normalised over the dims, and the queries added to the
  kernel output before the projection (heads only);
* ``partial``: SHViT's attention over part of the channels of a (B, C, H, W) map: q/k/v from a
  1x1 convolution of the first channels, the kernel output concatenated with the other channels,
  an activation, then a 1x1 convolution as the output projection (SHViT itself: one head and
  batch norms after both convolutions, ``_PartialAttention(bn=True)``);
* ``upsampled``: LowFormer's attention at a lower resolution: a strided depthwise convolution
  and a 1x1 convolution make q/k/v of each head on the (H/2, W/2) map, and the output projection
  is a transposed convolution back to (H, W) (``nn.ConvTranspose2d``, cropped);
* ``q_pooled``: Hiera's attention at a stage change: the queries max-pooled over the map, the
  new map size read back from them (``H, W = q.shape[1:3]``) for the output reshape, and the
  block's shortcut pooled alike;
* ``gated``: IFormer's modulated attention over a (B, C, H, W) map: v and a gate from one 1x1
  convolution + BatchNorm2d through a sigmoid, chunked in two, and the output projection reading
  ``attn_out * gate`` (``gated_tokens``: a separate gate linear over tokens, ``sigmoid(g(x))``);
* ``sub_ln`` / ``sub_rms``: BEiT3's and EVA02-CLIP's sub-LN: a layer norm (an RMS norm) over
  the merged head outputs right before the output projection, with a learned gain and bias;
* ``parallel``: ViT-22B's parallel block (timm's ``ParallelScalingBlock``): the MLP's first layer
  and q, k, v from one linear split four ways, the two branches summed, scaled, then added to
  the stream;
* ``folded`` / ``folded_manual``: SAM-ViT's and BoTNet's attention: heads folded into the batch
  axis (``reshape(3, B * heads, N, d)``) and a relative-position term computed from q added to
  the logits (sdpa's mask, or q @ k^T + term).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FORMS = ("grid_out", "seq_first", "window", "res_scale", "conv_qkv", "bn_rows", "einsum", "v_left", "channel",
         "clipped", "conv_bn", "nested", "folded", "folded_manual", "pooled", "partial",
         "upsampled", "q_pooled", "gated", "gated_tokens", "sub_ln", "sub_rms",
         "parallel")
CHANNEL_SPELLINGS = ("shape", "literal", "infer", "kernel")


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _MapAttention(nn.Module):
    """Attention over a (B, H, W, C) map; ``form`` chooses how its output reaches ``proj``."""

    def __init__(self, dim: int, heads: int, head_dim: int, form: str, spelling: str, window: int) -> None:
        super().__init__()
        self.heads, self.head_dim, self.form, self.spelling, self.window = heads, head_dim, form, spelling, window
        inner = heads * head_dim
        self.qkv = nn.Linear(dim, 3 * inner)
        self.proj = nn.Linear(inner, dim)
        self.sub: nn.Module = nn.LayerNorm(inner) if form == "sub_ln" else nn.RMSNorm(inner) \
            if form == "sub_rms" else nn.Identity()
        with torch.no_grad():  # a trained norm's gain and bias, not the identity of a fresh one
            for p in self.sub.parameters():
                p.add_(torch.randn_like(p) * 0.5)

    def _attend(self, t: torch.Tensor) -> torch.Tensor:  # (B', N', C) -> (B', heads, N', d)
        b, n, _ = t.shape
        q, k, v = self.qkv(t).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if self.form == "einsum":
            attn = torch.einsum("bhid,bhjd->bhij", q, k * self.head_dim ** -0.5).softmax(dim=-1)
            return torch.einsum("bhij,bhjd->bhid", attn, v)
        if self.form == "v_left":  # heads as (B', h, d, N'): v @ attn^T
            q, k, v = q.transpose(-2, -1), k.transpose(-2, -1), v.transpose(-2, -1)
            attn = ((q.transpose(-2, -1) @ k) * self.head_dim ** -0.5).softmax(dim=-1)
            return (v @ attn.transpose(-2, -1)).transpose(-2, -1)
        return F.scaled_dot_product_attention(q, k, v)

    def _channels(self, x: torch.Tensor, o: torch.Tensor) -> int:
        if self.spelling == "kernel":
            return o.shape[-1] * self.heads  # the kernel output's width times a literal head count
        if self.spelling == "shape":
            return x.shape[-1]  # C of the input map (= heads * head_dim here): a graph node
        if self.spelling == "literal":
            return self.heads * self.head_dim
        return -1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        if self.form == "window":
            ws = self.window
            t = x.reshape(B, H // ws, ws, W // ws, ws, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, C)
            o = self._attend(t)  # (B*nW, heads, ws*ws, d)
            o = o.transpose(1, 2).reshape(o.shape[0], ws, ws, self._channels(x, o))
            o = o.reshape(B, H // ws, W // ws, ws, ws, -1).permute(0, 1, 3, 2, 4, 5).reshape(B, H, W, -1)
            return self.proj(o)
        o = self._attend(x.reshape(B, H * W, C))
        if self.form in ("einsum", "v_left"):
            return self.proj(o.transpose(1, 2).reshape(B, H, W, -1))
        if self.form == "seq_first":
            o = o.permute(2, 0, 1, 3).reshape(H * W, B, self._channels(x, o))
            return self.proj(o).transpose(0, 1).reshape(B, H, W, -1)
        o = o.transpose(1, 2).reshape(B, H, W, self._channels(x, o))
        return self.proj(self.sub(o))


class _ConvAttention(nn.Module):
    """Attention over a (B, H, W, C) map computed on its (B, C, H, W) transpose with 1x1 convs."""

    def __init__(self, dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.qkv = nn.Conv2d(dim, 3 * heads * head_dim, 1)
        self.proj = nn.Conv2d(heads * head_dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        m = x.permute(0, 3, 1, 2)
        q, k, v = self.qkv(m).reshape(B, 3, self.heads, self.head_dim, H * W).transpose(-1, -2).unbind(1)
        o = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, d)
        o = o.transpose(-1, -2).reshape(B, -1, H, W)
        return self.proj(o).permute(0, 2, 3, 1)


class _ConvBnAttention(nn.Module):
    """LeViT's conv mode: ConvNorm q/k/v rows per head, channels-first heads, values on the left."""

    def __init__(self, dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.qkv = nn.Conv2d(dim, 3 * heads * head_dim, 1, bias=False)
        self.bn = nn.BatchNorm2d(3 * heads * head_dim)
        _trained_statistics(self.bn)
        self.proj = nn.Conv2d(heads * head_dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        m = x.permute(0, 3, 1, 2)
        d = self.head_dim
        q, k, v = self.bn(self.qkv(m)).view(B, self.heads, -1, H * W).split([d, d, d], dim=2)
        attn = ((q.transpose(-2, -1) @ k) * d ** -0.5).softmax(dim=-1)
        o = (v @ attn.transpose(-2, -1)).view(B, -1, H, W)
        return self.proj(o).permute(0, 2, 3, 1)


def _trained_statistics(bn: nn.Module) -> None:
    """Batch-norm statistics as after training (not the identity of a fresh norm)."""
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)


class _LinearNorm(nn.Module):
    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out, bias=False)
        self.bn = nn.BatchNorm1d(dim_out)
        _trained_statistics(self.bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        return self.bn(y.flatten(0, 1)).reshape_as(y)


class _BnRowsAttention(nn.Module):
    """LeViT's spelling: per-head [q | k | v] rows from one linear + batch norm, manual kernel,
    an activation before the projection."""

    def __init__(self, dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.qkv = _LinearNorm(dim, 3 * heads * head_dim)
        self.act = nn.Hardswish()
        self.proj = _LinearNorm(heads * head_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        t = x.reshape(B, H * W, C)
        q, k, v = self.qkv(t).view(B, H * W, self.heads, -1).split([self.head_dim] * 3, dim=3)
        q, k, v = q.permute(0, 2, 1, 3), k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)
        attn = (q @ k.transpose(-2, -1) * self.head_dim ** -0.5).softmax(dim=-1)
        o = (attn @ v).transpose(1, 2).reshape(B, H * W, self.heads * self.head_dim)
        return self.proj(self.act(o)).reshape(B, H, W, C)


class _ChannelAttention(nn.Module):
    """XCiT's cross-covariance attention: a (d x d) attention per head over its channels."""

    def __init__(self, dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.qkv = nn.Linear(dim, 3 * heads * head_dim)
        self.temperature = nn.Parameter(torch.rand(heads, 1, 1) + 0.5)
        self.proj = nn.Linear(heads * head_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        t = x.reshape(B, H * W, C)
        q, k, v = self.qkv(t).reshape(B, H * W, 3, self.heads, self.head_dim).permute(2, 0, 3, 4, 1).unbind(0)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        attn = ((q @ k.transpose(-2, -1)) * self.temperature).softmax(dim=-1)
        o = (attn @ v).permute(0, 3, 1, 2).reshape(B, H * W, C)
        return self.proj(o).reshape(B, H, W, C)


class _ClippedAttention(nn.Module):
    """Gemma4's spelling: clamped projections, per-head RMS norms, rotary halves, sdpa."""

    def __init__(self, dim: int, heads: int, head_dim: int, tokens: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        angle = torch.arange(tokens, dtype=torch.float32)[:, None] * torch.linspace(0.1, 1.0, head_dim)[None, :]
        self.register_buffer("cos", angle.cos()[:, None, :])  # (N, 1, d): shared by the heads
        self.register_buffer("sin", angle.sin()[:, None, :])
        self.q, self.k, self.v = nn.Linear(dim, inner), nn.Linear(dim, inner), nn.Linear(dim, inner)
        self.proj = nn.Linear(inner, dim)
        self.register_buffer("lo", torch.tensor(-0.3))
        self.register_buffer("hi", torch.tensor(0.4))
        self.q_norm, self.k_norm = nn.RMSNorm(head_dim), nn.RMSNorm(head_dim)
        self.v_norm = nn.RMSNorm(head_dim, elementwise_affine=False)
        with torch.no_grad():
            self.q_norm.weight.uniform_(0.5, 1.5)
            self.k_norm.weight.uniform_(0.5, 1.5)

    def _rotary(self, t: torch.Tensor) -> torch.Tensor:  # t: (B, N, h, d)
        half = t.shape[-1] // 2
        rotated = torch.cat([-t[..., half:], t[..., :half]], dim=-1)
        return t * self.cos + rotated * self.sin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        t = x.reshape(B, H * W, C)
        shape = (B, H * W, self.heads, self.head_dim)
        q = self.q_norm(torch.clamp(self.q(t), self.lo, self.hi).view(shape))
        k = self.k_norm(torch.clamp(self.k(t), self.lo, self.hi).view(shape))
        v = self.v_norm(torch.clamp(self.v(t), self.lo, self.hi).view(shape))
        q, k = self._rotary(q).transpose(1, 2), self._rotary(k).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v.transpose(1, 2), scale=1.0)
        o = o.transpose(1, 2).reshape(B, H * W, -1)
        return self.proj(torch.clamp(o, self.lo, self.hi)).reshape(B, H, W, C)


class _FoldedAttention(nn.Module):
    """SAM-ViT's and BoTNet's spelling: heads folded into the batch axis
    (``reshape(3, B * heads, N, d)``), a decomposed relative-position term computed from q (two
    einsums with per-axis tables shared by the heads) added to the logits; ``manual`` writes
    q @ k^T / softmax / @ v instead of sdpa."""

    def __init__(self, dim: int, heads: int, head_dim: int, side: int, manual: bool) -> None:
        super().__init__()
        self.heads, self.head_dim, self.manual = heads, head_dim, manual
        inner = heads * head_dim
        self.qkv = nn.Linear(dim, 3 * inner)
        self.proj = nn.Linear(inner, dim)
        self.rel_h = nn.Parameter(torch.randn(2 * side - 1, head_dim) * 0.3)
        self.rel_w = nn.Parameter(torch.randn(2 * side - 1, head_dim) * 0.3)
        pos = torch.arange(side)
        self.register_buffer("rel_index", pos[:, None] - pos[None, :] + side - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        qkv = self.qkv(x.reshape(B, H * W, C)).reshape(B, H * W, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, B * self.heads, H * W, -1).unbind(0)
        r_q = q.reshape(-1, H, W, q.shape[-1])
        rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, self.rel_h[self.rel_index])
        rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, self.rel_w[self.rel_index])
        bias = (rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]).reshape(-1, H * W, H * W)
        if self.manual:
            attn = (q * self.head_dim ** -0.5) @ k.transpose(-2, -1) + bias
            o = attn.softmax(dim=-1) @ v
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        o = o.view(B, self.heads, H * W, -1).permute(0, 2, 1, 3).reshape(B, H, W, -1)
        return self.proj(o)


class _PooledAttention(nn.Module):
    """MViTv2's spelling: each head's q, k and v pooled by a depthwise convolution over its dims
    with the heads folded into the batch axis (``(B * heads, d, H, W)``; k and v strided), a
    LayerNorm over each head's dims, and the queries added to the kernel output (residual
    pooling) before the output projection. Only whole heads can be cut."""

    def __init__(self, dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.qkv = nn.Linear(dim, 3 * inner)
        self.proj = nn.Linear(inner, dim)
        self.pools = nn.ModuleList(nn.Conv2d(head_dim, head_dim, 3, stride=s, padding=1, groups=head_dim, bias=False)
                                   for s in (1, 2, 2))
        self.norms = nn.ModuleList(nn.LayerNorm(head_dim) for _ in range(3))

    def _pool(self, t: torch.Tensor, i: int, H: int, W: int) -> torch.Tensor:
        t = t.reshape(-1, H, W, t.shape[-1]).permute(0, 3, 1, 2)
        t = self.pools[i](t)
        t = t.reshape(-1, self.heads, t.shape[1], t.shape[2] * t.shape[3]).transpose(2, 3)
        return self.norms[i](t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        q, k, v = self.qkv(x.reshape(B, H * W, C)).reshape(B, H * W, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        q, k, v = self._pool(q, 0, H, W), self._pool(k, 1, H, W), self._pool(v, 2, H, W)
        attn = ((q * self.head_dim ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
        o = attn @ v + q
        return self.proj(o.transpose(1, 2).reshape(B, H, W, -1))


class _ParallelBlock(nn.Module):
    """ViT-22B's parallel block as timm's ``ParallelScalingBlock`` writes it: the MLP's first
    layer and q, k, v in one linear, split, and ``attn_proj(attn) + mlp_out(act(mlp))``."""

    def __init__(self, dim: int, heads: int, head_dim: int, hidden: int) -> None:
        super().__init__()
        self.heads, self.head_dim, self.hidden = heads, head_dim, hidden
        inner = heads * head_dim
        self.in_proj = nn.Linear(dim, hidden + 3 * inner)
        self.attn_proj, self.mlp_out = nn.Linear(inner, dim), nn.Linear(hidden, dim)
        self.gamma = nn.Parameter(torch.rand(dim) + 0.5)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        B, H, W, _ = y.shape
        inner = self.heads * self.head_dim
        x_mlp, q, k, v = torch.split(self.in_proj(y.reshape(B, H * W, -1)), [self.hidden, inner, inner, inner], dim=-1)
        q, k, v = (t.view(B, H * W, self.heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, H * W, inner)
        out = self.attn_proj(o) + self.mlp_out(F.gelu(x_mlp))
        return (self.gamma * out).reshape(B, H, W, -1)


class _PartialAttention(nn.Module):
    """SHViT's spelling: attention over the first ``dim // 2`` channels (the whole map when it has
    one channel), its output concatenated with the other channels before an activation and the
    output projection; ``bn``: batch norms after the q/k/v and output convolutions (ConvNorm)."""

    def __init__(self, dim: int, heads: int, head_dim: int, bn: bool = False) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.part = max(1, dim // 2)
        inner = heads * head_dim
        self.qkv = nn.Conv2d(self.part, 3 * inner, 1)
        self.proj = nn.Conv2d(inner + dim - self.part, dim, 1)
        self.qkv_bn: nn.Module = nn.BatchNorm2d(3 * inner) if bn else nn.Identity()
        self.proj_bn: nn.Module = nn.BatchNorm2d(dim) if bn else nn.Identity()
        for norm in (self.qkv_bn, self.proj_bn):
            if bn:
                _trained_statistics(norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        m = x.permute(0, 3, 1, 2)
        x1, x2 = torch.split(m, [self.part, C - self.part], dim=1)
        inner = self.heads * self.head_dim
        q, k, v = torch.split(self.qkv_bn(self.qkv(x1)), [inner, inner, inner], dim=1)
        q, k, v = (t.reshape(B, self.heads, self.head_dim, H * W) for t in (q, k, v))
        attn = ((q.transpose(-2, -1) @ k) * self.head_dim ** -0.5).softmax(dim=-1)
        o = (v @ attn.transpose(-2, -1)).reshape(B, inner, H, W)
        out = self.proj_bn(self.proj(F.relu(torch.cat([o, x2], dim=1))))
        return out.permute(0, 2, 3, 1)


class _UpsampledAttention(nn.Module):
    """LowFormer's spelling: a strided depthwise convolution (and batch norm) halves the map, one
    1x1 convolution gives each head's q, k and v (``reshape(B, heads, 3 * d, hw)``, chunked),
    and a transposed convolution is both the output projection and the upsampling."""

    def __init__(self, dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.down = nn.Conv2d(dim, dim, 3, stride=2, padding=1, groups=dim, bias=False)
        self.bn = nn.BatchNorm2d(dim)
        _trained_statistics(self.bn)
        self.pwise = nn.Conv2d(dim, 3 * heads * head_dim, 1, bias=False)
        self.up = nn.ConvTranspose2d(heads * head_dim, dim, 4, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        y = self.pwise(self.bn(self.down(x.permute(0, 3, 1, 2))))
        _, _, h, w = y.shape
        q, k, v = y.reshape(B, self.heads, 3 * self.head_dim, h * w).permute(0, 1, 3, 2).chunk(3, dim=3)
        o = F.scaled_dot_product_attention(q, k, v)
        o = self.up(o.permute(0, 1, 3, 2).reshape(B, self.heads * self.head_dim, h, w))
        return o[..., :H, :W].permute(0, 2, 3, 1)


class _QueryPooledAttention(nn.Module):
    """Hiera's spelling (``MultiScaleAttention`` with ``q_pool``): q max-pooled 2x2 over the map,
    the pooled map's size read from q and used to lay out the output."""

    def __init__(self, dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * heads * head_dim)
        self.proj = nn.Linear(heads * head_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, _ = x.shape
        q, k, v = torch.unbind(self.qkv(x).reshape(B, H * W, 3, self.heads, -1), 2)
        q = F.max_pool2d(q.reshape(B, H, W, -1).permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)
        H, W = q.shape[1:3]
        q = q.reshape(B, H * W, self.heads, -1)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.proj(o.transpose(1, 2).reshape(B, H, W, -1))


class _GatedOutputAttention(nn.Module):
    """IFormer's spelling (``tokens=False``): ``v, gate = sigmoid(bn(conv(x))).chunk(2)``, q and
    k from their own 1x1 convolutions, ``proj(attn_out * gate)``; with ``tokens``, a gated
    attention over (B, N, C) tokens: ``proj(attn_out * sigmoid(gate(x)))``."""

    def __init__(self, dim: int, heads: int, head_dim: int, tokens: bool) -> None:
        super().__init__()
        self.heads, self.head_dim, self.tokens = heads, head_dim, tokens
        inner = heads * head_dim
        if tokens:
            self.qkv = nn.Linear(dim, 3 * inner)
            self.gate = nn.Linear(dim, inner)
            self.proj = nn.Linear(inner, dim)
        else:
            self.q, self.k = nn.Conv2d(dim, inner, 1), nn.Conv2d(dim, inner, 1)
            self.v_gate = nn.Conv2d(dim, 2 * inner, 1, bias=False)
            self.bn = nn.BatchNorm2d(2 * inner)
            _trained_statistics(self.bn)
            self.proj = nn.Conv2d(inner, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        if self.tokens:
            t = x.reshape(B, H * W, C)
            q, k, v = self.qkv(t).reshape(B, H * W, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
            o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, H * W, -1)
            return self.proj(o * torch.sigmoid(self.gate(t))).reshape(B, H, W, C)
        m = x.permute(0, 3, 1, 2)
        v, gate = torch.sigmoid(self.bn(self.v_gate(m))).chunk(2, dim=1)
        q, k, v = (t.reshape(B, self.heads, self.head_dim, H * W).transpose(-1, -2)
                   for t in (self.q(m), self.k(m), v))
        o = F.scaled_dot_product_attention(q, k, v).transpose(-1, -2).reshape(B, -1, H, W)
        return self.proj(o * gate).permute(0, 2, 3, 1)


class HybridBlock(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int, hidden: int, form: str, spelling: str,
                 window: int, tokens: int) -> None:
        super().__init__()
        self.form = form
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        if form == "conv_qkv":
            self.attn: nn.Module = _ConvAttention(dim, heads, head_dim)
        elif form == "bn_rows":
            self.attn = _BnRowsAttention(dim, heads, head_dim)
        elif form == "conv_bn":
            self.attn = _ConvBnAttention(dim, heads, head_dim)
        elif form == "channel":
            self.attn = _ChannelAttention(dim, heads, head_dim)
        elif form == "parallel":
            self.attn = _ParallelBlock(dim, heads, head_dim, hidden)
        elif form == "clipped":
            self.attn = _ClippedAttention(dim, heads, head_dim, tokens)
        elif form == "pooled":
            self.attn = _PooledAttention(dim, heads, head_dim)
        elif form in ("gated", "gated_tokens"):
            self.attn = _GatedOutputAttention(dim, heads, head_dim, tokens=form == "gated_tokens")
        elif form == "q_pooled":
            self.attn = _QueryPooledAttention(dim, heads, head_dim)
        elif form == "upsampled":
            self.attn = _UpsampledAttention(dim, heads, head_dim)
        elif form in ("partial", "partial_bn"):
            self.attn = _PartialAttention(dim, heads, head_dim, bn=form == "partial_bn")
        elif form in ("folded", "folded_manual"):
            self.attn = _FoldedAttention(dim, heads, head_dim, int(tokens ** 0.5), form == "folded_manual")
        else:
            self.attn = _MapAttention(dim, heads, head_dim, "grid_out" if form in ("res_scale", "nested") else form,
                                      spelling, window)
        self.mlp = _Mlp(dim, hidden)
        self.res_scale1 = nn.Parameter(torch.rand(dim) + 0.5)
        self.res_scale2 = nn.Parameter(torch.rand(dim) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.form == "nested":
            inner = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(inner))
        if self.form == "q_pooled":
            shortcut = F.max_pool2d(x.permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)
            x = shortcut + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))
        if self.form == "parallel":  # the attention and the MLP read one norm, side by side
            return x + self.attn(self.norm1(x))
        if self.form == "res_scale":
            x = x * self.res_scale1 + self.attn(self.norm1(x))
            return self.res_scale2 * x + self.mlp(self.norm2(x))
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class HybridNet(nn.Module):
    """conv stem -> (B, H, W, C = heads * head_dim) map -> ``depth`` hybrid blocks -> mean pool -> classifier."""

    def __init__(self, form: str, heads: int = 2, head_dim: int = 4, hidden: int = 12, depth: int = 2, side: int = 4, spelling: str = "shape", window: int = 2,
                 classes: int = 5) -> None:
        super().__init__()
        self.side = side
        dim = heads * head_dim
        self.stem = nn.Conv2d(3, dim, 2, stride=2)
        self.blocks = nn.ModuleList(HybridBlock(dim, heads, head_dim, hidden, form, spelling, window, side * side)
                                    for _ in range(depth))
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x).permute(0, 2, 3, 1)
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean((1, 2)))


def example(net: HybridNet, batch: int = 2, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 2 * net.side, 2 * net.side, generator=gen)
