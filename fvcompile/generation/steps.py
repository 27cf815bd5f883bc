"""The three forward steps of cached decoding, and their compiled versions.

- prefill: the (left-padded) prompts into an empty cache; the last position's logits.
  Compiled with the prompt length dynamic: one graph serves every prompt length (but 1).
- decode: one token per row at one slot; its logits. Compiled with `fullgraph=True` and static
  shapes: the slot is a tensor input, so no token ever recompiles it, and on CUDA it runs as a
  CUDA graph (`mode="reduce-overhead"`).
- verify: a fixed number of tokens per row (prompt-lookup drafts); every position's logits.
  Compiled like decode.

Each step is its own function (its own code object): Dynamo keeps compiled graphs per code object,
so prefill's dynamic graph and decode's static one never stand in each other's cache entries.
Every step goes through `fvcompile.optimize`, so the passes named in `passes=` run on each graph.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn


def prefill_step(model: nn.Module, tokens: Tensor, cache, cache_pos: Tensor, seq_start: Tensor) -> Tensor:
    """tokens (batch, seq) at slots cache_pos (seq,) -> logits of the last position (batch, vocab)."""
    return model(tokens, cache, cache_pos, seq_start)[:, -1].float()


def decode_step(model: nn.Module, tokens: Tensor, cache, cache_pos: Tensor, seq_start: Tensor) -> Tensor:
    """tokens (batch, 1) at slot cache_pos (1,) -> logits (batch, vocab)."""
    return model(tokens, cache, cache_pos, seq_start)[:, -1].float()


def verify_step(model: nn.Module, tokens: Tensor, cache, cache_pos: Tensor, seq_start: Tensor) -> Tensor:
    """tokens (batch, n) at slots cache_pos (n,) -> logits of every position (batch, n, vocab)."""
    return model(tokens, cache, cache_pos, seq_start).float()


STEPS = {"prefill": prefill_step, "decode": decode_step, "verify": verify_step}


@dataclass(frozen=True)
class CompileSettings:
    """How the steps are compiled. compile=False runs them eagerly (the static cache alone)."""

    compile: bool = True
    passes: object = "auto"
    mode: str | None = None  # "reduce-overhead": CUDA graphs (CUDA only)
    codegen: bool = True  # False: the same graphs and passes, without Inductor's code generation
    options: tuple = ()  # Inductor config patches, as (key, value) pairs (e.g. kernel profiling)

    def key(self) -> tuple:
        """What tells two settings apart, for the cache of compiled steps (pass objects by repr)."""
        passes = self.passes if isinstance(self.passes, str) else tuple(repr(p) for p in self.passes)
        return (self.compile, passes, self.mode, self.codegen, self.options)


@dataclass
class Steps:
    """The steps as they run: compiled or plain, with the report of each compiled one."""

    prefill: object
    decode: object
    verify: object
    reports: dict = field(default_factory=dict)  # step name -> OptimizeReport


def build_steps(settings: CompileSettings) -> Steps:
    if not settings.compile:
        return Steps(prefill_step, decode_step, verify_step)
    from fvcompile.api import optimize

    common = dict(passes=settings.passes, codegen=settings.codegen)
    if settings.options:
        common["options"] = dict(settings.options)
    compiled = {
        # The prompt length is marked dynamic where prefill is called (decoding.prefill), not with
        # dynamic=True: that makes the model's Python floats symbols too, and Dynamo then restarts
        # its analysis once floats are specialized again, compiling the graph twice.
        "prefill": optimize(prefill_step, **common),
        "decode": optimize(decode_step, fullgraph=True, dynamic=False, mode=settings.mode, **common),
        "verify": optimize(verify_step, fullgraph=True, dynamic=False, mode=settings.mode, **common),
    }
    return Steps(**compiled, reports={name: fn.fvcompile_report for name, fn in compiled.items()})
