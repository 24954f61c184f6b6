"""The ``hiap-fx`` command line."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from .errors import HiapError, InputError


def _size(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.replace("x", ",").split(","))


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .api import inspect
    from .config import PruneConfig
    from .models import default_input, load_model, parse_kwargs

    model = load_model(args.model, parse_kwargs(args.kwargs)).eval()
    x = default_input(model, args.batch, _size(args.input_size) if args.input_size else None)
    plan = inspect(model, x, PruneConfig(frontend=args.frontend), show=not args.json)
    if args.json:
        print(plan.model_dump_json(indent=2))
    return 0


def _cmd_finalize(args: argparse.Namespace) -> int:
    import torch

    from .api import finalize
    from .io import save
    from .prepared import PreparedModel

    prepared = torch.load(args.prepared, weights_only=False)  # a torch.save(prepared) file
    if not isinstance(prepared, PreparedModel):
        raise InputError(f"{args.prepared} holds a {type(prepared).__name__}, not a PreparedModel "
                         "(save one with torch.save(prepared, path))")
    compact = finalize(prepared, verify=not args.no_verify)
    save(compact, args.out, prepared.plan)
    dense, hard = prepared.dense_macs, prepared.hard_macs()
    print(f"compact model written to {args.out}: {hard:,} MACs of {dense:,} dense "
          f"({100.0 * hard / dense:.1f}%), {sum(p.numel() for p in compact.parameters()):,} parameters"
          + ("" if args.no_verify else "; verified against the gated model"))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench import bench_models, format_bench
    from .io import load
    from .models import default_input, load_model, parse_kwargs

    dense = load_model(args.model, parse_kwargs(args.kwargs)).eval()
    if args.weights:
        import torch

        dense.load_state_dict(torch.load(args.weights, weights_only=True))
    compact = load(args.compact)
    x = default_input(dense, 1, _size(args.input_size) if args.input_size else None)
    print(format_bench(bench_models(dense, compact, x, args.batches, args.seconds)))
    return 0


def _cmd_coverage(args: argparse.Namespace) -> int:
    from .coverage import DEFAULT_MODELS, run_coverage

    models = args.models or DEFAULT_MODELS
    table = run_coverage(models, out=args.out, readme=args.readme)
    print(table)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``hiap-fx``."""
    p = argparse.ArgumentParser(prog="hiap-fx", description="HiAP pruning of any Vision Transformer")
    sub = p.add_subparsers(dest="command", required=True)
    model_help = ("timm model name, FILE.py:FACTORY, pkg.module:factory, torchvision:NAME or "
                  "hf:CLASS (random weights)")
    q = sub.add_parser("inspect", help="print the attention/FFN sites found and their MAC shares")
    q.add_argument("model", help=model_help)
    q.add_argument("--input-size", help="C,H,W of the example input (default: the model's)")
    q.add_argument("--batch", type=int, default=1)
    q.add_argument("--kwargs", help="JSON keyword arguments for the model factory")
    q.add_argument("--frontend", choices=["auto", "fx", "export"], default="auto")
    q.add_argument("--json", action="store_true", help="print the plan as JSON")
    q.set_defaults(func=_cmd_inspect)
    f = sub.add_parser("finalize", help="slice a trained PreparedModel into a compact model")
    f.add_argument("prepared", help="file written by torch.save(prepared) (trusted: it is unpickled)")
    f.add_argument("--out", required=True, help="where to write the compact model (hiap_fx.save)")
    f.add_argument("--no-verify", action="store_true", help="skip the output and MAC check")
    f.set_defaults(func=_cmd_finalize)
    b = sub.add_parser("bench", help="dense vs compact: MACs, parameters, CPU latency")
    b.add_argument("model", help="the dense model: " + model_help)
    b.add_argument("--compact", required=True, help="file written by hiap-fx finalize / hiap_fx.save")
    b.add_argument("--weights", help="state dict for the dense model (weights-only torch file)")
    b.add_argument("--kwargs", help="JSON keyword arguments for the model factory")
    b.add_argument("--input-size", help="C,H,W of the input (default: the model's)")
    b.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    b.add_argument("--seconds", type=float, default=10.0, help="time budget per batch size")
    b.set_defaults(func=_cmd_bench)
    c = sub.add_parser("coverage", help="run discovery over many models and write a table")
    c.add_argument("models", nargs="*", help="model specs (default: the built-in list)")
    c.add_argument("--out", help="write the markdown table to this file")
    c.add_argument("--readme", help="replace the coverage section of this README")
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
