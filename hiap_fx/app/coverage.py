"""Coverage: run discovery over many real model definitions and tabulate what was found."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from typing import Any, Optional, Sequence, Union

import torch

from hiap_fx.files.atomic import write_text

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


#: timm name patterns of the ViT families the full coverage run goes over.
TIMM_VIT_FAMILIES = ["vit_*", "deit*", "eva*", "beit*", "cait*", "swin*", "pvt*", "flexivit*"]

#: Other front ends in the full run: HF transformers 5 vision models, torchvision ViT/Swin.
OTHER_MODELS: list[ModelSpec] = [
    ("hf:ViTForImageClassification", _SMALL_HF), ("hf:DeiTForImageClassification", _SMALL_HF),
    ("hf:BeitForImageClassification", _SMALL_HF), ("hf:Dinov2Model", _SMALL_HF),
    ("hf:ViTModel", {}), ("hf:Dinov2Model", {"image_size": 224}),
    ("torchvision:vit_b_16", {"image_size": 64}), ("torchvision:vit_b_32", {"image_size": 64}),
    ("torchvision:vit_l_16", {"image_size": 64}), ("torchvision:vit_l_32", {"image_size": 64}),
    ("torchvision:vit_h_14", {"image_size": 70}), "torchvision:swin_t", "torchvision:swin_v2_t",
]

#: The smallest side the full run asks timm models for (rounded up to the patch size).
SMALL_SIDE = 64


def _spec(entry: ModelSpec) -> tuple[str, dict[str, Any]]:
    return (entry, {}) if isinstance(entry, str) else (entry[0], dict(entry[1]))


def timm_vit_family(max_params: float = 7e8) -> tuple[list[ModelSpec], list[dict[str, Any]]]:
    """Every timm model matching :data:`TIMM_VIT_FAMILIES`, each asked for a small image
    (``img_size`` = :data:`SMALL_SIDE` rounded up to its patch size), and the rows of those left
    out because they have more than ``max_params`` parameters (counted on the meta device)."""
    import timm

    entries: list[ModelSpec] = []
    skipped: list[dict[str, Any]] = []
    for name in timm.list_models(TIMM_VIT_FAMILIES):
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False)
        params = sum(p.numel() for p in model.parameters())
        if params > max_params:
            skipped.append({"model": name, "status": "skipped",
                            "reason": f"{params / 1e6:.0f}M parameters > {max_params / 1e6:.0f}M limit "
                                      "of this CPU run"})
            continue
        patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
        step = max(patch) if isinstance(patch, (tuple, list)) else int(patch or 16)
        entries.append((name, {"img_size": -(-SMALL_SIDE // step) * step}))
    return entries, skipped


#: models above this many parameters are probed with bf16 weights (as giants are deployed)
BF16_ABOVE = 7e8


def attention_set(cache: str, max_params: float = 3e9) -> tuple[list[ModelSpec], list[dict[str, Any]]]:
    """Every timm model that makes an attention call (sdpa, or softmax over q @ k^T; counted on
    the meta device, cached line by line in ``cache`` so an interrupted census resumes), each
    asked for a small image where it has a patch size (models over ``BF16_ABOVE`` parameters in
    bf16), plus every HF transformers image-classification class (depth cut, widths kept) and
    torchvision's attention models. Returns the entries and the rows of timm models skipped for
    size (over ``max_params``: the model, the prepared copy and the compact one do not fit)."""
    import timm

    from hiap_fx.app.census import TORCHVISION_ATTENTION, hf_image_classifiers, meta_census, small_hf_kwargs

    done: dict[str, dict[str, Any]] = {}
    if os.path.exists(cache):
        with open(cache) as fh:
            done = {r["model"]: r for r in map(json.loads, fh) if r.get("model")}
    entries: list[ModelSpec] = []
    skipped: list[dict[str, Any]] = []
    from tqdm import tqdm

    for name in tqdm(timm.list_models(), desc="census", disable=len(done) > 0):
        if name not in done:
            try:
                done[name] = meta_census(name)
            except Exception as exc:  # noqa: BLE001 - a model that does not run on meta: probe it
                done[name] = {"model": name, "calls": -1, "params": 0, "patch": 0,
                              "error": f"{type(exc).__name__}: {str(exc)[:100]}"}
            with open(cache, "a") as fh:
                fh.write(json.dumps(done[name]) + "\n")
        row = done[name]
        if row["calls"] == 0:
            continue
        if row["params"] > max_params:
            gib = 2 * row["params"] / 2**30
            skipped.append({"model": name, "status": "skipped", "calls": row["calls"],
                            "reason": f"{row['params'] / 1e6:.0f}M parameters: {gib:.0f} GiB of bf16 "
                                      "weights; the model, its prepared copy and the compact model "
                                      f"(about 2.8x the weights in the probe) exceed this 24 GiB "
                                      f"machine above {max_params / 1e9:.0f}B parameters"})
            continue
        step = row["patch"]
        kwargs: dict[str, Any] = {"img_size": -(-SMALL_SIDE // step) * step} if step else {}
        if row["params"] > BF16_ABOVE:
            kwargs[DTYPE_KEY] = "bfloat16"
        entries.append((name, kwargs))
    entries += [(f"hf:{cls}", small_hf_kwargs(cls)) for cls in hf_image_classifiers()]
    entries += [(f"torchvision:{name}", {}) for name in TORCHVISION_ATTENTION]
    return entries, skipped


#: a probe's keyword that is not the model's: the dtype its weights are cast to
DTYPE_KEY = "hiap_dtype"


def probe(entry: ModelSpec) -> dict[str, Any]:
    """Prepare one model, check the prepared graph reproduces it and its cost model matches the
    counter, and summarise the plan."""
    from hiap_fx import count_macs, prepare
    from hiap_fx.app.census import count_attention_calls
    from hiap_fx.app.models import default_input, load_model
    from hiap_fx.errors import HiapError
    from hiap_fx.passes.capture import outputs_match

    name, kwargs = _spec(entry)
    dtype = getattr(torch, kwargs.pop(DTYPE_KEY, "float32"))
    row: dict[str, Any] = {"model": name}
    t0 = time.perf_counter()
    try:
        model, x = _build(name, kwargs, load_model, default_input)
        model, x = model.to(dtype), x.to(dtype)
        row["input"] = "x".join(map(str, x.shape[1:])) + ("" if dtype == torch.float32 else f" {str(dtype)[6:]}")
        row["calls"] = count_attention_calls(model, x).calls
        prepared = prepare(model, x)
        plan = prepared.plan
        x2 = torch.randn(2, *x.shape[1:]).to(dtype)
        with torch.no_grad():
            ok, err = outputs_match(model(x2), prepared.eval()(x2), rtol=max(1e-4, 8 * torch.finfo(dtype).eps))
        counted = count_macs(model, x)
        # one-hot products computed as gathers are MACs the prepared model does not spend
        cost_ok = prepared.dense_macs + plan.macs_not_spent == counted and prepared.dense_macs == prepared.hard_macs()
        row["finalize"] = _finalize_check(prepared)
        heads = sorted({(s.num_heads, s.head_dim) for s in plan.attention})
        row.update(
            status="ok" if ok and cost_ok and row["finalize"].startswith("ok") else "mismatch",
            frontend=plan.frontend,
            gates=sum(g.logits.numel() for g in prepared.gate_modules().values()),
            cost=("exact" + (f" ({plan.macs_not_spent:,} fewer: one-hot products as gathers)"
                             if plan.macs_not_spent else "")) if cost_ok
            else f"{prepared.dense_macs} vs counter {counted}",
            attention=len(plan.attention),
            sited=len(plan.attention) if row["finalize"].startswith("ok") and ok else 0,
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


def _build(name: str, kwargs: dict[str, Any], load_model, default_input) -> tuple[torch.nn.Module, torch.Tensor]:
    """The model and an example input; a requested small image size the model cannot build or
    run at (window or grid constraints) falls back to the model's default size."""
    if "img_size" in kwargs:
        try:
            model = load_model(name, kwargs).eval()
            x = default_input(model, batch=1)
            with torch.no_grad():
                model(x)
            return model, x
        except Exception:  # noqa: BLE001 - the model's own constraint, not hiap_fx's
            kwargs = {k: v for k, v in kwargs.items() if k != "img_size"}
    model = load_model(name, kwargs).eval()
    return model, default_input(model, batch=1)


