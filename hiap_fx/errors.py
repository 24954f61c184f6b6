"""Errors raised on purpose by hiap_fx. Every message says what, where and what to do."""

from __future__ import annotations

from pydantic import ValidationError


class HiapError(Exception):
    """Base class of every error hiap_fx raises on purpose."""


class CaptureError(HiapError):
    """The model could not be turned into a graph (tracing or export failed)."""


class NoAttentionError(HiapError):
    """The graph holds no attention that hiap_fx could find."""


class DiscoveryError(HiapError):
    """A structure was found but is inconsistent (e.g. a projection feeds two sites)."""


class InputError(HiapError):
    """Example inputs or arguments do not fit the model."""


class ConfigError(HiapError, ValidationError):
    """A configuration value is invalid: a ``pydantic.ValidationError`` (and so a ``ValueError``)
    that is also a ``HiapError``; the message names each field, the rule and the value given."""


class FileError(HiapError):
    """A file could not be read as what was expected: missing, empty, truncated, of another kind,
    or naming code that is not on the allow-list (the message names the file and the entry)."""


class DataError(InputError):
    """Training or evaluation data has the wrong form, is empty, or failed while being read."""


class BudgetError(HiapError):
    """The compute target cannot be reached by this model (the message gives the reachable
    minimum)."""


class StateError(HiapError):
    """A prepared model's state is unusable: non-finite gate logits, a state dict from another
    model, or a training run that diverged."""


class HiapWarning(UserWarning):
    """Something the user would expect pruned is left whole (the plan lists why)."""
