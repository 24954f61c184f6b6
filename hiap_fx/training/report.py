"""What a pruning run produced, as a pydantic report (JSON and markdown), and the per-site
structure eval mode selects."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from hiap_fx.gated.decisions import Decisions

if TYPE_CHECKING:
    from hiap_fx.gated.prepared import PreparedModel


class _Base(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SiteStructure(_Base):
    """What is kept of one site."""

    site: str
    kind: Literal["attention", "ffn"]
    heads: Optional[int] = Field(None, description="attention: heads before pruning")
    heads_kept: Optional[int] = Field(None, description="attention: live heads")
    head_dims: Optional[int] = Field(None, description="attention: value dims per head before")
    head_dims_kept: Optional[list[int]] = Field(None, description="attention: value dims kept by "
                                                "each live head")
    qk_dims_kept: Optional[list[int]] = Field(None, description="attention: q/k dims kept by each "
                                              "live head (when q/k dims are gated)")
    value_width: Optional[int] = Field(None, description="attention: the value width every live head "
                                       "runs at in the compact model (the widest kept; narrower heads "
                                       "are zero-padded so the layer is one kernel call)")
    neurons: Optional[int] = Field(None, description="FFN: hidden neurons before pruning")
    neurons_kept: Optional[int] = Field(None, description="FFN: hidden neurons kept")
    removed: bool = Field(description="the whole sub-layer is gone")


class HistoryPoint(_Base):
    """One logged training step."""

    step: int
    tau: float
    loss: float
    task_loss: float
    expected_ratio: float = Field(description="expected MACs / dense MACs")
    hard_ratio: float = Field(description="MACs eval mode selects / dense MACs")
    multiplier: float = Field(description="budget controller's cost weight")
    heads_kept: int
    neurons_kept: int
    accuracy: Optional[float] = Field(None, description="eval-mode top-1 on eval data, when measured")


class PruneReport(_Base):
    """Result of ``hiap_fx.prune``: compute, size, accuracy, structure and training history."""

    model: str
    target_macs: Optional[float]
    dense_macs: int = Field(description="MACs of the dense model for one input example (count_macs)")
    compact_macs: int = Field(description="MACs of the compact model for one input example (count_macs)")
    kept_ratio: float = Field(description="compact_macs / dense_macs")
    target_latency: Optional[float] = Field(None, description="cost='latency': the latency fraction "
                                            "aimed at (target_macs is then None)")
    latency_ratio: Optional[float] = Field(None, description="cost='latency': predicted latency of the "
                                           "compact model / dense latency, as calibrated")
    target_gap_pp: Optional[float] = Field(None, description="100 * (kept_ratio - target_macs), or with "
                                           "cost='latency' 100 * (latency_ratio - target_latency)")
    dense_params: int
    compact_params: int
    dense_accuracy: Optional[float] = None
    compact_accuracy: Optional[float] = None
    accuracy_before_finetune: Optional[float] = Field(None, description="compact accuracy after the "
                                                      "search, before the recovery fine-tune (when "
                                                      "one ran and eval data was given)")
    steps: int = Field(description="training steps in all: the gated search plus the recovery fine-tune")
    finetune_steps: int = Field(0, description="of them, recovery fine-tune steps of the compact model")
    seconds: float
    trained_ratio: float = Field(description="kept MACs / dense MACs when training ended, before "
                                 "the end-of-run landing")
    budget_shift: float = Field(0.0, description="logit offset applied at the end to land within "
                                "the budget tolerance (0: training hit it by itself)")
    sites: list[SiteStructure]
    removed_sublayers: list[str]
    history: list[HistoryPoint] = []

    def to_markdown(self) -> str:
        """The report as markdown: a summary table then one row per site."""
        def pct(v: Optional[float]) -> str:
            return "-" if v is None else f"{100 * v:.2f}%"

        lines = [f"# HiAP pruning report: {self.model}", "",
                 "| | dense | compact |", "|---|---:|---:|",
                 f"| MACs | {self.dense_macs:,} | {self.compact_macs:,} ({pct(self.kept_ratio)}) |",
                 f"| parameters | {self.dense_params:,} | {self.compact_params:,} "
                 f"({pct(self.compact_params / max(self.dense_params, 1))}) |",
                 f"| accuracy | {pct(self.dense_accuracy)} | {pct(self.compact_accuracy)} |", ""]
        if self.finetune_steps:
            lines.append(f"{self.steps - self.finetune_steps} search steps, then {self.finetune_steps} "
                         f"recovery fine-tune steps (accuracy before it {pct(self.accuracy_before_finetune)}).")
        if self.target_latency is not None:
            lines.append(f"Target {pct(self.target_latency)} of dense latency (calibrated on this "
                         f"machine), predicted {pct(self.latency_ratio)} ({self.target_gap_pp:+.2f} pp); "
                         f"end-of-run logit shift {self.budget_shift:+.3f}.")
        if self.target_macs is not None:
            lines.append(f"Target {pct(self.target_macs)} of dense MACs, reached {pct(self.kept_ratio)} "
                         f"({self.target_gap_pp:+.2f} pp); training ended at {pct(self.trained_ratio)}, "
                         f"end-of-run logit shift {self.budget_shift:+.3f}.")
        lines += [f"{self.steps} training steps in {self.seconds:.0f} s.", "",
                  f"Removed sub-layers: {', '.join(self.removed_sublayers) or 'none'}", "",
                  "| site | kind | heads | value dims per live head | neurons |",
                  "|---|---|---|---|---|"]
        for s in self.sites:
            if s.kind == "attention":
                heads = f"{s.heads_kept}/{s.heads}"
                dims = ", ".join(map(str, s.head_dims_kept or [])) + f" (of {s.head_dims}; runs at {s.value_width})"
                lines.append(f"| {s.site} | attention{' (removed)' if s.removed else ''} | {heads} | "
                             f"{dims if s.heads_kept else '-'} | |")
            else:
                lines.append(f"| {s.site} | FFN{' (removed)' if s.removed else ''} | | | "
                             f"{s.neurons_kept}/{s.neurons} |")
        return "\n".join(lines) + "\n"


def site_structure(prepared: "PreparedModel") -> list[SiteStructure]:
    """The structure eval mode selects for every site (what ``finalize`` keeps)."""
    decisions = Decisions(prepared.decisions())
    out: list[SiteStructure] = []
    for site in prepared.plan.attention:
        per_kv = decisions.value_dims(site).sum(-1).tolist()
        qk_per_kv = (decisions.qk_dims(site).sum(-1).tolist() if decisions.has(site.name, "qk_dim")
                     else None)
        live_heads = decisions.live_heads(site)
        kv = site.kv_of_head
        out.append(SiteStructure(
            site=site.name, kind="attention", heads=site.num_heads, heads_kept=len(live_heads),
            head_dims=site.v_dim, head_dims_kept=[int(per_kv[kv[h]]) for h in live_heads],
            qk_dims_kept=[int(qk_per_kv[kv[h]]) for h in live_heads] if qk_per_kv is not None else None,
            value_width=max([int(per_kv[kv[h]]) for h in live_heads], default=0), removed=not live_heads))
    for ffn_site in prepared.plan.ffn:
        removed = decisions.ffn_removed(ffn_site)
        out.append(SiteStructure(site=ffn_site.name, kind="ffn", neurons=ffn_site.hidden,
                                 neurons_kept=0 if removed else int(decisions.neurons(ffn_site).sum()),
                                 removed=removed))
    return out
