"""Coverage: run discovery over many real model definitions and tabulate what was found."""

from __future__ import annotations

import re
import time
from typing import Any, Optional, Sequence, Union

import torch

ModelSpec = Union[str, tuple[str, dict[str, Any]]]

_SMALL_HF = dict(image_size=64, patch_size=16, hidden_size=96, num_hidden_layers=2,
                 num_attention_heads=3, intermediate_size=192)

#: timm ViT-family models plus HuggingFace transformers and torchvision ViTs (random weights).
DEFAULT_MODELS: list[ModelSpec] = [
    "deit_tiny_patch16_224", "deit_small_patch16_224", "deit_tiny_distilled_patch16_224",
    "deit3_small_patch16_224", "vit_tiny_patch16_224", "vit_small_patch16_224",
    "vit_base_patch16_224", "vit_base_patch32_224", "vit_small_patch16_224.augreg_in21k",
    ("vit_small_patch14_dinov2", {"img_size": 224}),
    ("vit_small_patch14_reg4_dinov2", {"img_size": 224}),
    "vit_medium_patch16_reg4_gap_256", "vit_little_patch16_reg4_gap_256",
    "vit_base_patch16_rope_reg1_gap_256", "vit_relpos_small_patch16_224",
    "vit_srelpos_small_patch16_224", "vit_relpos_medium_patch16_cls_224",
    "vit_base_patch16_siglip_224", "flexivit_small", "eva02_tiny_patch14_224",
    "eva02_small_patch14_224", "beit_base_patch16_224", "beitv2_base_patch16_224",
    "cait_xxs24_224", "swin_tiny_patch4_window7_224", "swinv2_tiny_window8_256",
    "pvt_v2_b0", "pvt_v2_b1", "twins_svt_small", "levit_128s", "xcit_nano_12_p16_224",
    "crossvit_tiny_240", "convit_tiny", "mobilevit_xs",
    ("hf:ViTForImageClassification", _SMALL_HF), ("hf:DeiTForImageClassification", _SMALL_HF),
    ("hf:BeitForImageClassification", _SMALL_HF), ("hf:Dinov2Model", _SMALL_HF),
    "torchvision:vit_b_16",
]


def _spec(entry: ModelSpec) -> tuple[str, dict[str, Any]]:
    return (entry, {}) if isinstance(entry, str) else (entry[0], dict(entry[1]))


def probe(entry: ModelSpec) -> dict[str, Any]:
    """Prepare one model, check the prepared graph reproduces it and its cost model matches the
    counter, and summarise the plan."""
    from . import count_macs, prepare
    from .errors import HiapError
    from .models import default_input, load_model
    from .passes.capture import outputs_match

    name, kwargs = _spec(entry)
    row: dict[str, Any] = {"model": name}
    t0 = time.perf_counter()
    try:
        model = load_model(name, kwargs).eval()
        x = default_input(model, batch=1)
        prepared = prepare(model, x)
        plan = prepared.plan
        x2 = torch.randn(2, *x.shape[1:])
        with torch.no_grad():
            ok, err = outputs_match(model(x2), prepared.eval()(x2), rtol=1e-4)
        counted = count_macs(model, x)
        cost_ok = prepared.dense_macs == counted == prepared.hard_macs()
        row["finalize"] = _finalize_check(prepared)
        heads = sorted({(s.num_heads, s.head_dim) for s in plan.attention})
        row.update(
            status="ok" if ok and cost_ok and row["finalize"].startswith("ok") else "mismatch",
            frontend=plan.frontend,
            gates=sum(g.logits.numel() for g in prepared.gate_modules().values()),
            cost="exact" if cost_ok else f"{prepared.dense_macs} vs counter {counted}",
            attention=len(plan.attention),
            heads=", ".join(f"{h}x{d}" for h, d in heads),
            ffn=len(plan.ffn), hidden=", ".join(str(h) for h in sorted({s.hidden for s in plan.ffn})),
            unclaimed=len(plan.unclaimed),
            prunable=f"{100.0 * (sum(s.macs for s in plan.attention) + sum(s.macs for s in plan.ffn)) / max(plan.total_macs, 1):.0f}%",
            reason="; ".join(sorted({u.reason[:90] for u in plan.unclaimed}))[:160] if plan.unclaimed
            else ("" if ok else f"output differs (rel {err:.1e})"))
    except HiapError as exc:
        row.update(status="refused", reason=f"{type(exc).__name__}: {str(exc)[:160]}")
    except Exception as exc:  # a model that does not even build here
        row.update(status="error", reason=f"{type(exc).__name__}: {str(exc)[:160]}")
    row["seconds"] = f"{time.perf_counter() - t0:.1f}"
    return row


_COLUMNS = ["model", "status", "frontend", "attention", "heads", "ffn", "hidden", "prunable",
            "gates", "cost", "finalize", "unclaimed", "seconds", "reason"]


def randomise_gates(prepared: Any, seed: int, p_off: float) -> None:
    """Pin every gate logit to -3 (closed, probability ``p_off``) or +3 (open), reproducibly."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in prepared.gate_modules().values():
            off = torch.rand(gate.logits.shape, generator=gen) < p_off
            gate.logits.copy_(torch.where(off, -3.0, 3.0))


def _finalize_check(prepared: Any, p_off: float = 0.3, seed: int = 0) -> str:
    """Close a random ``p_off`` of every gate's units, finalize (which verifies output and MACs)
    and report the kept share of MACs, or the error."""
    from . import finalize
    from .errors import HiapError

    randomise_gates(prepared, seed, p_off)
    try:
        finalize(prepared.eval())
    except HiapError as exc:
        return f"error: {str(exc)[:120]}"
    return f"ok ({100.0 * prepared.hard_macs() / prepared.dense_macs:.0f}% MACs)"


def to_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """Rows as a markdown table with a one-line summary."""
    ok = sum(r["status"] == "ok" for r in rows)
    lines = [f"Coverage: {ok}/{len(rows)} models prepared, reproduced exactly with every gate on, "
             "costed exactly (dense MACs = corrected counter = hard MACs), and finalized with 30% "
             "of every gate's units closed at random (compact output and MACs verified).", "",
             "| " + " | ".join(_COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(c, "")).replace("|", "/") for c in _COLUMNS) + " |")
    return "\n".join(lines)


def run_coverage(models: Sequence[ModelSpec], out: Optional[str] = None,
                 readme: Optional[str] = None) -> str:
    """Probe every model, return the markdown table, optionally write it to files."""
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = lambda it, **_: it  # noqa: E731
    rows = [probe(m) for m in tqdm(list(models), desc="coverage")]
    table = to_markdown(rows)
    if out:
        with open(out, "w") as fh:
            fh.write(table + "\n")
    if readme:
        with open(readme) as fh:
            text = fh.read()
        pattern = re.compile(r"(<!-- coverage:start -->\n).*?(<!-- coverage:end -->)", re.S)
        if not pattern.search(text):
            raise ValueError(f"{readme} has no '<!-- coverage:start -->' ... end markers")
        text = pattern.sub(lambda m: m.group(1) + table + "\n" + m.group(2), text)
        with open(readme, "w") as fh:
            fh.write(text)
    return table
