"""Landing the kept MACs on the target at the end of a run."""

from __future__ import annotations

from typing import Optional, Protocol

import torch

from hiap_fx.gated.gates import Gate


class GatedModel(Protocol):
    """What landing needs of a prepared model (``PreparedModel`` is one)."""

    def gate_modules(self) -> dict[str, Gate]: ...

    def budget_ratio(self, hard: bool = True) -> float: ...


class MacModel(Protocol):
    @property
    def dense_macs(self) -> int: ...

    def hard_macs(self) -> int: ...


def hard_ratio(prepared: MacModel) -> float:
    """MACs eval mode selects now, as a fraction of dense MACs."""
    return prepared.hard_macs() / prepared.dense_macs


MICRO_KINDS = ("head_dim", "qk_dim", "neuron")


@torch.no_grad()
def land_on_budget(prepared: GatedModel, target: float, tolerance: float) -> float:
    """If the kept cost (MACs or latency, ``prepared.budget_ratio()``) is further than
    ``tolerance`` from ``target`` (fractions of dense),
    add the smallest common offset to gate logits that brings them within it (or as close as the
    granularity of the units allows). Returns the offset applied (0.0 when none was needed).

    The offset goes first to the micro gates only (dims and neurons: fine steps, the macro
    structure stays as trained); only if that cannot reach the window does it go to every gate.
    One offset per set keeps the order the training gave the units: the units closed (or opened)
    are those whose logits were nearest to the decision threshold.
    """
    gates = prepared.gate_modules()
    r0 = prepared.budget_ratio()
    if not gates or abs(r0 - target) <= tolerance:
        return 0.0
    micro = [g for g in gates.values() if g.kind in MICRO_KINDS]
    best: Optional[tuple[float, float, list[Gate]]] = None
    for subset in ([micro] if micro else []) + [list(gates.values())]:
        shift, ratio = _best_shift(prepared, subset, r0, target, tolerance)
        if best is None or abs(ratio - target) < abs(best[1] - target):
            best = (shift, ratio, subset)
        if abs(ratio - target) <= tolerance:
            break
    shift, _, subset = best  # type: ignore[misc]  # set in the first iteration
    for g in subset:
        g.logits.add_(shift)
    return float(shift)


def _best_shift(prepared: GatedModel, gates: list[Gate], r0: float, target: float,
                tolerance: float) -> tuple[float, float]:
    """The smallest offset of ``gates``' logits landing within ``tolerance`` of ``target`` (or the
    nearest reachable), and the ratio it gives; the logits are left as they were."""
    originals = [g.logits.detach().clone() for g in gates]

    def ratio_at(shift: float) -> float:
        for g, orig in zip(gates, originals):
            g.logits.copy_(orig + shift)
        return prepared.budget_ratio()

    # a unit with logit l is on iff l + shift > 0: the decisions only change at shift = -l, so
    # the candidate shifts are the midpoints between consecutive thresholds (and beyond both ends)
    thresholds = torch.unique(-torch.cat([o.flatten() for o in originals]).double())
    cands = torch.cat([thresholds[:1] - 1.0, (thresholds[1:] + thresholds[:-1]) / 2,
                       thresholds[-1:] + 1.0]).tolist()
    closing = r0 > target
    side = [s for s in cands if (s < 0 if closing else s > 0)]
    if not side:
        return 0.0, r0
    # the ratio is non-decreasing in the shift: binary search for the last shift within the
    # window when closing (shifts < 0), the first one when opening (shifts > 0)
    ok = (lambda r: r <= target + tolerance) if closing else (lambda r: r >= target - tolerance)
    lo, hi = 0, len(side) - 1
    found = 0 if closing else len(side) - 1
    while lo <= hi:
        mid = (lo + hi) // 2
        if ok(ratio_at(side[mid])):
            found = mid
            lo, hi = (mid + 1, hi) if closing else (lo, mid - 1)
        else:
            lo, hi = (lo, mid - 1) if closing else (mid + 1, hi)
    neighbour = found + 1 if closing else found - 1
    pick = [side[found]] + ([side[neighbour]] if 0 <= neighbour < len(side) else [])
    # when a single unit jumps over the window, take the candidate nearer to the target
    scored = [(abs(ratio_at(s) - target), abs(s), s) for s in pick]
    shift = min(scored)[2]
    ratio = ratio_at(shift)
    for g, orig in zip(gates, originals):
        g.logits.copy_(orig)
    return shift, ratio
