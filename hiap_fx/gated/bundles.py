"""Per-site gate bundles: one module per site draws all its gates once per forward and returns
the masks the gated graph multiplies in, so every use within a forward sees the same draw.

Nesting: a head's dims act only through the head gate (mask = g[h] * d[kv(h), j]); FFN neurons
act only through the block gate (the branch output is multiplied by b). A site whose units are
all closed contributes exactly zero to the residual stream (the ``branch`` factor), which is what
lets finalize remove the whole sub-layer.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from hiap_fx.gated.gates import Gate
from hiap_fx.registry import SAFE_FUNCTIONS

#: attribute of the prepared graph module that holds the per-site gate bundles
GATES_ATTR = "hiap_gates"


def broadcast_shape(rank: int, head_axis: Optional[int], heads: int, dim_axis: int, dims: int) -> list[int]:
    shape = [1] * rank
    if head_axis is not None:
        shape[head_axis] = heads
    elif heads != 1:
        raise ValueError("several heads but no head axis")
    shape[dim_axis] = dims
    return shape


def folded_mask_mul(x: torch.Tensor, mask: torch.Tensor, axis: int) -> torch.Tensor:
    """``x`` times a head mask along ``axis``, where that axis of ``x`` holds the batch and the
    heads folded into one (``B * heads``, batch-major) and the mask holds only the heads."""
    a = axis % x.dim()
    heads = mask.shape[a]
    return (x.unflatten(a, (-1, heads)) * mask.unsqueeze(a)).flatten(a, a + 1)


SAFE_FUNCTIONS.append(folded_mask_mul)


class SiteGates(nn.Module):
    """The gates of one site, drawn once per forward; ``forward`` returns the masks by key."""

    site: str
    #: the dtype of the activations the masks multiply (bf16 weights: bf16 masks, so a float32
    #: mask does not turn the activations float32); ``None``: the gates' own float32
    mask_dtype: Optional[torch.dtype] = None

    def gates(self) -> dict[str, Gate]:
        """The site's gates by kind."""
        raise NotImplementedError

    def cast(self, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``masks`` in :attr:`mask_dtype` (gradients flow back to the float32 logits)."""
        if self.mask_dtype is None:
            return masks
        return {k: v.to(self.mask_dtype) for k, v in masks.items()}

    def mask_keys(self) -> list[str]:
        """Keys of the masks ``forward`` returns."""
        raise NotImplementedError


class AttentionGates(SiteGates):
    """Head, value-dim and (optional) q/k-dim gates of one attention site.

    Args:
        site: site name; heads, kv_of_head, head_dim, v_dim: the site's structure.
        head / head_dim / qk_dim: which gates exist. branch: whether to emit the branch factor.
        out_shape / q_shape / k_shape: broadcast shapes of the [head, dim] masks on the kernel's
            output, q and k (``None`` for masks not needed).
    """

    def __init__(self, site: str, heads: int, kv_of_head: list[int], head_dim: int, v_dim: int, *,
                 head: bool, head_dim_gates: bool, qk_dim_gates: bool, branch: bool,
                 out_shape: Optional[list[int]], q_shape: Optional[list[int]],
                 k_shape: Optional[list[int]], k_rows_per_kv: bool, init: float, align: int) -> None:
        super().__init__()
        kv = max(kv_of_head) + 1
        self.site, self.heads, self.kv_heads = site, heads, kv
        self.head_dim_size, self.v_dim = head_dim, v_dim
        self.head = Gate(heads, "head", site, init) if head else None
        self.head_dim = Gate(kv * v_dim, "head_dim", site, init, groups=kv, align=align) if head_dim_gates else None
        self.qk_dim = Gate(kv * head_dim, "qk_dim", site, init, groups=kv, align=align) if qk_dim_gates else None
        self.emit_branch = branch
        self.kv_of_head: torch.Tensor
        self.register_buffer("kv_of_head", torch.tensor(kv_of_head, dtype=torch.long), persistent=False)
        self.out_shape, self.q_shape, self.k_shape = out_shape, q_shape, k_shape
        self.k_rows_per_kv = k_rows_per_kv

    def gates(self) -> dict[str, Gate]:
        """The gates of this site by kind."""
        return {g.kind: g for g in (self.head, self.head_dim, self.qk_dim) if g is not None}

    def mask_keys(self) -> list[str]:
        """The keys ``forward`` returns."""
        keys = ["out"] if self.out_shape is not None else []
        keys += ["q", "k"] if self.qk_dim is not None else []
        return keys + (["branch"] if self.emit_branch else [])

    def forward(self) -> dict[str, torch.Tensor]:
        masks: dict[str, torch.Tensor] = {}
        ref = next(iter(self.gates().values())).logits
        g = self.head() if self.head is not None else torch.ones(self.heads, dtype=ref.dtype, device=ref.device)
        live = g
        if self.out_shape is not None:
            out = g[:, None]
            if self.head_dim is not None:
                d = self.head_dim().view(self.kv_heads, self.v_dim)
                out = out * d[self.kv_of_head]
                live = g * d.amax(-1)[self.kv_of_head]
            masks["out"] = out.expand(self.heads, self.v_dim).reshape(self.out_shape)
        if self.qk_dim is not None:
            qk = self.qk_dim().view(self.kv_heads, self.head_dim_size)
            masks["q"] = qk[self.kv_of_head].reshape(self.q_shape)
            masks["k"] = (qk if self.k_rows_per_kv else qk[self.kv_of_head]).reshape(self.k_shape)
        if self.emit_branch:
            masks["branch"] = 1.0 - torch.prod(1.0 - live)
        return self.cast(masks)


class FFNGates(SiteGates):
    """Block and neuron gates of one FFN site."""

    def __init__(self, site: str, hidden: int, *, block: bool, neurons: bool, init: float,
                 align: int) -> None:
        super().__init__()
        self.site = site
        self.block = Gate(1, "ffn", site, init) if block else None
        self.neuron = Gate(hidden, "neuron", site, init, align=align) if neurons else None

    def gates(self) -> dict[str, Gate]:
        """The gates of this site by kind."""
        return {g.kind: g for g in (self.block, self.neuron) if g is not None}

    def mask_keys(self) -> list[str]:
        """The keys ``forward`` returns."""
        return (["hidden"] if self.neuron is not None else []) + (["branch"] if self.block is not None else [])

    def forward(self) -> dict[str, torch.Tensor]:
        masks: dict[str, torch.Tensor] = {}
        if self.neuron is not None:
            masks["hidden"] = self.neuron()
        if self.block is not None:
            masks["branch"] = self.block()[0]
        return self.cast(masks)

