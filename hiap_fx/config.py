"""User-facing configuration (pydantic): what to capture and how to prune."""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field


class PruneConfig(BaseModel):
    """Options of `hiap_fx.prepare` / `hiap_fx.prune`. Invalid values raise `pydantic.ValidationError`."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # --- capture -----------------------------------------------------------------------------
    frontend: Literal["auto", "fx", "export"] = Field(
        "auto",
        description="How the graph is captured: torch.fx symbolic tracing, torch.export, or "
        "'auto' (fx first, torch.export when fx cannot trace or does not reproduce the model).",
    )
    concrete_args: Optional[dict[str, Any]] = Field(
        None,
        description="Forward arguments fixed to constants while tracing. Parameters that have a "
        "default and are not given by example_inputs are fixed to their default automatically.",
    )
    check_capture: bool = Field(
        True, description="Check that the captured graph reproduces the model on example_inputs."
    )

    # --- what is gated -----------------------------------------------------------------------
    heads: bool = Field(True, description="Gate whole attention heads (macro).")
    head_dims: bool = Field(True, description="Gate value dims inside each head (micro, as the paper).")
    qk_dims: bool = Field(False, description="Gate q/k dims inside each head, one gate per dim shared "
                          "by q and k (micro); the attention scale stays 1/sqrt(original head dim).")
    ffn_blocks: bool = Field(True, description="Gate whole FFN sub-layers (macro).")
    neurons: bool = Field(True, description="Gate FFN hidden neurons (micro).")
    gate_init: float = Field(3.0, description="Initial gate logit; sigmoid(3) = 0.95 starts every "
                             "unit on with high probability.")
    align: int = Field(1, ge=1, description="Round kept dims per head and kept neurons per FFN up "
                       "to a multiple of this (e.g. 8 for tensor cores); the cost model counts it.")

    # --- objective ---------------------------------------------------------------------------
    target_macs: Optional[float] = Field(
        0.7, gt=0.0, le=1.0,
        description="Fraction of dense MACs to keep; a budget controller drives the expected MACs "
        "there. None: the paper's fixed-lambda mode.")
    lambda_macro: float = Field(2.0, ge=0.0, description="Weight of the macro (head / FFN block) "
                                "cost term, MACs normalised by dense MACs.")
    lambda_micro: float = Field(1.0, ge=0.0, description="Weight of the micro (dim / neuron) cost term.")
    budget_lr: float = Field(0.05, gt=0.0, description="Step size of the budget controller "
                             "(dual ascent on the cost weight, per training step and unit of gap).")
    lambda_feasibility: float = Field(1.0, ge=0.0, description="Weight of the feasibility penalties.")
    min_heads: int = Field(1, ge=0, description="Minimum expected live heads per attention.")
    min_head_dim_fraction: float = Field(0.125, ge=0.0, le=1.0,
                                         description="Minimum expected fraction of dims per head.")
    min_neuron_fraction: float = Field(0.1, ge=0.0, le=1.0,
                                       description="Minimum expected fraction of neurons per FFN.")
    tau_start: float = Field(2.0, gt=0.0, description="Gumbel-Sigmoid temperature at the start.")
    tau_end: float = Field(0.5, gt=0.0, description="Temperature at the end (exponential schedule).")

    # --- distillation --------------------------------------------------------------------------
    alpha: float = Field(0.7, ge=0.0, le=1.0, description="Weight of logit distillation from the "
                         "teacher: (1 - alpha) * CE + alpha * T^2 * KL.")
    temperature: float = Field(4.0, gt=0.0, description="Distillation temperature T.")
