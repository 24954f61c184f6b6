"""Plain-text tables of plans (used by ``inspect`` and ``Plan.summary``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .cost import CostModel
    from .plan import Plan

SYMBOL_LEGEND = ("B batch, N tokens; <site>.h<i> head i on, <site>.z<k> kv head k keeps a value "
                 "dim, <site>.v<k> / <site>.q<k> kept value / q-k dims of kv head k, <site>.on FFN "
                 "block on, <site>.n kept neurons")


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)] if rows else [len(h) for h in header]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(out)


def _pct(part: int, total: int) -> str:
    return f"{100.0 * part / total:.1f}%" if total else "-"


def format_plan(plan: "Plan") -> str:
    """The plan as text: attention sites, FFN sites, unclaimed structures, MAC shares."""
    total = plan.total_macs
    lines = [f"model {plan.model} | front end {plan.frontend} | input {plan.example_shapes} | "
             f"{total:,} MACs"]
    rows = [[s.name, s.kernel or s.kind, str(s.num_heads) + (f" (kv {s.num_kv_heads})" if s.num_kv_heads != s.num_heads else ""),
             str(s.head_dim), str(s.v_dim), str(s.tokens), "yes" if s.residual else "no",
             str(len(s.side)), _pct(s.macs, total)] for s in plan.attention]
    lines += ["", f"attention sites: {len(plan.attention)}",
              _table(["site", "kernel", "heads", "qk dim", "v dim", "tokens", "residual", "side", "MACs"], rows)]
    rows = [[s.name, str(s.hidden), s.activation, "yes" if s.gated else "no",
             "yes" if s.residual else "no", "yes" if s.hidden_norm else "no", _pct(s.macs, total)]
            for s in plan.ffn]
    lines += ["", f"FFN sites: {len(plan.ffn)}",
              _table(["site", "hidden", "act", "gated", "residual", "hidden norm", "MACs"], rows)]
    covered = sum(s.macs for s in plan.attention) + sum(s.macs for s in plan.ffn)
    lines += ["", f"prunable share of MACs: {_pct(covered, total)}"]
    if plan.unclaimed:
        rows = [[u.node, u.what, u.reason] for u in plan.unclaimed]
        lines += ["", f"left unpruned: {len(plan.unclaimed)}", _table(["node", "what", "why"], rows)]
    if plan.notes:
        lines += ["", "notes:"] + [f"  - {n}" for n in plan.notes]
    return "\n".join(lines)


def format_cost(cost: "CostModel") -> str:
    """The MAC formula of a prepared model, one line per site."""
    lines = [f"MAC formula ({SYMBOL_LEGEND}):"]
    for site, expr in cost.by_site().items():
        lines.append(f"  {site}: {expr}")
    lines.append(f"  total at the example input, all on: {cost.evaluate(cost.dense_values()):,}")
    return "\n".join(lines)