_COLUMNS = ["model", "status", "frontend", "input", "calls", "attention", "heads", "ffn", "hidden", "prunable",
            "gates", "cost", "finalize", "unclaimed", "seconds", "reason"]


def randomise_gates(prepared: Any, seed: int, p_off: float) -> None:
    """Pin every gate logit to -3 (closed, probability ``p_off``) or +3 (open), reproducibly;
    every attention keeps at least one head open, as ``PruneConfig(min_heads=1)`` does in
    training (an attention off the residual stream cannot close entirely)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, gate in prepared.gate_modules().items():
            off = torch.rand(gate.logits.shape, generator=gen) < p_off
            if key.endswith(".head") and bool(off.all()):
                off.view(-1)[0] = False
            gate.logits.copy_(torch.where(off, -3.0, 3.0))


def _finalize_check(prepared: Any, p_off: float = 0.3, seed: int = 0) -> str:
    """Close a random ``p_off`` of every gate's units, finalize (which verifies output and MACs)
    and report the kept share of MACs, or the error."""
    from hiap_fx import finalize
    from hiap_fx.errors import HiapError

    randomise_gates(prepared, seed, p_off)
    try:
        finalize(prepared.eval())
    except HiapError as exc:
        return f"error: {str(exc)[:120]}"
    return f"ok ({100.0 * prepared.hard_macs() / prepared.dense_macs:.0f}% MACs)"


def _family(row: dict[str, Any]) -> str:
    model = row["model"]
    if model.startswith("hf:"):
        return "HF transformers"
    if model.startswith("torchvision:"):
        return "torchvision"
    return "other" if ":" in model else "timm"


def _calls(row: dict[str, Any]) -> int:
    """Attention calls of a row: the census count, or the sites found where the census saw fewer."""
    calls = row.get("calls")
    calls = calls if isinstance(calls, int) and calls > 0 else 0
    return max(calls, int(row.get("sited") or 0))


def attention_summary(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Per source, of the attention calls the models make, how many became sites that finalize
    exactly; models fully sited / partly sited / FFN only / refused; the commonest reasons."""
    with_calls = [r for r in rows if r["status"] not in ("skipped", "pending") and _calls(r) > 0]
    if not with_calls:
        return []
    lines = ["", "Attention calls (sdpa, or softmax over q @ k^T, counted by running each model; a "
             "call is *sited* when it became a gated site and the model finalized exactly):", ""]
    lines += ["| source | models with attention | fully sited | partly sited | FFN only | refused / failed "
              "| attention calls | sited | share |", "|---|---|---|---|---|---|---|---|---|"]
    total_calls = total_sited = 0
    for family in ("timm", "HF transformers", "torchvision", "other"):
        group = [r for r in with_calls if _family(r) == family]
        if not group:
            continue
        calls = sum(_calls(r) for r in group)
        sited = sum(int(r.get("sited") or 0) for r in group)
        ok = [r for r in group if r["status"] == "ok"]
        full = sum(int(r.get("sited") or 0) == _calls(r) for r in ok)
        ffn_only = sum(int(r.get("sited") or 0) == 0 for r in ok)
        lines.append(f"| {family} | {len(group)} | {full} | {len(ok) - full - ffn_only} | {ffn_only} | "
                     f"{len(group) - len(ok)} | {calls} | {sited} | {100.0 * sited / max(calls, 1):.1f}% |")
        total_calls, total_sited = total_calls + calls, total_sited + sited
    lines.append(f"| **all** | {len(with_calls)} | | | | | {total_calls} | {total_sited} | "
                 f"**{100.0 * total_sited / max(total_calls, 1):.1f}%** |")
    reasons: dict[str, list[int]] = {}
    for r in with_calls:
        missing = _calls(r) - int(r.get("sited") or 0)
        if missing <= 0:
            continue
        text = str(r.get("reason") or r.get("finalize") or "")
        first = re.sub(r"_\d+|\d+", "N", text.split("; ")[0])[:110]
        entry = reasons.setdefault(first, [0, 0])
        entry[0] += 1
        entry[1] += missing
    if reasons:
        lines += ["", "Unsited attention calls by (first) reason: models, calls", ""]
        for text, (n_models, n_calls) in sorted(reasons.items(), key=lambda kv: -kv[1][1])[:25]:
            lines.append(f"- {n_models} models, {n_calls} calls: {text}")
    return lines


