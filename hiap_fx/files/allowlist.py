"""What a stored graph may call: call targets and module classes resolved against an allow-list.

A file names its call targets and leaf-module classes by qualified name. Without ``trust``,
a name is resolved only when it is

* a tensor operator: ``torch.<op>`` of ``torch._C._VariableFunctions`` / ``torch.functional``,
  ``torch.nn.functional``, ``torch._C._nn``, ``torch.special`` / ``linalg`` / ``fft``,
  ``torch.ops.aten`` / ``prims`` overloads, public ``Tensor`` methods;
* a pure Python helper: ``operator``, ``math``, a few builtins (``getattr`` of tensor data
  attributes only, ``len``, ``int``, ...);
* something a registry of this process vouches for: hiap_fx's own graph functions, registered
  attention kernels and trace-hook functions, and the module classes registered with
  :func:`hiap_fx.register_safe_module`; ``torch.nn`` classes and the drop-path / stochastic-depth
  leaves of timm, torchvision and transformers are built in.

Nothing else is imported. With ``trust=True`` (the caller's explicit opt-in) any importable
name is resolved, which runs the import-time code of the module it names.
"""

from __future__ import annotations

import builtins
import importlib
import math
import operator
import re
from typing import Any, Callable

import torch
from torch import nn

from hiap_fx.errors import FileError

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_PATH = re.compile(r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$")

_BUILTINS = {name: getattr(builtins, name) for name in
             ("getattr", "len", "int", "float", "bool", "abs", "min", "max", "round", "slice",
              "tuple", "list", "range", "sum", "divmod", "pow")}
#: operator functions a graph may call: arithmetic, comparisons, indexing. Not attrgetter,
#: methodcaller or call, which would reach attributes and callables by name.
_OPERATORS = frozenset(
    "add sub mul truediv floordiv mod pow neg pos abs matmul and_ or_ xor invert inv lshift rshift "
    "eq ne lt le gt ge not_ truth is_ is_not contains index concat getitem setitem "
    "iadd isub imul itruediv ifloordiv imod ipow imatmul iand ior ixor ilshift irshift".split())
#: tensor operators that read or map files
_DENIED_OPERATORS = frozenset({"from_file"})
_SYMBOLIC = ("sym_int", "sym_float", "sym_max", "sym_min", "sym_not", "sym_sqrt", "sym_ite", "sym_sum")
#: Tensor methods that reach storage, files or callables: never called from a stored graph
_DENIED_METHODS = {"apply_", "map_", "map2_", "register_hook", "register_post_accumulate_grad_hook",
                   "storage", "untyped_storage", "share_memory_", "set_", "numpy", "from_file",
                   "pin_memory", "record_stream"}
#: tensor attributes that lead to autograd internals rather than data
_DENIED_ATTRIBUTES = {"grad_fn", "_base"}
#: libraries whose output containers (dataclasses / namedtuples, e.g. HF ModelOutput) are imported
_CONTAINER_LIBRARIES = ("torch", "transformers", "timm", "torchvision", "hiap_fx")
#: libraries whose parameter-free drop-path / dropout leaves (they branch on self.training) are
#: imported by name; any other class a file names must be registered or trusted
_LEAF_LIBRARIES = ("timm", "torchvision", "transformers")
_STOCHASTIC_LEAF = re.compile(r"\.[A-Za-z0-9]*(DropPath|StochasticDepth|DropBlock2d|Dropout[A-Za-z0-9]*)$")
_TORCH_SUBMODULES = {"torch.nn.functional": torch.nn.functional, "torch._C._nn": torch._C._nn,
                     "torch.special": torch.special, "torch.linalg": torch.linalg, "torch.fft": torch.fft}


def is_identifier(name: Any) -> bool:
    """A plain Python identifier (safe as a generated variable, attribute or keyword name)."""
    return isinstance(name, str) and bool(_IDENT.match(name)) and not name.startswith("__")


def is_dotted(name: Any) -> bool:
    """Dot-separated identifiers without dunder parts (a module path or attribute path)."""
    return isinstance(name, str) and bool(_DOTTED.match(name)) and "__" not in name


def is_attribute_path(name: Any) -> bool:
    """A module / parameter path (``blocks.0.attn.qkv``): identifiers or indices, no dunders."""
    return isinstance(name, str) and bool(_PATH.match(name)) and "__" not in name


def function_name(fn: Any) -> str:
    """The qualified name under which a call target is stored."""
    if isinstance(fn, torch._ops.OpOverload):
        return f"torch.ops.{fn.namespace}.{fn._schema.name.split('::')[-1]}.{fn._overloadname}"
    if isinstance(fn, torch._ops.OpOverloadPacket):
        return f"torch.ops.{fn._qualified_op_name.replace('::', '.')}"
    name = getattr(fn, "__name__", "")
    if fn is not None and getattr(builtins, name, None) is fn:
        return f"builtins.{name}"
    from torch.fx.node import _get_qualified_name

    return _get_qualified_name(fn)


def tensor_method_allowed(name: str) -> bool:
    """Whether a stored graph may call ``value.<name>(...)``: a public method of ``torch.Tensor``
    that does not reach storage, files or callables."""
    return (is_identifier(name) and not name.startswith("_") and name not in _DENIED_METHODS
            and callable(getattr(torch.Tensor, name, None)))


def getattr_allowed(name: Any) -> bool:
    """Whether ``getattr(value, name)`` may appear in a stored graph: a data attribute of
    ``torch.Tensor`` (``shape``, ``dtype``, ``device``, ``T``, ...), never a method."""
    if not (is_identifier(name) and not name.startswith("_")) or name in _DENIED_ATTRIBUTES:
        return False
    attr = getattr(torch.Tensor, name, None)
    return attr is not None and not callable(attr)


def _torch_operator(name: str) -> Any:
    obj = getattr(torch, name, None)
    if obj is None or name in _DENIED_OPERATORS:
        return None
    if getattr(torch._C._VariableFunctions, name, None) is obj:
        return obj
    if name in torch.functional.__all__ or name in _SYMBOLIC:
        return obj
    return None


def _namespace_function(module_name: str, name: str) -> Any:
    obj = getattr(_TORCH_SUBMODULES[module_name], name, None)
    if obj is None or isinstance(obj, type) or not callable(obj) or name.startswith("_"):
        return None
    origin = getattr(obj, "__module__", None) or ""
    if module_name == "torch.nn.functional" and origin not in ("torch.nn.functional", "torch._C._nn",
                                                                "torch", "torch._C", ""):
        return None  # names F merely imports (typing helpers, torch.overrides, ...)
    return obj


def _torch_op(path: list[str]) -> Any:
    """``torch.ops.<namespace>.<op>[.<overload>]``."""
    if len(path) not in (2, 3) or not all(is_identifier(p) for p in path):
        return None
    if path[1] in _DENIED_OPERATORS:
        return None
    try:
        packet = getattr(getattr(torch.ops, path[0]), path[1])
        return getattr(packet, path[2]) if len(path) == 3 else packet
    except (AttributeError, RuntimeError):
        return None


def _vouched_functions() -> dict[str, Callable]:
    """Functions the registries of this process vouch for, by stored name."""
    from hiap_fx.gated import bundles  # noqa: F401  (registers the folded-batch mask)
    from hiap_fx.handlers import ensure_builtin_handlers
    from hiap_fx.passes import arguments  # noqa: F401  (registers the fixed-argument guard)
    from hiap_fx.registry import ATTENTION_KERNELS, SAFE_FUNCTIONS, TRACE_HOOKS

    ensure_builtin_handlers()
    found: dict[str, Callable] = {}
    candidates = [*SAFE_FUNCTIONS, *ATTENTION_KERNELS]
    for hook in TRACE_HOOKS:
        try:
            candidates.extend(hook.autowrap_functions())
        except ImportError:  # the hook's library is not installed: it vouches for nothing
            continue
    for fn in candidates:
        try:
            found[function_name(fn)] = fn
        except Exception:  # an object without a qualified name cannot be named in a file
            continue
    return found


def resolve_function(name: str, trust: bool = False) -> Callable:
    """The call target a file names, or ``FileError`` when the allow-list does not hold it."""
    if not is_dotted(name):
        raise FileError(f"call target {name!r} is not a qualified name")
    module_name, _, attr = name.rpartition(".")
    found: Any = None
    if name.startswith("torch.ops."):
        path = name.split(".")[2:]
        found = _torch_op(path)
        if found is not None and path[0] not in ("aten", "prims") and name not in _vouched_functions():
            found = None  # a custom operator: only registered attention kernels
    elif module_name == "torch":
        found = _torch_operator(attr)
    elif module_name in ("torch.functional",):
        found = getattr(torch.functional, attr, None) if attr in torch.functional.__all__ else None
    elif module_name == "torch._C._VariableFunctions":
        found = _torch_operator(attr)
    elif module_name in _TORCH_SUBMODULES:
        found = _namespace_function(module_name, attr)
    elif module_name == "torch.Tensor":
        found = getattr(torch.Tensor, attr) if tensor_method_allowed(attr) else None
    elif module_name in ("operator", "_operator"):
        found = getattr(operator, attr, None) if attr in _OPERATORS else None
    elif module_name == "math":
        found = getattr(math, attr, None) if not attr.startswith("_") else None
    elif module_name == "builtins":
        found = _BUILTINS.get(attr)
    if found is None:
        found = _vouched_functions().get(name)
    if found is None and trust:
        found = _import_object(name)
    if found is None or not callable(found):
        raise FileError(f"call target {name} is not on hiap_fx's allow-list (torch operators, "
                        "operator, math, registered kernels and trace-hook functions); if the file "
                        "comes from a source you trust, load it with trust=True, or register the "
                        "function (hiap_fx.register_attention_kernel / register_trace_hook) first")
    return found


def resolve_module_class(name: str, trust: bool = False) -> type:
    """The leaf-module class a file names: a ``torch.nn`` class, a registered safe module, or
    (with ``trust``) any importable ``nn.Module`` subclass."""
    from hiap_fx.registry import safe_module_class

    if not is_dotted(name):
        raise FileError(f"module class {name!r} is not a qualified name")
    cls: Any = None
    if name.startswith("torch.nn.modules.") and name.count(".") == 4:
        cls = getattr(importlib.import_module(name.rpartition(".")[0]), name.rpartition(".")[2], None)
    if cls is None:
        cls = safe_module_class(name)
    if cls is None and name.split(".")[0] in _LEAF_LIBRARIES and _STOCHASTIC_LEAF.search(name):
        cls = _import_object(name)  # a library's own drop-path / stochastic-depth class
    if cls is None and trust:
        cls = _import_object(name)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise FileError(f"module class {name} is not on hiap_fx's allow-list (torch.nn modules, the "
                        "drop-path classes of timm / torchvision / transformers, classes registered "
                        "with hiap_fx.register_safe_module); register it "
                        "(hiap_fx.register_safe_module(YourClass)), or load the file with "
                        "trust=True if you trust its source")
    return cls


def resolve_container(name: str, form: str, fields: list[str], trust: bool = False) -> type:
    """An output container class (namedtuple or dataclass, e.g. a HF ``ModelOutput``): the real
    class when it lives in a known library (or with ``trust``), else an equivalent class built
    from the stored field names (no import of the model's own code)."""
    import collections
    import dataclasses

    if not is_dotted(name) or not all(is_identifier(f) for f in fields):
        raise FileError(f"output container {name!r} has an invalid name or fields {fields!r}")
    if name.split(".")[0] in _CONTAINER_LIBRARIES or trust:
        cls = _import_object(name)
        # constructing a namedtuple only stores its fields; of dataclasses, whose __post_init__
        # may do anything, only HF's ModelOutput family is taken as is (without trust)
        plain = form == "namedtuple" or trust or _is_model_output(cls)
        if isinstance(cls, type) and plain and _container_fields(cls) == list(fields):
            return cls
    short = name.rpartition(".")[2]
    if form == "namedtuple":
        return collections.namedtuple(short, fields)
    if form == "dataclass":
        return dataclasses.make_dataclass(short, [(f, Any, dataclasses.field(default=None)) for f in fields])
    raise FileError(f"output container {name}: unknown form {form!r}")


def _is_model_output(cls: Any) -> bool:
    import sys

    utils = sys.modules.get("transformers.utils.generic")
    base = getattr(utils, "ModelOutput", None)
    return isinstance(cls, type) and base is not None and issubclass(cls, base)


def _container_fields(cls: type) -> list[str] | None:
    import dataclasses

    if issubclass(cls, tuple) and hasattr(cls, "_fields"):
        return list(cls._fields)
    if dataclasses.is_dataclass(cls):
        return [f.name for f in dataclasses.fields(cls)]
    return None


def container_form(cls: Any) -> str | None:
    """``"namedtuple"`` / ``"dataclass"`` for output container classes, else None."""
    import dataclasses

    if not isinstance(cls, type):
        return None
    if issubclass(cls, tuple) and hasattr(cls, "_fields"):
        return "namedtuple"
    if dataclasses.is_dataclass(cls):
        return "dataclass"
    return None


def container_fields(cls: type) -> list[str]:
    """Field names of an output container class."""
    return _container_fields(cls) or []


def _import_object(name: str) -> Any:
    """Import the longest module prefix of ``name`` and walk the rest as attributes (trusted
    names and known libraries only)."""
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for part in parts[cut:]:
                obj = getattr(obj, part)
        except AttributeError:
            return None
        return obj
    return None
