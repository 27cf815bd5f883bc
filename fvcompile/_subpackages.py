"""What `fvcompile.passes`, `fvcompile.models` and `fvcompile.kernels` hold as packages.

Their folders (`passes/`, `models/`, `kernels/`, at the repository root by design) have no
`__init__.py`: they are namespace packages. Python started in the repository root (a REPL,
`python -c`, a notebook, `python -m pytest`) puts the current directory first on `sys.path`, and a
folder there with an `__init__.py` is a regular package that hides every installed package of its
name: `transformers`' `import kernels` got our folder instead of Hugging Face's `kernels`. A
namespace portion never wins over a regular package found anywhere on `sys.path`, so the generic
names stay free, while `pyproject.toml`'s package-dir still installs the folders under `fvcompile`.

What their `__init__.py` held runs here instead, from `fvcompile/__init__.py`, which Python runs
before it imports any of them.
"""
from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import pkgutil
import sys
from pathlib import Path

import fvcompile

SUBPACKAGES = ("kernels", "models", "passes")


def import_subpackage(name: str):
    """`fvcompile.<name>`, also from an editable install, whose finder (setuptools) maps a
    package-dir folder only when it holds an `__init__.py` (pypa/setuptools#4943): then the
    folder is found where a checkout has it, beside `fvcompile/`."""
    full_name = f"fvcompile.{name}"
    try:
        return importlib.import_module(full_name)
    except ModuleNotFoundError as e:
        if e.name != full_name:
            raise
    checkout = Path(fvcompile.__file__).resolve().parent.parent
    spec = importlib.machinery.PathFinder.find_spec(name, [str(checkout)])
    # Only our own folder, in a checkout: never an installed package that sits beside fvcompile/.
    if spec is None or spec.origin is not None or not (checkout / "pyproject.toml").is_file():
        raise ModuleNotFoundError(
            f"no module named {full_name!r}: fvcompile is installed without its {name}/ folder; "
            "reinstall it (pip install -e . in a checkout)", name=full_name)
    spec.name = full_name
    module = importlib.util.module_from_spec(spec)
    sys.modules[full_name] = module
    setattr(fvcompile, name, module)
    return module


def bind_registry_names() -> None:
    """The names callers import from the packages themselves (`from fvcompile.passes import
    resolve_passes`); their homes are the registry modules."""
    from fvcompile.models import registry as models_registry
    from fvcompile.passes import registry as passes_registry

    for package, registry, names in (
        (fvcompile.models, models_registry, ("ModelSpec", "all_specs", "count_parameters", "get", "register")),
        (fvcompile.passes, passes_registry, ("AUTO_CANDIDATES", "KNOWN_PASSES", "pass_class", "resolve_passes")),
    ):
        for name in names:
            setattr(package, name, getattr(registry, name))


def register_all_kernels() -> None:
    """Import every module of `kernels/` (one per op): each registers its `torch.ops.fvcompile`
    op, so code compiled earlier (Inductor's cache, an exported program) finds every op."""
    for module in pkgutil.iter_modules(fvcompile.kernels.__path__):
        importlib.import_module(f"fvcompile.kernels.{module.name}")


for _name in SUBPACKAGES:
    import_subpackage(_name)
bind_registry_names()
register_all_kernels()
