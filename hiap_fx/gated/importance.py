"""Weight-magnitude importance of every gated unit, read through the plan's index tables (which
weight rows and columns belong to which head, dim or neuron), and gate logits initialised from it.

A unit's score is the L1 norm of the weights that exist only for it: its rows of the input
projections and its columns of the output projection. Scores are compared only within one gate,
so the different projections' scales never compete. ``PruneConfig.importance_init`` spreads the
initial logits by rank within each gate (lowest score ``gate_init - spread``, highest
``gate_init + spread``): the budget pressure, equal on every unit of a gate, then closes the
weakest first, as magnitude pruning would, while the task loss can still reverse any choice.
"""

from __future__ import annotations

from typing import Iterator, Mapping, Optional

import torch

from hiap_fx.gated.bundles import SiteGates
from hiap_fx.plan import AttentionSite, FFNSite, Plan, Projection


class _Weights(Mapping[str, torch.Tensor]):
    """The graph's parameters, with each weight's row and column norms computed once (a head's,
    a value dim's and a q/k dim's scores read the same projections)."""

    def __init__(self, params: Mapping[str, torch.Tensor]) -> None:
        self.params = params
        self.norms: dict[tuple[str, int], torch.Tensor] = {}

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.params[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.params)

    def __len__(self) -> int:
        return len(self.params)


def _norms(params: Mapping[str, torch.Tensor], name: str, dim: int) -> Optional[torch.Tensor]:
    weight = params.get(name)
    if weight is None or weight.ndim != 2:
        return None
    if not isinstance(params, _Weights):
        return _l1(weight, dim)
    if (name, dim) not in params.norms:
        params.norms[name, dim] = _l1(weight, dim)
    return params.norms[name, dim]


def _rows(params: Mapping[str, torch.Tensor], proj: Projection) -> Optional[torch.Tensor]:
    """L1 norm of every weight row of ``proj`` (columns for an output projection are read by
    :func:`_columns`); None when the weight is not a 2-D parameter of the graph."""
    return _norms(params, proj.weight, 1)


def _columns(params: Mapping[str, torch.Tensor], proj: Projection) -> Optional[torch.Tensor]:
    return _norms(params, proj.weight, 0)


def _l1(weight: torch.Tensor, dim: int) -> torch.Tensor:
    """L1 norms along ``dim`` in float32, without an |weight| copy of the whole matrix."""
    return torch.linalg.vector_norm(weight.detach(), ord=1, dim=dim, dtype=torch.float32)


def _per_unit(norms: torch.Tensor, index: list[list[int]]) -> torch.Tensor:
    """``[group][dim]`` scores gathered from per-row (or per-column) norms."""
    return norms[torch.tensor(index, dtype=torch.long)]


def neuron_scores(params: Mapping[str, torch.Tensor], site: FFNSite) -> Optional[torch.Tensor]:
    """``[hidden]``: each neuron's input-projection rows plus its output-projection column."""
    parts = [_rows(params, p) for p in site.inputs] + [_columns(params, site.out)]
    if any(p is None for p in parts):
        return None
    score = _per_unit(parts[-1], site.out.index)[0].clone()  # type: ignore[arg-type]
    for proj, rows in zip(site.inputs, parts[:-1]):
        score += _per_unit(rows, proj.index)[0]  # type: ignore[arg-type]
    return score


def _by_kv(scores: torch.Tensor, site: AttentionSite) -> torch.Tensor:
    """Per-query-head ``[heads, dims]`` scores summed into their kv groups ``[kv, dims]``."""
    kv = torch.zeros(site.num_kv_heads, scores.shape[1])
    return kv.index_add_(0, torch.tensor(site.kv_of_head), scores)


def _kv_rows(params: Mapping[str, torch.Tensor], proj: Projection, site: AttentionSite) -> Optional[torch.Tensor]:
    """``[kv, dims]`` row norms of a k or v projection (whose index is per kv head, or per query
    head when each query head has its own rows)."""
    rows = _rows(params, proj)
    if rows is None:
        return None
    per = _per_unit(rows, proj.index)
    return per if per.shape[0] == site.num_kv_heads else _by_kv(per, site)


