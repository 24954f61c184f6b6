"""Baselines HiAP is compared with, all from the same dense start and hitting the same MAC target:
uniform-ratio structured pruning, global L1 FFN-neuron pruning (both cut once, then fine-tuned),
and Torch-Pruning (DepGraph, L1 group importance, head dims and channels) + fine-tune.

The first two are expressed as gate decisions on a ``PreparedModel`` and finalized, so their
MACs are exact and the compact models are the same kind as HiAP's.
"""

from __future__ import annotations

import copy
from typing import Callable, Iterable

import torch
from torch import nn

import hiap_fx
from hiap_fx.gated.budget import hard_ratio
from hiap_fx.training.classify import cosine_lr, logits_of
from hiap_fx.training.prune import distillation_loss

ON, OFF = 5.0, -5.0


def finetune(student: nn.Module, teacher: nn.Module, data: Iterable, steps: int, lr: float = 5e-4,
             seed: int = 0, alpha: float = 0.7, temperature: float = 4.0) -> nn.Module:
    """Fine-tune with the same loss as prune(): (1 - alpha) CE + alpha T^2 KL from the dense teacher,
    AdamW (weight decay 0.05 on matrices) with cosine decay."""
    torch.manual_seed(seed)
    params = [p for p in student.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": 0.05},
              {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, steps))
    teacher.eval()
    student.train()
    step = 0
    while step < steps:
        for x, y in data:
            with torch.no_grad():
                t = logits_of(teacher(x))
            loss = distillation_loss(logits_of(student(x)), t, y, alpha, temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step >= steps:
                break
    return student.eval()


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


def _neuron_scores(prepared: hiap_fx.PreparedModel, site) -> torch.Tensor:
    """L1 norm per FFN neuron: input-projection rows plus output-projection columns."""
    params = dict(prepared.graph_module.named_parameters())
    score = torch.zeros(site.hidden)
    for proj in site.inputs:
        rows = torch.tensor(proj.index[0])
        score += params[proj.weight].detach().abs()[rows].sum(1)
    cols = torch.tensor(site.out.index[0])
    score += params[site.out.weight].detach().abs()[:, cols].sum(0)
    return score


def _vdim_scores(prepared: hiap_fx.PreparedModel, site) -> torch.Tensor:
    """L1 norm per (kv head, value dim): v-projection rows plus output-projection columns."""
    params = dict(prepared.graph_module.named_parameters())
    v = params[site.v.weight].detach().abs()
    out = params[site.out.weight].detach().abs()
    scores = torch.zeros(site.num_kv_heads, site.v_dim)
    for h, dims in enumerate(site.v.index):
        scores[h] += v[torch.tensor(dims)].sum(1)
    for h, dims in enumerate(site.out.index):
        scores[site.kv_of_head[h]] += out[:, torch.tensor(dims)].sum(0)
    return scores


def _keep_top(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    k = max(1, int(round(fraction * scores.numel())))
    keep = torch.zeros(scores.numel(), dtype=torch.bool)
    keep[scores.flatten().topk(k).indices] = True
    return keep.view_as(scores)


def uniform_structured(dense: nn.Module, example: torch.Tensor, target: float) -> nn.Module:
    """Every FFN keeps the same fraction of neurons and every head the same fraction of value dims
    (the highest-L1 ones of each layer); the fraction is chosen so MACs hit ``target``."""
    # align=1: the baseline picks units itself, kept counts must not be rounded
    prepared = hiap_fx.prepare(dense, example, hiap_fx.PruneConfig(heads=False, ffn_blocks=False, align=1))
    neuron = {s.name: _neuron_scores(prepared, s) for s in prepared.plan.ffn}
    vdims = {s.name: _vdim_scores(prepared, s) for s in prepared.plan.attention}

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


def l1_ffn(dense: nn.Module, example: torch.Tensor, target: float) -> nn.Module:
    """FFN neurons only, ranked globally by L1 norm (normalised by each layer's mean), the lowest
    removed until MACs hit ``target`` (raises if FFNs alone cannot reach it)."""
    prepared = hiap_fx.prepare(dense, example, hiap_fx.PruneConfig(heads=False, head_dims=False, align=1,
                                                                  ffn_blocks=False))
    scores = {s.name: _neuron_scores(prepared, s) for s in prepared.plan.ffn}
    scores = {k: v / v.mean() for k, v in scores.items()}
    flat = torch.cat(list(scores.values()))

    def apply(r: float) -> None:
        k = max(1, int(round(r * flat.numel())))
        threshold = flat.topk(k).values.min()
        _set(prepared, lambda key, logits: scores[key.rsplit(".", 1)[0]] >= threshold)

    _bisect(prepared, apply, target)
    reached = hard_ratio(prepared)
    if reached > target + 0.01:
        raise RuntimeError(f"L1 FFN pruning cannot go below {reached:.3f} of dense MACs")
    return hiap_fx.finalize(prepared.eval())


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