def to_markdown(rows: Sequence[dict[str, Any]], details: bool = False) -> str:
    """Rows as a markdown table under a summary per source (timm / HF / torchvision); models
    skipped for size are counted apart. ``details`` folds the table into a <details> block."""
    lines = []
    for family in ("timm", "HF transformers", "torchvision", "other"):
        group = [r for r in rows if _family(r) == family and r["status"] != "pending"]
        tried = [r for r in group if r["status"] != "skipped"]
        if not group:
            continue
        ok = sum(r["status"] == "ok" for r in tried)
        ffn_only = sum(r["status"] == "ok" and str(r.get("attention")) == "0" for r in tried)
        skipped = len(group) - len(tried)
        others = sorted({r["status"] for r in tried} - {"ok"})
        counts = ", ".join(f"{sum(r['status'] == s for r in tried)} {s}" for s in others)
        lines.append(f"- {family}: **{ok}/{len(tried)} ok ({100.0 * ok / max(len(tried), 1):.1f}%)**"
                     + (f" ({ffn_only} of them FFN only: attention that cannot be cut exactly, "
                        "reported)" if ffn_only else "")
                     + (f", {counts}" if counts else "")
                     + (f"; {skipped} more skipped for size (listed at the end)" if skipped else ""))
    pending = [r for r in rows if r["status"] == "pending"]
    if pending:
        lines.append(f"- **{len(pending)} more not probed yet** (the run is resumable: the same "
                     "command continues from the cached rows)")
    lines += attention_summary(rows)
    lines += ["", "ok = prepared, reproduced exactly with every gate on, costed exactly (dense MACs = "
              "corrected counter = hard MACs), and finalized with 30% of every gate's units closed "
              "at random (compact output and MACs verified).", ""]
    if details:
        lines += ["<details><summary>the table, one row per model</summary>", ""]
    lines += ["| " + " | ".join(_COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
    for r in rows:
        if r["status"] != "pending":
            lines.append("| " + " | ".join(str(r.get(c, "")).replace("|", "/").replace("\n", " ")
                                           for c in _COLUMNS) + " |")
    if details:
        lines += ["", "</details>"]
    return "\n".join(lines)


def probe_isolated(entry: ModelSpec, timeout: float) -> dict[str, Any]:
    """:func:`probe` in a fresh Python process (a crash, hang or out-of-memory kill of one model
    becomes its row instead of ending the run)."""
    name, kwargs = _spec(entry)
    cmd = [sys.executable, "-m", "hiap_fx.app.coverage", json.dumps([name, kwargs])]
    t0 = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"model": name, "status": "timeout", "seconds": f"{time.perf_counter() - t0:.0f}",
                "reason": f"no result within {timeout:.0f} s"}
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"model": name, "status": "error", "seconds": f"{time.perf_counter() - t0:.0f}",
                "reason": f"worker exited {done.returncode}: {tail[:150]}"}
    return json.loads(lines[-1])


