"""The decoding loops over the steps (steps.py): plain decoding, and prompt-lookup decoding.

Both fill a static cache: the prompt first (prefill), then one slot per token. Both time the
first token (prefill and its sampling) apart from the rest, synchronizing the device at the
two marks only, so that a GPU runs ahead of the host between them.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fvcompile.generation.prompt_lookup import accepted_length, propose_draft
from fvcompile.generation.prompts import PromptBatch
from fvcompile.generation.sampling import next_tokens
from fvcompile.generation.steps import Steps


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0
    top_k: int | None = None
    generator: torch.Generator | None = None

    def __call__(self, logits: Tensor) -> Tensor:
        return next_tokens(logits, self.temperature, self.top_k, self.generator)


@dataclass
class Decoded:
    new_tokens: Tensor  # (batch, n) on the model's device
    time_to_first_token_s: float
    decode_s: float  # every token after the first
    forwards: int  # model forwards: prefill, then one per decode or verify step
    drafts_accepted: int = 0  # prompt lookup: draft tokens the model confirmed


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prefill(model: nn.Module, steps: Steps, cache, batch: PromptBatch, sample: Sampling) -> Tensor:
    cache_pos = torch.arange(batch.longest, device=batch.tokens.device)
    # One compiled graph for every prompt length (a length of 1 is specialized apart).
    torch._dynamo.maybe_mark_dynamic(batch.tokens, 1)
    torch._dynamo.maybe_mark_dynamic(cache_pos, 0)
    return sample(steps.prefill(model, batch.tokens, cache, cache_pos, batch.seq_start))


def decode(model: nn.Module, steps: Steps, cache, batch: PromptBatch, max_new_tokens: int,
           sample: Sampling, eos_id: int | None = None) -> Decoded:
    """Every row one token per step, in lockstep; stops early once every row has produced eos_id."""
    device = batch.tokens.device
    start = time.perf_counter()
    token = prefill(model, steps, cache, batch, sample)
    out = torch.empty(token.shape[0], max_new_tokens, dtype=torch.long, device=device)
    out[:, :1] = token
    _sync(device)
    first = time.perf_counter() - start
    done = (token[:, 0] == eos_id) if eos_id is not None else None
    cache_pos = torch.tensor([batch.longest], device=device)
    n = 1
    while n < max_new_tokens and not (done is not None and bool(done.all())):
        token = sample(steps.decode(model, token, cache, cache_pos, batch.seq_start))
        out[:, n:n + 1] = token
        cache_pos += 1  # in place: the step's input keeps its address (CUDA graphs copy it in)
        n += 1
        if done is not None:
            done |= token[:, 0] == eos_id
    _sync(device)
    return Decoded(out[:, :n], first, time.perf_counter() - start - first, forwards=n)


def decode_with_prompt_lookup(model: nn.Module, steps: Steps, cache, batch: PromptBatch, max_new_tokens: int,
                              draft_len: int, eos_id: int | None = None) -> Decoded:
    """Greedy decoding of one prompt, checking up to `draft_len` looked-up tokens per forward.

    The verify step always takes draft_len + 1 tokens (one compiled shape): a shorter draft is
    padded with its last token, and what the padding computes is never kept (the causal mask
    keeps it out of the kept positions' logits, and its cache slots are overwritten before they
    are read). Where no draft is found, or the slots would run past the cache, a plain decode
    step runs instead."""
    device = batch.tokens.device
    greedy = Sampling()
    start = time.perf_counter()
    token = prefill(model, steps, cache, batch, greedy)
    generated = [int(token[0, 0])]
    first = time.perf_counter() - start
    sequence = batch.rows[0] + generated
    slot = batch.longest  # where the last token goes: it is not in the cache yet
    forwards, accepted = 1, 0
    while len(generated) < max_new_tokens and generated[-1] != eos_id:
        draft = propose_draft(sequence, draft_len)
        if draft and slot + draft_len < cache.length:
            fed = [generated[-1]] + draft + draft[-1:] * (draft_len - len(draft))
            cache_pos = torch.arange(slot, slot + draft_len + 1, device=device)
            logits = steps.verify(model, torch.tensor([fed], device=device), cache, cache_pos, batch.seq_start)
            choices = logits[0].argmax(-1).tolist()
            n = accepted_length(draft, choices)
            new = draft[:n] + [choices[n]]
            accepted += n
        else:
            cache_pos = torch.tensor([slot], device=device)
            logits = steps.decode(model, torch.tensor([[generated[-1]]], device=device), cache, cache_pos,
                                  batch.seq_start)
            new = [int(logits.argmax(-1)[0])]
        forwards += 1
        new = new[:max_new_tokens - len(generated)]
        if eos_id in new:
            new = new[:new.index(eos_id) + 1]
        generated += new
        sequence += new
        slot += len(new)
    _sync(device)
    out = torch.tensor([generated], dtype=torch.long, device=device)
    return Decoded(out, first, time.perf_counter() - start - first, forwards=forwards, drafts_accepted=accepted)
