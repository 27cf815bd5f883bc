"""Plain-module paper models (compile targets) and a registry of named configs."""
from fvcompile.models.registry import ModelSpec, all_specs, count_parameters, get, register

__all__ = ["ModelSpec", "all_specs", "count_parameters", "get", "register"]
