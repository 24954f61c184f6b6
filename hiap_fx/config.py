"""User-facing configuration (pydantic): what to capture and how to prune."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union, cast

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from hiap_fx.errors import ConfigError


def _config_error(exc: ValidationError) -> ConfigError:
    # the details pydantic reported are valid init details for the same error types
    return ConfigError.from_exception_data(exc.title, cast(Any, exc.errors()))


AUTO_ALIGN, AUTO_ALIGN_MIN_GROUP = 8, 64


class PruneConfig(BaseModel):
    """Options of `hiap_fx.prepare` / `hiap_fx.prune`. Invalid values raise `hiap_fx.ConfigError`,
    which is both a `pydantic.ValidationError` (naming the field) and a `hiap_fx.HiapError`."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise _config_error(exc) from None

    @model_validator(mode="after")
    def _latency_fields_need_latency_cost(self) -> "PruneConfig":
        if self.cost == "macs" and (self.target_latency is not None or self.latency_batch is not None):
            raise ValueError("target_latency and latency_batch apply to cost='latency'; pass "
                             "cost='latency' with them (or drop them to budget MACs)")
        return self

    def unit_alignment(self, group_size: int) -> int:
        """The multiple kept counts of a gate group of ``group_size`` units are rounded up to."""
        if self.align != "auto":
            return int(self.align)
        return AUTO_ALIGN if group_size >= AUTO_ALIGN_MIN_GROUP and group_size % AUTO_ALIGN == 0 else 1

    @property
    def budget_fraction(self) -> Optional[float]:
        """The fraction of dense cost the budget drives to: ``target_latency`` (or ``target_macs``)
        with ``cost="latency"``, ``target_macs`` otherwise; None in the fixed-lambda mode."""
        if self.cost == "latency" and self.target_latency is not None:
            return self.target_latency
        return self.target_macs

    def __setattr__(self, name: str, value: Any) -> None:
        try:
            super().__setattr__(name, value)
        except ValidationError as exc:
            raise _config_error(exc) from None

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
    importance_init: float = Field(
        2.0, ge=0.0, description="Spread the initial logits of each gate by weight magnitude: its "
        "units ranked by the L1 norm of their own weight rows and columns start from gate_init - "
        "importance_init (weakest) to gate_init + importance_init (strongest), so the budget closes "
        "the weakest first. 0: every unit starts at gate_init (the paper).")
    align: Union[Annotated[int, Field(ge=1)], Literal["auto"]] = Field(
        "auto", description="Round kept dims per head and kept neurons per FFN up to a multiple of "
        "this; the cost model counts it. 'auto': 8 for groups of at least 64 units that 8 divides "
        "(measured: aligned widths run ~11% faster per unit at batch 8 on CPU for under 1% more "
        "MACs; benchmarks/align.py), 1 for smaller groups (a head of 16 dims keeps any count).")

    # --- objective ---------------------------------------------------------------------------
    target_macs: Optional[float] = Field(
        0.7, gt=0.0, le=1.0,
        description="Fraction of dense MACs to keep; a budget controller drives the expected MACs "
        "there. None: the paper's fixed-lambda mode.")
    cost: Literal["macs", "latency"] = Field(
        "macs", description="What the budget counts: MACs (exact, symbolic), or latency on this "
        "machine at latency_batch (calibrated by timing the compact building blocks of each site, "
        "cached per machine and model; see docs/api.md).")
    target_latency: Optional[float] = Field(
        None, gt=0.0, le=1.0, description="With cost='latency': the fraction of dense latency to "
        "keep (None: target_macs's value is used as the latency fraction).")
    latency_batch: Optional[int] = Field(
        None, ge=1, description="With cost='latency': the batch size to calibrate and steer latency "
        "at (the one you deploy with). None: the example input's batch size.")
    lambda_macro: float = Field(2.0, ge=0.0, description="Weight of the macro (head / FFN block) "
                                "cost term, MACs normalised by dense MACs.")
    lambda_micro: float = Field(1.0, ge=0.0, description="Weight of the micro (dim / neuron) cost term.")
    budget_lr: float = Field(0.05, gt=0.0, description="Integral gain of the budget controller "
                             "(dual ascent on the cost weight, per training step and unit of gap).")
    budget_kp: float = Field(20.0, ge=0.0, description="Proportional gain of the budget controller "
                             "(cost weight per unit of gap between expected and reference MACs).")
    budget_ramp: float = Field(0.6, ge=0.0, le=1.0, description="prune(): the controller's reference "
                               "falls from the starting MACs to the target over this fraction of the "
                               "run (cubic), so gates close gradually rather than all at once.")
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

    # --- training (hiap_fx.prune) ----------------------------------------------------------------
    lr: float = Field(1e-4, gt=0.0, description="AdamW learning rate of the model's weights "
                      "(cosine decay over the run).")
    gate_lr: Optional[float] = Field(None, gt=0.0, description="AdamW learning rate of the gate "
                                     "logits (no weight decay). None: 10 * gate_init / steps, so a "
                                     "gate can go from on to off within a tenth of the run.")
    weight_decay: float = Field(0.05, ge=0.0, description="AdamW weight decay of weight matrices "
                                "(not of biases, norms or gates).")
    max_grad_norm: Optional[float] = Field(None, gt=0.0, description="Clip the weights' gradient norm.")
    seed: int = Field(0, description="Seed of the run: gate noise, dropout and data order.")
    amp: Optional[Literal["bf16", "fp16"]] = Field(
        None, description="prune(): run the forward passes under torch.autocast in this dtype "
        "(fp16 with a gradient scaler); weights, gates and the budget terms stay float32, and "
        "finalize verifies the compact model in float32.")
    distributed: Literal["ddp", "fsdp"] = Field(
        "ddp", description="prune() under torch.distributed: DistributedDataParallel (every rank "
        "holds the whole model), or FSDP2 (torch.distributed.fsdp.fully_shard: the weights "
        "sharded over the ranks, the gates replicated; gathered for finalize). Checkpoints of "
        "sharded runs: the own loop with hiap_fx.training.sharding.sharded_state and "
        "torch.distributed.checkpoint.")
    hard_control_fraction: float = Field(
        0.3, ge=0.0, le=1.0, description="In this last fraction of the run the budget controller "
        "steers the MACs eval mode selects (what finalize keeps) instead of the expected MACs.")
    finetune_fraction: float = Field(
        0.5, ge=0.0, lt=1.0, description="prune(): this fraction of the run's steps fine-tunes the "
        "finalized compact model (same loss, no gates) after the gated search, which gets the rest; "
        "prune(..., finetune_steps=N) sets the count directly. 0: one phase, as the paper.")
    budget_tolerance: float = Field(
        0.005, ge=0.0, le=0.1, description="If the kept MACs end further than this from the target "
        "(fraction of dense), one logit offset common to every gate is applied to land within it.")
