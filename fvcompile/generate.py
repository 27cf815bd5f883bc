"""`fvcompile.generate`: compiled autoregressive decoding with a static KV cache (after gpt-fast).

    out = fvcompile.generate(model, "The capital of France is", tokenizer=tokenizer, max_new_tokens=8)
    out.text[0], out.tokens_per_s, out.time_to_first_token_s

The prompt fills a preallocated cache in one compiled forward whose prompt length is dynamic
(prefill); then a step compiled with `fullgraph=True` and static shapes adds one token per row
(decode): its slot is a tensor input, so it never recompiles as the sequence grows, and on CUDA it
runs as a CUDA graph (`mode="reduce-overhead"`, the default there). Every step is compiled through
`fvcompile.optimize`, so `passes=` apply to each (fvcompile/generation/steps.py).

Prompts of different lengths decode together: they are left-padded, and each row's positions
and attention mask start at its first real token (fvcompile/generation/prompts.py,
models/kv_cache.py). `prompt_lookup=k` checks up to k tokens looked up in the context per forward
and keeps greedy decoding's output exactly (fvcompile/generation/prompt_lookup.py).

The compiled steps are kept per compile settings, and the cache per model: a second call with the
same settings and batch size compiles nothing. (This module is named like the function it
defines; `from fvcompile.generate import generate` reaches both.)
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from fvcompile.generation import checks
from fvcompile.generation.decoding import Sampling, decode, decode_with_prompt_lookup
from fvcompile.generation.prompts import decode as decode_text
from fvcompile.generation.prompts import prompt_batch
from fvcompile.generation.steps import CompileSettings, Steps, build_steps

# Compiled steps per compile settings (the steps take the model as an argument), and each model's
# cache (it goes with the model).
_steps: dict[tuple, Steps] = {}
_caches: "weakref.WeakKeyDictionary[nn.Module, object]" = weakref.WeakKeyDictionary()


@dataclass
class Generation:
    """What `generate` returns: the new tokens of each prompt, and how long they took."""

    new_tokens: Tensor  # (batch, n) int64 on the CPU; after a row's eos_id, eos_id again
    prompts: list[list[int]]  # the prompts' token ids, as given (unpadded)
    text: list[str] | None  # the new tokens as text, per prompt (when the prompts were text)
    time_to_first_token_s: float  # prefill and the first token's choice
    decode_s: float  # every token after the first
    forwards: int  # model forwards: the prefill and every decode / verify step
    drafts_accepted: int = 0  # prompt lookup: draft tokens kept
    reports: dict = field(default_factory=dict)  # step name -> OptimizeReport (compiled steps)
    eos_id: int | None = None

    def rows(self) -> list[list[int]]:
        """The new tokens of each prompt, up to and with its eos_id."""
        rows = []
        for row in self.new_tokens.tolist():
            if self.eos_id in row:
                row = row[:row.index(self.eos_id) + 1]
            rows.append(row)
        return rows

    def sequences(self) -> list[list[int]]:
        """Each prompt followed by its new tokens."""
        return [p + r for p, r in zip(self.prompts, self.rows())]

    @property
    def tokens_per_s(self) -> float:
        """New tokens per second after the first (all rows together): the decode rate."""
        after_first = sum(max(len(r) - 1, 0) for r in self.rows())
        return after_first / self.decode_s if self.decode_s > 0 else float("nan")


def forget_compiled_steps() -> None:
    """Drop the kept steps and caches (`fvcompile.reset()` calls it, with Dynamo's own reset)."""
    _steps.clear()
    _caches.clear()


def compiled_steps(settings: CompileSettings) -> Steps:
    key = settings.key()
    if key not in _steps:
        _steps[key] = build_steps(settings)
    return _steps[key]


def kv_cache_for(model: nn.Module, batch_size: int, needed: int, cache_len: int | None):
    """The model's cache when it fits (same batch size, long enough; of length cache_len when
    given), else a new one: a kept cache keeps the compiled decode step's shapes."""
    cache = _caches.get(model)
    fits = (cache is not None and cache.batch_size == batch_size
            and (cache.length == cache_len if cache_len else cache.length >= needed)
            and cache.layers[0].k.dtype == model.tok_embeddings.weight.dtype)
    if not fits:
        _caches.pop(model, None)  # free the old buffers first
        cache = model.new_kv_cache(batch_size, cache_len or checks.cache_length(needed, checks.model_context(model)))
        _caches[model] = cache
    return cache


def generate(model: nn.Module, prompt, *, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
             passes="auto", compile: bool = True, mode: str | None = None, codegen: bool = True,
             tokenizer=None, cache_len: int | None = None, prompt_lookup: int = 0, eos_id: int | None = None,
             generator: torch.Generator | None = None, options: dict | None = None) -> Generation:
    """Continue `prompt` by up to `max_new_tokens` tokens.

    prompt: text (needs `tokenizer`), a list of texts, token ids as a (seq,) or (batch, seq) tensor,
        a list of ids, or a list of lists of ids (rows of different lengths are left-padded).
    temperature: 0 is greedy decoding; above 0 samples, among the `top_k` likeliest tokens if given
        (`generator` makes it reproducible).
    passes: fvcompile passes for every compiled step ("auto", names or pass objects; see optimize).
    compile: False runs the same cached decoding eagerly.
    mode: a torch.compile mode for the decode steps; None is "reduce-overhead" (CUDA graphs) on
        CUDA and the default elsewhere.
    codegen: False compiles the same graphs and passes without Inductor's code generation.
    cache_len: the KV cache's slots per row; None sizes it to fit (rounded up, reused by later calls).
    prompt_lookup: k > 0 checks up to k tokens looked up in the context per forward (greedy, one
        prompt): the same tokens as greedy decoding, in fewer forwards when the text repeats itself.
    eos_id: stop once every row has produced this token.
    options: Inductor config patches for the compiled steps (e.g. {"cpp.enable_kernel_profile": True}).
    """
    checks.check_model(model)
    device = model.tok_embeddings.weight.device
    vocab, context = checks.model_vocab(model), checks.model_context(model)
    checks.check_sampling(temperature, top_k, prompt_lookup, vocab)
    checks.check_mode(mode, device)
    batch = prompt_batch(prompt, tokenizer, device)
    checks.check_prompts(batch.rows, vocab, prompt_lookup)
    checks.check_lengths(batch.longest, max_new_tokens, context, cache_len)
    if mode is None and compile and device.type == "cuda":
        mode = "reduce-overhead"
    settings = CompileSettings(compile, passes if isinstance(passes, str) else tuple(passes), mode, codegen,
                               tuple(sorted((options or {}).items())))
    steps = compiled_steps(settings)
    needed = min(batch.longest + max_new_tokens + prompt_lookup, context)
    cache = kv_cache_for(model, len(batch.rows), needed, cache_len)
    with torch.no_grad():
        if prompt_lookup:
            decoded = decode_with_prompt_lookup(model, steps, cache, batch, max_new_tokens, prompt_lookup, eos_id)
        else:
            decoded = decode(model, steps, cache, batch, max_new_tokens, Sampling(temperature, top_k, generator),
                             eos_id)
    new_tokens = decoded.new_tokens.cpu()
    if eos_id is not None:  # a row that ended kept decoding in lockstep: eos_id after its end
        is_eos = (new_tokens == eos_id).long()
        new_tokens = new_tokens.masked_fill(is_eos.cumsum(1) - is_eos > 0, eos_id)
    out = Generation(new_tokens, batch.rows, None, decoded.time_to_first_token_s, decoded.decode_s,
                     decoded.forwards, decoded.drafts_accepted, steps.reports, eos_id)
    if batch.was_text:
        out.text = [decode_text(tokenizer, row) for row in out.rows()]
    return out
