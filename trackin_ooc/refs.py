"""Resolve ``MOD:FN`` or ``path/to/file.py:FN`` to a zero-argument callable and call it.

The CLI names models, datasets and loss functions this way::

    trackin-ooc capture --model trackin_ooc.demo.examples:digits_cnn_model \\
                        --data ./my_data.py:train_set ...
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any, cast

from .errors import LoadError, TrackinError


def parse_ref(ref: str) -> tuple[str, str]:
    """(module or file, attribute path) of ``MOD:FN``; raises LoadError when it is not of that form."""
    ref = str(ref).strip()
    mod, sep, fn = ref.rpartition(":")
    if not sep or not mod or not fn:
        raise LoadError(
            f"{ref!r} is not of the form MOD:FN; name a module (package.module:function) "
            "or a file (path/to/file.py:function)"
        )
    if not all(part.isidentifier() for part in fn.split(".")):
        raise LoadError(f"{fn!r} in {ref!r} is not a Python name; write MOD:FN with FN a function name")
    return mod, fn


def _is_file_ref(mod: str) -> bool:
    return mod.endswith(".py") or os.sep in mod or "/" in mod


def _import_file(path: str, ref: str) -> ModuleType:
    full = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(full):
        raise LoadError(f"cannot load {ref!r}: file {path} does not exist; check the path before ':'")
    name = "_trackin_ooc_user_" + os.path.splitext(os.path.basename(full))[0].replace("-", "_")
    cached = sys.modules.get(name)
    if cached is not None and os.path.abspath(getattr(cached, "__file__", "") or "") == full:
        return cached
    # Let the file import its neighbours, as `python path/to/file.py` would.
    folder = os.path.dirname(full)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location(name, full)
    if spec is None or spec.loader is None:
        raise LoadError(f"cannot load {ref!r}: {path} is not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        sys.modules.pop(name, None)
        raise LoadError(f"cannot load {ref!r}: running {path} raised {_describe(e)}; fix that file") from e
    return module


def _import_module(mod: str, ref: str) -> ModuleType:
    # Console scripts do not put the working directory on sys.path; `python -m` would.
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.append(cwd)
    try:
        return importlib.import_module(mod)
    except ModuleNotFoundError as e:
        missing = e.name or mod
        if missing == mod or mod.startswith(missing + "."):
            raise LoadError(
                f"cannot import module {mod!r} (from {ref!r}); check the name, install it, "
                "or give a file path instead (path/to/file.py:FN)"
            ) from None
        raise LoadError(
            f"importing {mod!r} (from {ref!r}) failed: it needs module {missing!r}, which is not installed"
        ) from e
    except Exception as e:
        raise LoadError(f"importing {mod!r} (from {ref!r}) raised {_describe(e)}; fix that module") from e


def resolve(ref: str) -> Callable[[], Any]:
    """The callable named by ``MOD:FN`` or ``path/to/file.py:FN`` (not yet called)."""
    mod, fn = parse_ref(ref)
    module = _import_file(mod, ref) if _is_file_ref(mod) else _import_module(mod, ref)
    obj: Any = module
    for part in fn.split("."):
        if not hasattr(obj, part):
            public = sorted(n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n)))
            hint = f" (it has: {', '.join(public[:8])}{' ...' if len(public) > 8 else ''})" if public else ""
            raise LoadError(f"{mod!r} has no attribute {fn!r}{hint}; check the name after ':'")
        obj = getattr(obj, part)
    if not callable(obj):
        raise LoadError(f"{ref!r} is a {type(obj).__name__}, not a callable; name a zero-argument function")
    return cast(Callable[[], Any], obj)


def call(ref: str, what: str = "object") -> Any:
    """Resolve ``ref`` and call it without arguments; ``what`` names the result in messages."""
    fn = resolve(ref)
    try:
        return fn()
    except TypeError as e:
        if "argument" in str(e):
            raise LoadError(
                f"calling {ref!r} failed ({_describe(e)}); it must be callable with no arguments and return the {what}"
            ) from e
        raise LoadError(f"{ref!r} raised {_describe(e)} while making the {what}") from e
    except TrackinError:
        raise
    except Exception as e:
        raise LoadError(f"{ref!r} raised {_describe(e)} while making the {what}") from e


def load_model(ref: str) -> Any:
    """The ``torch.nn.Module`` returned by the zero-argument callable ``ref``."""
    from torch import nn

    model = call(ref, "model")
    if not isinstance(model, nn.Module):
        raise LoadError(f"{ref!r} returned a {type(model).__name__}, not a torch.nn.Module; return the model")
    return model


def load_dataset(ref: str) -> Any:
    """The torch Dataset or DataLoader returned by the zero-argument callable ``ref``."""
    from torch.utils.data import DataLoader

    data = call(ref, "dataset")
    if isinstance(data, DataLoader):
        return data
    if not hasattr(data, "__getitem__") or not hasattr(data, "__len__"):
        raise LoadError(
            f"{ref!r} returned a {type(data).__name__}, not a dataset; return a torch Dataset "
            "(with __len__ and __getitem__) or a DataLoader that does not shuffle"
        )
    return data


def load_loss(ref: str) -> Any:
    """The per-example loss function returned by the zero-argument callable ``ref``."""
    fn = call(ref, "loss function")
    if not callable(fn):
        raise LoadError(
            f"{ref!r} returned a {type(fn).__name__}; return a callable (outputs, targets) -> losses of shape (batch,)"
        )
    return fn


def _describe(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
