"""Built-in handlers: what hiap_fx knows of torch.nn and timm, registered through the same
registries (:mod:`hiap_fx.registry`) a user extends."""

from __future__ import annotations

_loaded = False


def ensure_builtin_handlers() -> None:
    """Register the built-in handlers once (they import nothing heavy)."""
    global _loaded
    if not _loaded:
        _loaded = True
        from hiap_fx.handlers import timm_hooks, torch_nn  # noqa: F401  (registration side effects)