def value_dim_scores(params: Mapping[str, torch.Tensor], site: AttentionSite) -> Optional[torch.Tensor]:
    """``[kv, v_dim]``: v-projection rows plus the output-projection columns of every query head
    reading that value dim."""
    v, out = _kv_rows(params, site.v, site), _columns(params, site.out)
    return None if v is None or out is None else v + _by_kv(_per_unit(out, site.out.index), site)


def qk_dim_scores(params: Mapping[str, torch.Tensor], site: AttentionSite) -> Optional[torch.Tensor]:
    """``[kv, head_dim]``: k-projection rows plus the q rows of every query head of the group."""
    k, q = _kv_rows(params, site.k, site), _rows(params, site.q)
    return None if k is None or q is None else k + _by_kv(_per_unit(q, site.q.index), site)


def head_scores(params: Mapping[str, torch.Tensor], site: AttentionSite) -> Optional[torch.Tensor]:
    """``[heads]``: a head's q rows and output columns, plus its kv group's k and v rows."""
    q, out = _rows(params, site.q), _columns(params, site.out)
    k, v = _kv_rows(params, site.k, site), _kv_rows(params, site.v, site)
    if q is None or out is None or k is None or v is None:
        return None
    kv_of = torch.tensor(site.kv_of_head)
    return (_per_unit(q, site.q.index).sum(1) + _per_unit(out, site.out.index).sum(1)
            + k.sum(1)[kv_of] + v.sum(1)[kv_of])


def gate_scores(params: Mapping[str, torch.Tensor], plan: Plan,
                bundles: Mapping[str, SiteGates]) -> dict[str, torch.Tensor]:
    """Scores of every gate with more than one unit, keyed ``"<site>.<kind>"`` (the keys of
    ``PreparedModel.gate_modules()``), flattened like its logits. Gates whose weights cannot be
    read as ``[out, in]`` parameters are left out (their logits keep the constant start)."""
    params = _Weights(params)
    sites: dict[str, AttentionSite | FFNSite] = {s.name: s for s in plan.attention}
    sites.update({s.name: s for s in plan.ffn})
    out: dict[str, torch.Tensor] = {}
    for name, bundle in bundles.items():
        site = sites[name]
        for kind, gate in bundle.gates().items():
            score: Optional[torch.Tensor] = None
            try:
                if isinstance(site, FFNSite) and kind == "neuron":
                    score = neuron_scores(params, site)
                elif isinstance(site, AttentionSite) and kind == "head":
                    score = head_scores(params, site)
                elif isinstance(site, AttentionSite) and kind == "head_dim":
                    score = value_dim_scores(params, site)
                elif isinstance(site, AttentionSite) and kind == "qk_dim":
                    score = qk_dim_scores(params, site)
            except (IndexError, RuntimeError):  # a weight laid out otherwise than [out, in]
                score = None
            if score is not None and score.numel() == gate.logits.numel() > 1:
                out[f"{name}.{kind}"] = score.flatten()
    return out


def rank_spread(scores: torch.Tensor, center: float, spread: float) -> torch.Tensor:
    """Logits linear in the rank of ``scores``: ``center - spread`` for the lowest score,
    ``center + spread`` for the highest (ties broken by position)."""
    n = scores.numel()
    ranks = torch.empty(n)
    ranks[torch.sort(scores, stable=True).indices] = torch.arange(n, dtype=torch.float32)
    return center + spread * (2.0 * ranks / max(n - 1, 1) - 1.0)


def init_from_importance(params: Mapping[str, torch.Tensor], plan: Plan,
                         bundles: Mapping[str, SiteGates], center: float, spread: float) -> int:
    """Set every scorable gate's logits to :func:`rank_spread` of its scores (the others keep
    ``center``, with a note in ``plan.notes``); returns how many gates were set."""
    scores = gate_scores(params, plan, bundles)
    unscored = [f"{name}.{kind}" for name, bundle in bundles.items() for kind, gate in bundle.gates().items()
                if gate.logits.numel() > 1 and f"{name}.{kind}" not in scores]
    if unscored:
        plan.notes.append(f"importance_init: the weights of {', '.join(unscored)} could not be read per "
                          "unit; those gates start at gate_init")
    with torch.no_grad():
        for name, bundle in bundles.items():
            for kind, gate in bundle.gates().items():
                score = scores.get(f"{name}.{kind}")
                if score is not None:
                    gate.logits.copy_(rank_spread(score, center, spread))
    return len(scores)
