"""The ``hiap-fx`` command line."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from .errors import HiapError


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
