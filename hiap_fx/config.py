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
