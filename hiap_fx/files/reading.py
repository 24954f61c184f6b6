"""Opening hiap_fx files: ``torch.load(weights_only=True)`` with every failure named."""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any, Iterable, Union

import torch

from hiap_fx.errors import FileError

#: formats written by earlier versions, and why they are no longer read
RETIRED_FORMATS = {
    "hiap_fx.compact/1": "it stores Python source that loading executed; re-save the model with "
                         "hiap_fx.save from this version",
    "hiap_fx.prune_checkpoint/1": "it pickles the whole prepared model; resume it with "
                                  "trust=True (--trust-file) if you wrote it yourself",
}


def describe(payload: Any) -> str:
    """A short description of what a loaded object is (for error messages)."""
    if isinstance(payload, dict):
        if "format" in payload and isinstance(payload["format"], str):
            return f"a file of format {payload['format']!r}"
        if payload and all(isinstance(v, torch.Tensor) for v in payload.values()):
            return (f"a state dict of {len(payload)} tensors (weights only, no architecture; pass the "
                    "architecture as the model and this file as its weights)")
        return f"a dict with keys {sorted(map(str, payload))[:6]}"
    return f"a {type(payload).__module__}.{type(payload).__qualname__}"


def read_payload(path: Union[str, os.PathLike], formats: Iterable[str], what: str,
                 map_location: Any = None) -> dict[str, Any]:
    """Load ``path`` weights-only and return its payload dict, whose ``format`` must be one of
    ``formats``. Missing, empty, truncated, pickled-object and foreign files raise ``FileError``
    naming the file and ``what`` was expected."""
    p = Path(path)
    formats = tuple(formats)
    if not p.exists():
        raise FileError(f"{p}: no such file (expected {what})")
    if p.is_dir():
        raise FileError(f"{p} is a directory, not {what}")
    if p.stat().st_size == 0:
        raise FileError(f"{p} is empty (expected {what}); an interrupted copy or write?")
    try:
        payload = torch.load(p, weights_only=True, map_location=map_location)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise FileError(f"{p} holds pickled Python objects, which hiap_fx does not unpickle by "
                        f"default ({first}); it is not {what}. If it is a file you wrote yourself "
                        "or otherwise trust (e.g. torch.save of a module), opt in with trust=True "
                        "(--trust-file on the command line)") from None
    except Exception as exc:  # zip, EOF and storage errors of a damaged file
        raise FileError(f"{p} cannot be read as {what}: it is truncated, damaged or not a torch "
                        f"file ({type(exc).__name__}: {str(exc)[:200]})") from None
    fmt = payload.get("format") if isinstance(payload, dict) else None
    if fmt in RETIRED_FORMATS:
        raise FileError(f"{p} has the retired format {fmt!r}: {RETIRED_FORMATS[fmt]}")
    if fmt not in formats:
        raise FileError(f"{p} is {describe(payload)}, not {what} (format {' or '.join(formats)})")
    return payload


def load_trusted(path: Union[str, os.PathLike], what: str, map_location: Any = None) -> Any:
    """Fully unpickle ``path`` (the caller opted in with ``trust=True``); read failures raise
    ``FileError`` naming the file."""
    p = Path(path)
    if not p.is_file() or p.stat().st_size == 0:
        raise FileError(f"{p}: missing or empty (expected {what})")
    try:
        return torch.load(p, weights_only=False, map_location=map_location)
    except Exception as exc:
        raise FileError(f"{p} cannot be read as {what} ({type(exc).__name__}: {str(exc)[:200]})") from None
