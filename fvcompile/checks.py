"""What `optimize` checks when it is called, so that a bad argument fails there, with the
problem and the way out named, not at the first call inside Dynamo's error wrapper."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn


def check_model(model: Any) -> None:
    if isinstance(model, type):
        what = "an nn.Module class" if issubclass(model, nn.Module) else "a class"
        raise TypeError(f"fvcompile.optimize got {what} ({model.__name__}), not a model: build one first, "
                        f"e.g. fvcompile.optimize({model.__name__}(...))")
    if not isinstance(model, nn.Module) and not callable(model):
        raise TypeError(f"fvcompile.optimize expects an nn.Module instance or a function, got "
                        f"{type(model).__name__}")


def checked_globs(name: str, value: Any) -> tuple[str, ...]:
    """include= / exclude=: one module-name glob or a list of them."""
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise TypeError(f"{name}= takes a module-name glob or a list of them (e.g. {name}=['layers.0', "
                    f"'*.feed_forward']), got {value!r}")


def check_dump_dir(dump_dir: Any) -> None:
    """A folder that exists or can be made, and can be written into."""
    if not isinstance(dump_dir, (str, os.PathLike)):
        raise TypeError(f"dump_dir= takes a folder path, got {type(dump_dir).__name__}")
    path = Path(dump_dir)
    if path.exists() and not path.is_dir():
        raise ValueError(f"dump_dir={str(path)!r} is a file, not a folder: give a folder path")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"dump_dir={str(path)!r} cannot be made ({e.strerror}): give a folder you can write") from e
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"dump_dir={str(path)!r} is not writable: give a folder you can write")


def check_flag(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name}= takes True or False, got {value!r}")


def check_inductor_options(options: dict) -> None:
    """Every option that is not fvcompile's own is an Inductor config key (a typo would be
    refused deep inside Inductor's compile, at the first call)."""
    import difflib

    from torch._inductor import config as inductor_config

    known = inductor_config.get_config_copy()
    for key in options:
        if key not in known and not hasattr(inductor_config, key):  # the copy leaves a few keys out
            close = difflib.get_close_matches(key, list(known), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ValueError(f"options= has {key!r}, which is neither an fvcompile option (passes, codegen, "
                             f"dump_dir, include, exclude) nor an Inductor config key{hint}: see "
                             "torch._inductor.config")


def check_mode(mode: Any) -> None:
    import torch

    modes = list(torch._inductor.list_mode_options())
    if mode is not None and mode not in modes:
        raise ValueError(f"mode={mode!r} is not a torch.compile mode: use one of {', '.join(modes)}")


def check_backend_options(own: dict, inductor_options: dict) -> None:
    """The options of `torch.compile(model, backend="fvcompile", options={...})`."""
    from fvcompile.report import OptimizeReport

    if "codegen" in own:
        check_flag("codegen", own["codegen"])
    for name in ("include", "exclude"):
        if name in own:
            checked_globs(name, own[name])
    if own.get("dump_dir") is not None:
        check_dump_dir(own["dump_dir"])
    if own.get("report") is not None and not isinstance(own["report"], OptimizeReport):
        raise TypeError(f"report= takes an fvcompile.OptimizeReport, got {type(own['report']).__name__}")
    check_inductor_options(inductor_options)
