"""Census-weighted estimate of the share of timm's attention calls that hiap_fx sites, from the
coverage cache while the full run is still going.

Each timm family (the module that registers the model) gets the sited share of its probed models;
that share is applied to all of the family's attention calls in the census
(``benchmarks/results/coverage/census.jsonl``, models under 700M parameters). Families with no
probed model are left out of the estimate and counted separately. The raw share of the probed
models is in docs/coverage.md (``hiap-fx coverage --attention --cache ... --report``).

    python benchmarks/coverage_estimate.py
"""

from __future__ import annotations

import collections
import json
from pathlib import Path

from timm.models import _registry as registry

RESULTS = Path(__file__).resolve().parent / "results" / "coverage"
MAX_PARAMS = 7e8


def main() -> list[str]:
    census = [json.loads(line) for line in (RESULTS / "census.jsonl").read_text().splitlines() if line.strip()]
    rows = {r["model"]: r for r in (json.loads(p.read_text()) for p in (RESULTS / "rows").glob("*.json"))}
    calls_of: collections.Counter[str] = collections.Counter()
    probed: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])  # family -> [sited, calls]
    for c in census:
        if c["calls"] <= 0 or c["params"] > MAX_PARAMS:
            continue
        family = registry._model_to_module.get(c["model"], c["model"])
        calls_of[family] += c["calls"]
        row = rows.get(c["model"])
        if row and row.get("status") not in ("pending", "timeout"):
            probed[family][0] += int(row.get("sited") or 0) if row.get("status") == "ok" else 0
            probed[family][1] += max(int(row.get("calls") or 0), int(row.get("sited") or 0))
    total = sum(calls_of.values())
    unprobed = sum(n for f, n in calls_of.items() if not probed[f][1])
    estimate = sum(n * probed[f][0] / probed[f][1] for f, n in calls_of.items() if probed[f][1])
    gaps = sorted(((n * (1 - probed[f][0] / probed[f][1]), f) for f, n in calls_of.items()
                   if probed[f][1] and probed[f][0] < probed[f][1]), reverse=True)
    lines = [f"timm attention calls (models <= {MAX_PARAMS / 1e6:.0f}M parameters): {total}; in families "
             f"with no probed model yet: {unprobed}",
             f"estimated sited: {estimate:.0f} = {100 * estimate / max(1, total - unprobed):.1f}% of the calls "
             "of probed families", "", "largest estimated gaps (unsited calls, family, probed sited/calls):"]
    lines += [f"  {g:6.0f}  {f}  {probed[f][0]}/{probed[f][1]}" for g, f in gaps[:15]]
    print("\n".join(lines))
    return lines


if __name__ == "__main__":
    main()
