"""Baselines HiAP is compared with, all from the same dense start and hitting the same MAC target
in one cut (the benchmark then fine-tunes them with ``hiap_fx.training.recovery``): uniform-ratio
structured pruning, the same structure with units chosen at random (the sanity baseline), global
L1 FFN-neuron pruning, and Torch-Pruning (DepGraph, L1 group importance, head dims and channels).

The first three are expressed as gate decisions on a ``PreparedModel`` (unit scores from
``hiap_fx.gated.importance``) and finalized, so their MACs are exact and the compact models are
the same kind as HiAP's.
"""

from __future__ import annotations

import copy
from typing import Callable, Optional

import torch
from torch import nn

import hiap_fx
from hiap_fx.gated.budget import hard_ratio
from hiap_fx.gated.importance import neuron_scores, value_dim_scores

ON, OFF = 5.0, -5.0


def _set(prepared: hiap_fx.PreparedModel, choose: Callable[[str, torch.Tensor], torch.Tensor]) -> None:
    """Set every gate's logits to ON/OFF from ``choose(key, logits) -> bool mask``."""
    with torch.no_grad():
        for key, gate in prepared.gate_modules().items():
            gate.logits.copy_(torch.where(choose(key, gate.logits), ON, OFF))


def _bisect(prepared: hiap_fx.PreparedModel, apply: Callable[[float], None], target: float) -> float:
    """Find the keep fraction r in [0, 1] whose decisions give hard MACs closest to ``target``."""
    def ratio_at(r: float) -> float:
        apply(r)
        return hard_ratio(prepared)

    lo, hi = 0.0, 1.0
    for _ in range(30):
        mid = (lo + hi) / 2
        if ratio_at(mid) > target:
            hi = mid
        else:
            lo = mid
    best = min((lo, hi), key=lambda r: abs(ratio_at(r) - target))
    apply(best)
    return best


def _params(prepared: hiap_fx.PreparedModel) -> dict[str, torch.Tensor]:
    return dict(prepared.graph_module.named_parameters())