def _cached(cache_dir: Optional[str], entry: ModelSpec, run: Any) -> dict[str, Any]:
    """``run(entry)``, or its row from ``cache_dir`` (one JSON file per model spec, written
    atomically when it finishes: an interrupted run resumes where it stopped)."""
    if not cache_dir:
        return run(entry)
    name, kwargs = _spec(entry)
    key = re.sub(r"[^A-Za-z0-9_.-]+", "_", name + ("_" + json.dumps(kwargs, sort_keys=True) if kwargs else ""))
    path = os.path.join(cache_dir, key[:200] + ".json")
    if os.path.exists(path):
        with open(path) as fh:
            return json.load(fh)
    if run is None:
        return {"model": name, "status": "pending", "reason": "not probed yet"}
    row = run(entry)
    if row.get("status") != "timeout":
        write_text(path, json.dumps(row) + "\n")
    return row


def run_coverage(models: Sequence[ModelSpec], out: Optional[str] = None,
                 readme: Optional[str] = None, jobs: int = 0, timeout: float = 600.0,
                 extra_rows: Sequence[dict[str, Any]] = (), cache_dir: Optional[str] = None,
                 cached_only: bool = False, marker: str = "coverage") -> str:
    """Probe every model, return the markdown table, optionally write it to files.

    ``jobs`` > 0 runs each model in its own process, ``jobs`` at a time, each for at most
    ``timeout`` seconds; ``extra_rows`` (e.g. models skipped for size) are appended as given;
    ``cache_dir`` keeps each finished row, so a second call reuses them; ``cached_only`` probes
    nothing and reports models without a cached row as pending; ``readme`` replaces the section
    between ``<!-- {marker}:start -->`` and ``<!-- {marker}:end -->``."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    models = list(models)
    if cache_dir:
        os.makedirs(cache_dir, exist_ok=True)
    if cached_only:
        if not cache_dir:
            raise ValueError("cached_only needs a cache_dir")
        rows = [_cached(cache_dir, m, None) for m in models]
    elif jobs > 0:
        torch_threads = max(1, (os.cpu_count() or 1) // jobs)
        os.environ.setdefault("OMP_NUM_THREADS", str(torch_threads))
        with ThreadPoolExecutor(jobs) as pool:
            rows = list(tqdm(pool.map(lambda m: _cached(cache_dir, m, lambda e: probe_isolated(e, timeout)),
                                      models), total=len(models), desc="coverage"))
    else:
        rows = [_cached(cache_dir, m, probe) for m in tqdm(models, desc="coverage")]
    rows += list(extra_rows)
    table = to_markdown(rows, details=len(rows) > 60)
    if out:
        write_text(out, table + "\n")
    if readme:
        with open(readme) as fh:
            text = fh.read()
        pattern = re.compile(rf"(<!-- {marker}:start -->\n).*?(<!-- {marker}:end -->)", re.S)
        if not pattern.search(text):
            raise ValueError(f"{readme} has no '<!-- {marker}:start -->' ... end markers")
        text = pattern.sub(lambda m: m.group(1) + table + "\n" + m.group(2), text)
        write_text(readme, text)
    return table


if __name__ == "__main__":  # worker of probe_isolated: one model spec as JSON, one JSON row out
    _name, _kwargs = json.loads(sys.argv[1])
    print(json.dumps(probe((_name, _kwargs))))
