"""The ``hiap-fx`` command line."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Optional, Sequence

from hiap_fx.errors import HiapError, InputError


def _size(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.replace("x", ",").split(","))


def _cmd_inspect(args: argparse.Namespace) -> int:
    from hiap_fx.api import inspect
    from hiap_fx.app.models import default_input, load_model, parse_kwargs
    from hiap_fx.config import PruneConfig

    model = load_model(args.model, parse_kwargs(args.kwargs)).eval()
    x = default_input(model, args.batch, _size(args.input_size) if args.input_size else None)
    plan = inspect(model, x, PruneConfig(frontend=args.frontend), show=not args.json)
    if args.json:
        print(plan.model_dump_json(indent=2))
    return 0


def _cmd_finalize(args: argparse.Namespace) -> int:
    from hiap_fx.api import finalize
    from hiap_fx.files.reading import load_trusted
    from hiap_fx.gated.prepared import PreparedModel
    from hiap_fx.io import load, save

    try:
        prepared = load(args.prepared, trust=args.trust_file)
    except HiapError:
        if not args.trust_file:
            raise
        prepared = load_trusted(args.prepared, "a prepared model")  # e.g. torch.save(prepared)
    if not isinstance(prepared, PreparedModel):
        raise InputError(f"{args.prepared} holds a {type(prepared).__name__}, not a PreparedModel "
                         "(save one with hiap_fx.save(prepared, path))")
    compact = finalize(prepared, verify=not args.no_verify)
    save(compact, args.out, prepared.plan)
    dense, hard = prepared.dense_macs, prepared.hard_macs()
    print(f"compact model written to {args.out}: {hard:,} MACs of {dense:,} dense "
          f"({100.0 * hard / dense:.1f}%), {sum(p.numel() for p in compact.parameters()):,} parameters"
          + ("" if args.no_verify else "; verified against the gated model"))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from hiap_fx.app.bench import bench_models, format_bench
    from hiap_fx.app.models import default_input, load_model, parse_kwargs
    from hiap_fx.io import load

    dense = load_model(args.model, parse_kwargs(args.kwargs)).eval()
    if args.weights:
        dense.load_state_dict(_weights(args.weights))
    compact = load(args.compact)
    x = default_input(dense, 1, _size(args.input_size) if args.input_size else None)
    print(format_bench(bench_models(dense, compact, x, args.batches, args.seconds)))
    return 0


def _is_checkpoint(spec: str) -> bool:
    import os

    return os.path.isfile(spec) and not spec.endswith(".py")


def _resume_source(args: argparse.Namespace) -> Optional[str]:
    """The checkpoint this invocation resumes (``--model FILE`` or ``--resume``), or None; refuses
    to start over an existing run in ``--out`` without ``--resume`` / ``--overwrite``."""
    from pathlib import Path

    existing = Path(args.out, "checkpoint.pt")
    if _is_checkpoint(args.model):
        return args.model
    if args.resume:
        if not existing.is_file():
            raise InputError(f"--resume: {args.out} holds no checkpoint.pt to resume")
        return str(existing)
    if existing.exists():
        if not args.overwrite:
            raise InputError(f"{args.out} already holds a pruning run ({existing}); pass --resume to "
                             "continue it or --overwrite to start over")
        existing.unlink()
    return None


def _check_resume_arguments(args: argparse.Namespace, source: str) -> dict:
    from hiap_fx.training.checkpoint import checkpoint_summary

    info = checkpoint_summary(source)
    if args.target is not None and args.target != info["target_macs"]:
        raise InputError(f"resuming {source}: it was started with --target {info['target_macs']}, "
                         f"not {args.target}; drop --target, or start a new run (--overwrite)")
    if args.steps is not None and args.steps != info["total"]:
        raise InputError(f"resuming {source}: it was started for {info['total']} steps, not "
                         f"{args.steps}; drop --steps, or start a new run (--overwrite)")
    return info


def _cmd_prune(args: argparse.Namespace) -> int:
    from hiap_fx.app.artifacts import write_outputs
    from hiap_fx.app.data import load_data
    from hiap_fx.app.models import default_input, load_model, parse_kwargs
    from hiap_fx.config import PruneConfig
    from hiap_fx.training.prune import prune

    source = _resume_source(args)
    model: Any
    if source is not None:
        size = _check_resume_arguments(args, source)["input_shape"][1:]
        model = source
    else:
        model = load_model(args.model, parse_kwargs(args.kwargs)).eval()
        if args.weights:
            model.load_state_dict(_weights(args.weights))
        size = _size(args.input_size) if args.input_size else tuple(default_input(model).shape[1:])
    train, test = load_data(args.data, size, batch_size=args.batch_size, seed=args.seed, limit=args.limit)
    config = None
    if source is None:
        target = 0.5 if args.target is None else args.target
        fields = {"target_macs": target, "lr": args.lr, "gate_lr": args.gate_lr, "seed": args.seed,
                  "frontend": args.frontend, "finetune_fraction": args.finetune_fraction}
        if args.cost == "latency":
            fields.update(cost="latency", target_latency=target, latency_batch=args.latency_batch or 1)
        config = PruneConfig(**{k: v for k, v in fields.items() if v is not None})
    result = prune(model, train, config, steps=None if source else args.steps,
                   epochs=None if source or args.steps else args.epochs, eval_data=test,
                   teacher=None if args.no_teacher else "dense", checkpoint=f"{args.out}/checkpoint.pt",
                   checkpoint_every=args.checkpoint_every, eval_batches=args.eval_batches,
                   progress=not args.quiet, trust=args.trust_file)
    paths = write_outputs(result.report, result.compact, result.prepared.plan, args.out)
    print(result.report.to_markdown())
    print("written: " + ", ".join(str(p) for p in paths.values()))
    return 0


def _weights(path: str) -> dict:
    """A state dict read weights-only, with the file named on failure."""
    import torch

    from hiap_fx.errors import FileError

    try:
        state = torch.load(path, weights_only=True)
    except Exception as exc:
        raise FileError(f"--weights {path}: not a weights-only state dict ({type(exc).__name__}: "
                        f"{str(exc)[:200]})") from None
    if not isinstance(state, dict):
        raise FileError(f"--weights {path}: holds a {type(state).__name__}, not a state dict")
    return state


def _cmd_demo(args: argparse.Namespace) -> int:
    from hiap_fx.app.demo import format_demo, run_demo

    result = run_demo(out_dir=args.out, target=args.target, prune_epochs=args.prune_epochs,
                      bench_seconds=args.bench_seconds, progress=not args.quiet)
    print(format_demo(result, args.out))
    return 0


def _cmd_coverage(args: argparse.Namespace) -> int:
    from hiap_fx.app.coverage import (
        DEFAULT_MODELS,
        OTHER_MODELS,
        attention_set,
        run_coverage,
        timm_vit_family,
    )

    skipped: list = []
    if args.attention:
        args.cache = args.cache or "coverage-cache"
        os.makedirs(args.cache, exist_ok=True)
        models, skipped = attention_set(os.path.join(args.cache, "census.jsonl"),
                                        **({"max_params": args.max_params} if args.max_params else {}))
    elif args.all:
        family, skipped = timm_vit_family(**({"max_params": args.max_params} if args.max_params else {}))
        models = [*family, *OTHER_MODELS]
    else:
        models = args.models or DEFAULT_MODELS
    table = run_coverage(models, out=args.out, readme=args.readme, jobs=args.jobs,
                         timeout=args.timeout, extra_rows=skipped,
                         cache_dir=os.path.join(args.cache, "rows") if args.cache else None,
                         cached_only=args.report, marker="attention-coverage" if args.attention else "coverage")
    print(table)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``hiap-fx``."""
    p = argparse.ArgumentParser(prog="hiap-fx", description="HiAP pruning of any Vision Transformer")
    sub = p.add_subparsers(dest="command", required=True)
    model_help = ("timm model name, FILE.py:FACTORY, pkg.module:factory, torchvision:NAME or "
                  "hf:CLASS (random weights)")
    runs_code = (". FILE.py:FACTORY and pkg.module:factory import and run that code (your model's "
                 "code, by design)")
    q = sub.add_parser("inspect", help="print the attention/FFN sites found and their MAC shares")
    q.add_argument("model", help=model_help + runs_code)
    q.add_argument("--input-size", help="C,H,W of the example input (default: the model's)")
    q.add_argument("--batch", type=int, default=1)
    q.add_argument("--kwargs", help="JSON keyword arguments for the model factory")
    q.add_argument("--frontend", choices=["auto", "fx", "export"], default="auto")
    q.add_argument("--json", action="store_true", help="print the plan as JSON")
    q.set_defaults(func=_cmd_inspect)
    f = sub.add_parser("finalize", help="slice a trained PreparedModel into a compact model")
    f.add_argument("prepared", help="prepared model written by hiap_fx.save(prepared, path) (read as "
                   "data; a torch.save(prepared) pickle needs --trust-file)")
    f.add_argument("--trust-file", action="store_true", help="also read files that need full "
                   "unpickling or name code outside hiap_fx's allow-list (only files you trust)")
    f.add_argument("--out", required=True, help="where to write the compact model (hiap_fx.save)")
    f.add_argument("--no-verify", action="store_true", help="skip the output and MAC check")
    f.set_defaults(func=_cmd_finalize)
    b = sub.add_parser("bench", help="dense vs compact: MACs, parameters, CPU latency")
    b.add_argument("model", help="the dense model: " + model_help + runs_code)
    b.add_argument("--compact", required=True, help="file written by hiap-fx finalize / hiap_fx.save")
    b.add_argument("--weights", help="state dict for the dense model (weights-only torch file)")
    b.add_argument("--kwargs", help="JSON keyword arguments for the model factory")
    b.add_argument("--input-size", help="C,H,W of the input (default: the model's)")
    b.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    b.add_argument("--seconds", type=float, default=10.0, help="time budget per batch size")
    b.set_defaults(func=_cmd_bench)
    r = sub.add_parser("prune", help="train with HiAP gates on a dataset to a MAC target; write the "
                       "compact model, plan, report and plots")
    r.add_argument("--model", required=True, help=model_help + ", or a checkpoint written by prune "
                   "(resumes it; read as data)" + runs_code)
    r.add_argument("--resume", action="store_true", help="continue the run in --out (its "
                   "checkpoint.pt); --target / --steps, if given, must equal the run's")
    r.add_argument("--overwrite", action="store_true", help="start over although --out holds a run")
    r.add_argument("--trust-file", action="store_true", help="resume checkpoints of earlier "
                   "versions, which need full unpickling (only files you wrote yourself)")
    r.add_argument("--data", required=True, help="fashion-mnist or imagefolder:PATH (class "
                   "sub-folders; train/ and val/ used when present)")
    r.add_argument("--target", type=float, help="fraction of dense MACs (or, with --cost latency, "
                   "of dense latency) to keep (default 0.5)")
    r.add_argument("--cost", choices=["macs", "latency"], help="what the budget counts (default macs; "
                   "latency is calibrated on this machine at --latency-batch)")
    r.add_argument("--latency-batch", type=int, help="with --cost latency: the batch size you deploy "
                   "with (default 1)")
    r.add_argument("--steps", type=int, help="training steps (default: --epochs)")
    r.add_argument("--epochs", type=float, default=1, help="epochs when --steps is not given")
    r.add_argument("--out", required=True, help="output folder")
    r.add_argument("--weights", help="state dict to load into the model first (weights-only file)")
    r.add_argument("--kwargs", help="JSON keyword arguments for the model factory")
    r.add_argument("--input-size", help="C,H,W the data is resized to (default: the model's)")
    r.add_argument("--batch-size", type=int, default=64)
    r.add_argument("--lr", type=float, help="weights' learning rate (default: PruneConfig's)")
    r.add_argument("--gate-lr", type=float, help="gate logits' learning rate (default: automatic)")
    r.add_argument("--finetune-fraction", type=float, help="last fraction of the steps that fine-tunes "
                   "the finalized compact model (default: PruneConfig's 0.5; 0: one phase)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--limit", type=int, help="use at most this many examples per split (smoke runs)")
    r.add_argument("--eval-batches", type=int, help="batches per intermediate evaluation")
    r.add_argument("--checkpoint-every", type=int, help="write OUT/checkpoint.pt every N steps")
    r.add_argument("--no-teacher", action="store_true", help="no distillation from the dense model")
    r.add_argument("--frontend", choices=["auto", "fx", "export"])
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.set_defaults(func=_cmd_prune)
    d = sub.add_parser("demo", help="the embedded default: Fashion-MNIST ViT trained (or cached), "
                       "pruned to 50%% MACs, finalized and measured")
    d.add_argument("--out", default="hiap_demo", help="folder for report, plots and compact model")
    d.add_argument("--target", type=float, default=0.5)
    d.add_argument("--prune-epochs", type=float, default=2.0)
    d.add_argument("--bench-seconds", type=float, default=5.0)
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(func=_cmd_demo)
    c = sub.add_parser("coverage", help="run discovery over many models and write a table")
    c.add_argument("models", nargs="*", help="model specs (default: the built-in list)")
    c.add_argument("--out", help="write the markdown table to this file")
    c.add_argument("--readme", help="replace the section between the coverage markers of this "
                   "markdown file (docs/coverage.md)")
    c.add_argument("--all", action="store_true", help="every timm ViT-family model (vit_*, deit*, "
                   "eva*, beit*, cait*, swin*, pvt*, flexivit*) at a small image size, plus HF "
                   "transformers and torchvision ViTs")
    c.add_argument("--attention", action="store_true", help="every timm model that makes an "
                   "attention call (sdpa or softmax over q @ k^T, counted on the meta device), every "
                   "HF transformers image classifier (depth cut) and torchvision's attention models")
    c.add_argument("--cache", help="keep each finished model's row (and the census) in this folder; "
                   "a second run resumes from it (default with --attention: ./coverage-cache)")
    c.add_argument("--report", action="store_true", help="with --cache: probe nothing, tabulate the "
                   "cached rows (models not probed yet are counted as pending)")
    c.add_argument("--max-params", type=float, default=None, help="with --all / --attention: skip (and "
                   "list) models with more parameters than this (default 7e8 with --all; 3e9 with "
                   "--attention, whose models over 7e8 are probed in bf16)")
    c.add_argument("--jobs", type=int, default=0, help="run each model in its own process, this "
                   "many at a time (0: in this process)")
    c.add_argument("--timeout", type=float, default=600.0, help="seconds per model with --jobs")
    c.set_defaults(func=_cmd_coverage)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``hiap-fx`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except HiapError as exc:
        print(f"hiap-fx: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
