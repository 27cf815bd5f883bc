"""Next-token choice from logits: greedy at temperature 0, else sampling (optionally among the top k).

It runs outside the compiled steps, on their (batch, vocab) logits: a `torch.Generator` then
makes sampling reproducible, and one graph serves every temperature and top_k.
"""
from __future__ import annotations

import torch
from torch import Tensor


def next_tokens(logits: Tensor, temperature: float = 0.0, top_k: int | None = None,
                generator: torch.Generator | None = None) -> Tensor:
    """logits (batch, vocab) -> token ids (batch, 1)."""
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)