def _keep_top(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    k = max(1, int(round(fraction * scores.numel())))
    keep = torch.zeros(scores.numel(), dtype=torch.bool)
    keep[scores.flatten().topk(k).indices] = True
    return keep.view_as(scores)


def _scores(l1: Optional[torch.Tensor], seed: Optional[int]) -> torch.Tensor:
    """The L1 scores, or (with a seed) random scores of the same shape."""
    assert l1 is not None, "the demo ViT's projections are 2-D parameters"
    if seed is None:
        return l1
    return torch.rand(l1.shape, generator=torch.Generator().manual_seed(seed))


def uniform_structured(dense: nn.Module, example: torch.Tensor, target: float,
                       seed: Optional[int] = None) -> nn.Module:
    """Every FFN keeps the same fraction of neurons and every head the same fraction of value dims
    (the highest-L1 ones of each layer; with ``seed``, a random choice: the sanity baseline); the
    fraction is chosen so MACs hit ``target``."""
    # align=1: the baseline picks units itself, kept counts must not be rounded
    prepared = hiap_fx.prepare(dense, example, hiap_fx.PruneConfig(heads=False, ffn_blocks=False, align=1))
    params = _params(prepared)
    neuron = {s.name: _scores(neuron_scores(params, s), seed) for s in prepared.plan.ffn}
    vdims = {s.name: _scores(value_dim_scores(params, s), seed) for s in prepared.plan.attention}

    def apply(r: float) -> None:
        def choose(key: str, logits: torch.Tensor) -> torch.Tensor:
            site, kind = key.rsplit(".", 1)
            if kind == "neuron":
                return _keep_top(neuron[site], r)
            if kind == "head_dim":
                return torch.stack([_keep_top(row, r) for row in vdims[site]]).flatten()
            return torch.ones_like(logits, dtype=torch.bool)
        _set(prepared, choose)

    _bisect(prepared, apply, target)
    return hiap_fx.finalize(prepared.eval())


class Unreachable(RuntimeError):
    """A baseline's structure cannot get down to the MAC target."""


def l1_global(dense: nn.Module, example: torch.Tensor, target: float, value_dims: bool = True) -> nn.Module:
    """FFN neurons and (with ``value_dims``) the value dims of every head, ranked together by L1
    norm normalised by each layer's mean, the lowest removed until MACs hit ``target`` (raises
    ``Unreachable`` if those units cannot get there)."""
    cfg = hiap_fx.PruneConfig(heads=False, head_dims=value_dims, ffn_blocks=False, align=1)
    prepared = hiap_fx.prepare(dense, example, cfg)
    params = _params(prepared)
    scores = {f"{s.name}.neuron": _scores(neuron_scores(params, s), None) for s in prepared.plan.ffn}
    if value_dims:
        scores.update({f"{s.name}.head_dim": _scores(value_dim_scores(params, s), None).flatten()
                       for s in prepared.plan.attention})
    scores = {k: v / v.mean() for k, v in scores.items()}
    flat = torch.cat(list(scores.values()))

    def apply(r: float) -> None:
        k = max(1, int(round(r * flat.numel())))
        threshold = flat.topk(k).values.min()
        _set(prepared, lambda key, logits: scores[key] >= threshold)

    _bisect(prepared, apply, target)
    reached = hard_ratio(prepared)
    if reached > target + 0.01:
        raise Unreachable(f"cannot go below {reached:.3f} of dense MACs")
    return hiap_fx.finalize(prepared.eval())


def l1_ffn(dense: nn.Module, example: torch.Tensor, target: float) -> nn.Module:
    """FFN neurons only, ranked globally by L1 norm (normalised by each layer's mean)."""
    return l1_global(dense, example, target, value_dims=False)


def random_structured(dense: nn.Module, example: torch.Tensor, target: float, seed: int = 0) -> nn.Module:
    """The sanity baseline: the uniform structure with units chosen at random (seeded)."""
    return uniform_structured(dense, example, target, seed=seed)


def torch_pruning_vit(dense: nn.Module, example: torch.Tensor, target: float) -> nn.Module:
    """Torch-Pruning's recipe for timm ViTs (its examples/transformers/prune_timm_vit.py): L1 group
    importance, uniform ratio, head dims and embedding channels pruned, the classifier head kept;
    the ratio is bisected until ``hiap_fx.count_macs`` hits ``target``."""
    import timm
    import torch_pruning as tp

    dense_macs = hiap_fx.count_macs(dense, example[:1])

    def pruned(ratio: float) -> nn.Module:
        model = copy.deepcopy(dense).eval()
        num_heads = {m.qkv: m.num_heads for m in model.modules()
                     if isinstance(m, timm.models.vision_transformer.Attention)}
        pruner = tp.pruner.MetaPruner(model, example[:1], importance=tp.importance.GroupMagnitudeImportance(p=1),
                                      pruning_ratio=ratio, ignored_layers=[model.head], num_heads=num_heads,
                                      prune_head_dims=True, prune_num_heads=False, round_to=2)
        pruner.step()
        for m in model.modules():
            if isinstance(m, timm.models.vision_transformer.Attention):
                # the attributes Torch-Pruning leaves stale (its example fixes them the same way;
                # timm >= 1.0.20 reshapes with attn_dim, so no forward patch is needed)
                m.num_heads = pruner.num_heads[m.qkv]
                m.head_dim = m.qkv.out_features // (3 * m.num_heads)
                m.attn_dim = m.num_heads * m.head_dim
                m.scale = m.head_dim ** -0.5
        return model

    lo, hi = 0.0, 0.95
    best = None
    for _ in range(12):
        mid = (lo + hi) / 2
        model = pruned(mid)
        ratio = hiap_fx.count_macs(model, example[:1]) / dense_macs
        if best is None or abs(ratio - target) < abs(best[0] - target):
            best = (ratio, model)
        if ratio > target:
            lo = mid
        else:
            hi = mid
    return best[1]  # type: ignore[index]
