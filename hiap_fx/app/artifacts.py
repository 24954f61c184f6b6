"""Everything a pruning run leaves on disk: compact model, plan, report and plots."""

from __future__ import annotations

from pathlib import Path
from typing import Union

from torch import nn

from hiap_fx.plan import Plan
from hiap_fx.training.report import PruneReport


def write_outputs(report: PruneReport, compact: nn.Module, plan: Plan, out_dir: Union[str, Path]) -> dict[str, Path]:
    """Write the compact model, plan JSON, report (markdown and JSON) and both plots into
    ``out_dir`` (each file atomically); returns the paths by kind."""
    from hiap_fx.app.plots import plot_history, plot_structure
    from hiap_fx.files.atomic import write_text
    from hiap_fx.io import save

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"compact": out / "compact.pt", "plan": out / "plan.json", "report_md": out / "report.md",
             "report_json": out / "report.json", "structure": out / "structure.png",
             "history": out / "history.png"}
    save(compact, paths["compact"], plan)
    write_text(paths["plan"], plan.model_dump_json(indent=2))
    write_text(paths["report_md"], report.to_markdown())
    write_text(paths["report_json"], report.model_dump_json(indent=2))
    plot_structure(report, paths["structure"])
    plot_history(report, paths["history"])
    return paths
