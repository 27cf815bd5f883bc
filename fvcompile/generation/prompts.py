"""Prompts as one batch: text through the tokenizer, then left padding.

Rows of different lengths are left-padded to the longest (pad id 0; the value never matters,
the attention mask hides it), so that every row's last prompt token sits in the same slot and
all rows decode in lockstep. `seq_start[b]` is the slot where row b's prompt begins: the model
counts RoPE positions from there and masks the slots before it (models/kv_cache.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

PAD_ID = 0


@dataclass
class PromptBatch:
    tokens: Tensor  # (batch, longest) int64, left-padded
    seq_start: Tensor  # (batch,) int64: the slot of each row's first token
    rows: list[list[int]]  # the prompts as given (token ids)
    was_text: bool  # the prompts were text (decode the output back to text)
    single: bool  # one prompt, not a list of them

    @property
    def longest(self) -> int:
        return self.tokens.shape[1]


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of `text` (a `tokenizers.Tokenizer`, or anything whose `encode` gives ids)."""
    encoded = tokenizer.encode(text)
    return list(getattr(encoded, "ids", encoded))


def decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids)


def as_rows(prompt, tokenizer) -> tuple[list[list[int]], bool, bool]:
    """(token-id rows, was text, single prompt) from what `generate` accepts: a string, a list of
    strings, a 1-D or 2-D tensor of ids, a list of ids, or a list of lists of ids."""
    if isinstance(prompt, str) or (isinstance(prompt, (list, tuple)) and prompt
                                   and all(isinstance(p, str) for p in prompt)):
        texts = [prompt] if isinstance(prompt, str) else list(prompt)
        if tokenizer is None:
            raise ValueError("the prompt is text, but generate was given no tokenizer: pass tokenizer= "
                             "(e.g. the one load_smollm2() returns), or give token ids instead of text")
        return [encode(tokenizer, t) for t in texts], True, isinstance(prompt, str)
    if isinstance(prompt, Tensor):
        if prompt.dim() not in (1, 2) or prompt.is_floating_point() or prompt.is_complex():
            raise ValueError(f"a prompt tensor holds token ids, (seq,) or (batch, seq) integers; got "
                             f"{prompt.dim()}-D {prompt.dtype}")
        single = prompt.dim() == 1
        return [row.tolist() for row in prompt.reshape(-1, prompt.shape[-1])], False, single
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(t, int) for t in prompt):
        return [list(prompt)], False, True
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(r, (list, tuple)) for r in prompt):
        return [list(r) for r in prompt], False, False
    raise TypeError(f"prompt must be text, a list of texts, a tensor of token ids, a list of ids or a "
                    f"list of lists of ids; got {type(prompt).__name__}")


def left_padded(rows: list[list[int]], device: torch.device) -> tuple[Tensor, Tensor]:
    """(tokens (batch, longest), seq_start (batch,)) with every row aligned on the right."""
    longest = max(len(r) for r in rows)
    tokens = torch.full((len(rows), longest), PAD_ID, dtype=torch.long)
    for b, row in enumerate(rows):
        tokens[b, longest - len(row):] = torch.tensor(row, dtype=torch.long)
    seq_start = torch.tensor([longest - len(r) for r in rows], dtype=torch.long)
    return tokens.to(device), seq_start.to(device)


def prompt_batch(prompt, tokenizer, device: torch.device) -> PromptBatch:
    rows, was_text, single = as_rows(prompt, tokenizer)
    tokens, seq_start = left_padded(rows, device)
    return PromptBatch(tokens, seq_start, rows, was_text, single)
