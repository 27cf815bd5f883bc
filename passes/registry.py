"""fvcompile's graph passes, by name.

A name maps to the class that implements it; `resolve_passes` turns what the user gave
(`"auto"`, names, or pass objects carrying their options) into pass objects. The folder has no
`__init__.py` (see fvcompile/_subpackages.py), which gives `fvcompile.passes` these names too.
"""
from __future__ import annotations

import importlib

import torch

from fvcompile.passes.base import GraphPass

# name -> "module:Class"; imported lazily so that `import fvcompile` stays cheap.
KNOWN_PASSES: dict[str, str] = {
    "sparse24": "fvcompile.passes.sparse24:Sparse24",
    "fp8_dense": "fvcompile.passes.fp8_matmuls:DenseFP8",
    "fsdp_bucketing": "fvcompile.passes.fsdp_bucketing:FSDPBucketing",
    "fsdp_reordering": "fvcompile.passes.fsdp_reordering:FSDPReordering",
}
# The passes `passes="auto"` may pick: exact ones only (approximate passes run when named), in
# the order they run. A test checks each listed class has `exact = True`. The FSDP passes look
# only at graphs that hold collectives (`GraphPass.applies_to`); bucketing comes first.
AUTO_CANDIDATES: tuple[str, ...] = ("fsdp_bucketing", "fsdp_reordering")


def pass_class(name: str) -> type[GraphPass]:
    module, cls = KNOWN_PASSES[name].split(":")
    return getattr(importlib.import_module(module), cls)


def resolve_passes(passes, device: torch.device) -> list[GraphPass]:
    """`"auto"`: the exact passes that pay off on `device`; else names and/or pass objects."""
    if passes == "auto":
        chosen = []
        for name in AUTO_CANDIDATES:
            p = pass_class(name)()
            if p.pays_off_on(device):
                chosen.append(p)
        return chosen
    if isinstance(passes, (str, GraphPass)):
        passes = [passes]
    if not isinstance(passes, (list, tuple)):
        raise TypeError(f"passes= takes 'auto', a list of pass names or pass objects; got {passes!r}")
    resolved = []
    for p in passes:
        if isinstance(p, GraphPass):
            resolved.append(p)
        elif isinstance(p, str) and p in KNOWN_PASSES:
            resolved.append(pass_class(p)())
        else:
            known = ", ".join(sorted(KNOWN_PASSES))
            raise ValueError(
                f"unknown pass {p!r}: passes= takes 'auto', pass names ({known}) "
                "or pass objects such as fvcompile.passes.sparse24.Sparse24(...)")
    names = [p.name for p in resolved]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:  # a pass run twice would rewrite its own output, or find nothing left
        raise ValueError(f"pass(es) {', '.join(map(repr, twice))} named more than once in passes=: name each "
                         "pass once (its options go on one pass object, e.g. passes=[Sparse24(...)])")
    return resolved
