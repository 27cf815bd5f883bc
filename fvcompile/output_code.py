"""Inductor's generated code read back: its kernels' sources and, per kernel call, where it came from.

Inductor writes above each kernel call of the wrapper's `call()` a comment naming the FX nodes
Dynamo traced (`# Topologically Sorted Source Nodes: [...], Original ATen: [...]`) and, with
provenance tracking on, a debug handle (`# [Provenance debug handles] NAME:N`) that keys its
kernel -> post-grad nodes table (written into the dump as provenance_<kind>.json). Kernel sources
are the strings given to `async_compile.cpp_pybinding` / `.cpp` / `.triton`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

_DEFINITION = re.compile(r"^(\w+) = async_compile\.(\w+)\(", re.M)
# `#` in Python wrappers, `//` in C++ ones (cpp_wrapper, AOTInductor).
_SOURCE_NODES = re.compile(r"(?:#|//)\s*Topologically Sorted Source Nodes: \[(.*?)\], Original ATen: \[(.*?)\]")
_HANDLE = re.compile(r"(?:#|//)\s*\[Provenance debug handles\] (\S+)")


@dataclass
class KernelCall:
    handle: str  # NAME:N, Inductor's provenance debug handle
    name: str  # the kernel, or the extern call (extern_kernels.mm, torch.ops.fvcompile....)
    source_nodes: list[str] = field(default_factory=list)  # FX nodes of Dynamo's graph
    aten_ops: list[str] = field(default_factory=list)
    post_grad_nodes: list[str] = field(default_factory=list)  # from provenance_<kind>.json
    stack_traces: list[str] = field(default_factory=list)
    source: str = ""  # the kernel's code, when the output code defines it (not for extern calls)


def kernel_sources(code: str) -> dict[str, str]:
    """Kernel name -> its source (C++ or Triton), for every `NAME = async_compile.X(...)`."""
    sources = {}
    for match in _DEFINITION.finditer(code):
        start = code.find("'''", match.end())
        end = code.find("'''", start + 3) if start >= 0 else -1
        if start >= 0 and end > start:
            sources[match.group(1)] = code[start + 3:end].strip("\n")
    return sources


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def kernel_calls(code: str, provenance: dict | None = None) -> list[KernelCall]:
    """Every kernel call with a provenance handle, in the order `call()` makes them."""
    sources = kernel_sources(code)
    provenance = provenance or {}
    calls, nodes, aten = [], [], []
    for line in code.splitlines():
        match = _SOURCE_NODES.search(line)
        if match:
            nodes, aten = _names(match.group(1)), _names(match.group(2))
            continue
        match = _HANDLE.search(line)
        if match:
            handle = match.group(1)
            name = handle.rsplit(":", 1)[0]
            info = provenance.get(handle, {})
            calls.append(KernelCall(handle, name, nodes, aten, list(info.get("post_grad_nodes", [])),
                                    list(info.get("stack_traces", [])), sources.get(name, "")))
            nodes, aten = [], []
    return calls
