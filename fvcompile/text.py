"""Real text that is on every machine, offline: the Python standard library's own sources.

Calibration (SAAP's index) and long-context evaluation need natural text, and nothing is
downloaded at run time; the standard library is several MB of English comments, docstrings and
code, the same on every machine with the same Python.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch


def stdlib_sources() -> list[Path]:
    """The standard library's top-level .py files, sorted by name (a fixed order)."""
    return sorted(Path(os.__file__).parent.glob("*.py"))


def token_batches(tokenizer, *, seq_len: int, sequences: int, skip: int = 0) -> list[torch.Tensor]:
    """`sequences` rows of `seq_len` consecutive tokens of the standard library's sources (one
    (1, seq_len) tensor each), after `skip` rows (so that evaluation text differs from
    calibration text)."""
    needed = (skip + sequences) * seq_len
    ids: list[int] = []
    for path in stdlib_sources():
        ids += tokenizer.encode(path.read_text(encoding="utf-8", errors="replace")).ids
        if len(ids) >= needed:
            break
    if len(ids) < needed:
        raise ValueError(f"the standard library's sources hold {len(ids)} tokens, fewer than the {needed} asked")
    rows = torch.tensor(ids[:needed]).view(skip + sequences, seq_len)[skip:]
    return [row[None] for row in rows]
