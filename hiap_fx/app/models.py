"""Load a model from a command-line spec: a timm name, ``file.py:factory``, ``pkg.mod:factory``,
``torchvision:NAME`` or ``hf:ARCH`` (a HuggingFace transformers class built from its default
config, random weights)."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
from typing import Any, Optional

import torch
from torch import nn

from hiap_fx.errors import InputError


def load_model(spec: str, kwargs: Optional[dict[str, Any]] = None) -> nn.Module:
    """Build the model ``spec`` names, with random weights (nothing is downloaded)."""
    kwargs = dict(kwargs or {})
    if ":" in spec and not spec.startswith(("timm:", "torchvision:", "hf:")):
        target, factory = spec.rsplit(":", 1)
        if target.endswith(".py"):
            if not os.path.exists(target):
                raise InputError(f"model file {target!r} does not exist")
            mod_spec = importlib.util.spec_from_file_location(os.path.basename(target)[:-3], target)
            if mod_spec is None or mod_spec.loader is None:
                raise InputError(f"model file {target!r} cannot be loaded as a Python module")
            module = importlib.util.module_from_spec(mod_spec)
            sys.modules.setdefault(mod_spec.name, module)  # dataclasses and pickling look it up
            mod_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
        fn = getattr(module, factory, None)
        if fn is None:
            raise InputError(f"{target} has no attribute {factory!r}")
        return fn(**kwargs)
    if spec.startswith("torchvision:"):
        import torchvision

        return torchvision.models.get_model(spec.split(":", 1)[1], weights=None, **kwargs)
    if spec.startswith("hf:"):
        import transformers

        cls = getattr(transformers, spec.split(":", 1)[1])
        cfg_cls = cls.config_class
        return cls(cfg_cls(**kwargs))
    import timm

    name = spec.split(":", 1)[1] if spec.startswith("timm:") else spec
    if name not in timm.list_models() and name.split(".")[0] not in timm.list_models():
        raise InputError(f"{name!r} is neither a timm model name nor FILE.py:FACTORY / "
                         "pkg.module:factory / torchvision:NAME / hf:CLASS")
    return timm.create_model(name, pretrained=False, **kwargs)


def default_input(model: nn.Module, batch: int = 1,
                  size: Optional[tuple[int, ...]] = None) -> torch.Tensor:
    """An example input: ``size`` if given, else what the model declares, else 3x224x224."""
    embed_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if size is None and isinstance(embed_size, (tuple, list)) and len(embed_size) == 2:
        size = (getattr(model, "in_chans", None) or 3, *embed_size)
    if size is None:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        size = tuple(cfg.get("input_size", ())) or None
    if size is None:
        img = getattr(model, "img_size", None) or getattr(model, "image_size", None)
        config = getattr(model, "config", None)
        img = img or getattr(config, "image_size", None)
        chans = getattr(model, "in_chans", None) or getattr(config, "num_channels", None) or 3
        if isinstance(img, (tuple, list)):
            size = (chans, *img)
        elif img:
            size = (chans, int(img), int(img))
    return torch.randn(batch, *(size or (3, 224, 224)))


def parse_kwargs(text: Optional[str]) -> dict[str, Any]:
    """Parse a JSON object given on the command line."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"--kwargs must be a JSON object: {exc}") from exc
    if not isinstance(value, dict):
        raise InputError("--kwargs must be a JSON object")
    return value
