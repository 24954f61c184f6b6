"""The plan: what discovery found, as a printable, serialisable pydantic object."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field


class _Base(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Projection(_Base):
    """A linear layer whose output rows (or input columns) are assigned to units."""

    node: str = Field(description="graph node of the F.linear")
    weight: str = Field(description="qualified name of the weight parameter")
    bias: Optional[str] = Field(None, description="qualified name of the bias, if any")
    index: list[list[int]] = Field(
        description="for q/k/v: [head][dim] -> weight row; for an output projection: "
        "[head][dim] -> weight column; for FFN inputs: [[row of neuron k for k in hidden]]")
    dims_mixed: bool = Field(False, description="dims are mixed on the way (norm / rotary), so "
                             "only whole heads may be cut on this operand")


class SideTensor(_Base):
    """A parameter with one axis per head (or per neuron) that slicing must cut too."""

    param: str
    axis: int
    kind: Literal["head_bias", "head_mixing_in", "head_mixing_out", "channel"]
    index: list[int] = Field(description="unit (head or neuron) of each position along axis")


class Residual(_Base):
    """The add that joins a site's branch into the residual stream."""

    add_node: str
    branch_arg: int = Field(description="position of the branch operand in the add")
    outer: Optional["Residual"] = Field(None, description="where the sum continues into the stream "
                                        "when the add joins a parallel branch (``attn(y) + mlp(y)``)")


class _Site(_Base):
    """Fields every site has."""

    name: str
    side: list[SideTensor] = Field([], description="per-unit parameters to cut with the site")
    residual: Optional[Residual] = Field(None, description="where the branch joins the stream")
    macs: int = Field(0, description="MACs of the site's nodes at the example input")


class CoreLayout(_Base):
    """Where heads and dims sit on the kernel's tensors (axes counted from the end, negative)."""

    q_head_axis: Optional[int] = Field(description="head axis of q (None: one head, no axis)")
    k_head_axis: Optional[int] = Field(description="head axis of k as the kernel reads it")
    k_dim_axis: int = Field(description="axis of k holding the qk dims (-1, or -2 for k^T)")
    out_head_axis: Optional[int] = Field(description="head axis of the kernel output")
    k_token_axis: int = Field(-2, description="axis of k holding the key tokens")
    out_dim_axis: int = Field(-1, description="axis of the kernel output holding the head dims "
                              "(-2 for channel attention)")
    batch_folded: list[Literal["q", "k", "out"]] = Field(
        default_factory=list, description="kernel tensors whose head axis also holds the batch "
        "(heads folded into the batch axis, ``reshape(B * heads, N, d)``); finalize then also "
        "checks a batch of two")


class AttentionSite(_Site):
    """One attention: heads of q/k/v projections, a kernel, an output projection."""

    kind: Literal["sdpa", "manual"] = Field(description="sdpa: one kernel call (sdpa or a "
                                            "registered kernel) with q, k, v as its first three "
                                            "arguments; manual: q @ k^T -> softmax -> @ v")
    kernel: Optional[str] = Field(None, description="name of the registered attention kernel")
    core_nodes: list[str]
    num_heads: int
    num_kv_heads: int
    head_dim: int = Field(description="q/k width per head")
    v_dim: int = Field(description="v width per head")
    tokens: int = Field(description="query tokens at the example input (channel attention: the "
                        "head dims, which are the kernel's tokens)")
    kv_tokens: int = Field(0, description="key/value tokens at the example input")
    kv_of_head: list[int] = Field(description="kv head used by each query head (GQA groups)")
    layout: CoreLayout
    transposed: bool = Field(False, description="channel attention (XCiT's cross-covariance "
                             "attention): each head's dims are the kernel's tokens and the tokens "
                             "are contracted, so only whole heads are gated")
    logits_terms: list[str] = Field(default_factory=list, description="logits-side inputs "
                                    "computed from q or k (relative-position terms): finalize "
                                    "computes them again from the rebuilt operands")
    out_residual: Optional[str] = Field(None, description="the add of the queries to the kernel "
                                        "output before the output projection (MViTv2's residual "
                                        "pooling): the output gate follows it; only whole heads "
                                        "are cut (the dims of q and v are tied)")
    passthrough: list[str] = Field(default_factory=list, description="activations concatenated "
                                   "with the kernel output before the output projection (SHViT's "
                                   "attention over part of the channels): their projection "
                                   "columns stay, and closing every head still removes the whole "
                                   "branch (the gates' branch factor)")
    out_gate: Optional[Projection] = Field(None, description="a projection whose rows, through "
                                           "element-wise ops, multiply the kernel output feature by "
                                           "feature before the output projection (IFormer's "
                                           "``proj(attn_out * gate)``): [head][dim] -> row, cut with "
                                           "the value dims")
    out_gate_mul: Optional[str] = Field(None, description="the product of the kernel output and "
                                        "the gate (``out_gate``)")
    q: Projection
    k: Projection
    v: Projection
    out: Projection


class FFNSite(_Site):
    """One feed-forward block: input projection(s) -> activation -> output projection."""

    hidden: int
    gated: bool = Field(description="two input projections multiplied (SwiGLU-like)")
    inputs: list[Projection]
    out: Projection
    activation: str
    hidden_norm: bool = Field(False, description="a norm over the hidden units: single neurons "
                              "cannot be removed exactly (block removal still can)")


class Unclaimed(_Base):
    """Something attention- or FFN-like that hiap_fx does not prune, and why."""

    node: str
    what: str
    reason: str


class Plan(_Base):
    """Everything discovery found in one model."""

    model: str
    frontend: Literal["fx", "export"]
    example_shapes: list[list[int]]
    total_macs: int
    attention: list[AttentionSite] = []
    ffn: list[FFNSite] = []
    unclaimed: list[Unclaimed] = []
    notes: list[str] = []
    macs_not_spent: int = Field(0, description="MACs of the model as written that its normal form "
                                "does not spend (products with one-hot constants computed as gathers)")

    def summary(self) -> str:
        """A human-readable table of the sites with their share of MACs."""
        return format_plan(self)


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)] if rows else [len(h) for h in header]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(out)


def _pct(part: int, total: int) -> str:
    return f"{100.0 * part / total:.1f}%" if total else "-"


def format_plan(plan: Plan) -> str:
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
