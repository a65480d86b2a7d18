"""Import a callable from its dotted path (``mypkg.nets.TinyCNN``), the way Hydra's ``_target_`` does.

Kept free of Hydra so that ``load_pruned`` (plain PyTorch) can rebuild a user's model too. The working
directory is importable, as a user expects of a script beside their code.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys

from slimnet.errors import TargetImportError


def locate(path: str):
    """The object at ``path``: the longest importable module prefix, then attributes."""
    if not isinstance(path, str) or not path or "." not in path:
        raise TargetImportError(f"_target_={path!r} must be a dotted path to a callable, like mypkg.nets.TinyCNN")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    parts = path.split(".")
    module, error = None, None
    for i in range(len(parts) - 1, 0, -1):
        try:
            module = importlib.import_module(".".join(parts[:i]))
            break
        except ModuleNotFoundError as err:
            if err.name is not None and not ".".join(parts[:i]).startswith(err.name):
                raise  # the module exists but one of *its* imports is missing: say that, not "not found"
            error = err
    if module is None:
        raise TargetImportError(f"cannot import {path} ({error}): run from the folder that holds "
                                f"{parts[0]!r}, add that folder to PYTHONPATH, or pip install it") from None
    obj = module
    for attr in parts[i:]:
        if not hasattr(obj, attr):
            raise TargetImportError(f"cannot import {path}: {obj.__name__ if hasattr(obj, '__name__') else obj} "
                                    f"has no attribute {attr!r}")
        obj = getattr(obj, attr)
    return obj


def accepted(fn, names: tuple[str, ...]) -> set[str]:
    """Which of ``names`` the callable ``fn`` takes as keywords (all of them if it takes ``**kwargs``)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a builtin without a signature: assume it takes what it is given
        return set(names)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return set(names)
    return {n for n in names if n in params and params[n].kind is not inspect.Parameter.POSITIONAL_ONLY}


def unknown_keywords(fn, given) -> list[str]:
    """Keywords in ``given`` that ``fn`` does not take (empty if it takes ``**kwargs``)."""
    return sorted(set(given) - accepted(fn, tuple(given)))
