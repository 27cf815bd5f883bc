"""What `generate` refuses before it allocates or compiles anything: each error names the
problem and the way out."""
from __future__ import annotations

import torch
from torch import nn

# A cache sized by need is rounded up to a multiple of this, so that nearby lengths share one
# buffer, and one compiled decode step.
CACHE_ROUNDING = 256


def model_context(model: nn.Module) -> int:
    """The longest sequence the model serves (its RoPE tables' length)."""
    return int(model.cfg.max_seq_len)


def model_vocab(model: nn.Module) -> int:
    return int(model.cfg.vocab_size)


def check_model(model) -> None:
    if not (isinstance(model, nn.Module) and callable(getattr(model, "new_kv_cache", None))
            and hasattr(getattr(model, "cfg", None), "max_seq_len")):
        raise TypeError(
            f"generate serves decoders with a static KV-cache path: a module with `new_kv_cache(batch, "
            f"length)`, `forward(tokens, cache, cache_pos, seq_start)` and `cfg.max_seq_len`, such as "
            f"models/llama.py's Llama or models/chameleon.py's Chameleon; {type(model).__name__} has none")


def check_sampling(temperature, top_k, prompt_lookup: int, vocab: int) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature < 0:
        raise ValueError(f"temperature must be a number >= 0 (0 is greedy decoding), got {temperature!r}")
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= vocab:
            raise ValueError(f"top_k must be a whole number from 1 to the vocabulary's {vocab}, or None; "
                             f"got {top_k!r}")
        if temperature == 0:
            raise ValueError(f"top_k={top_k} samples among the k likeliest tokens, but temperature=0 is greedy "
                             "decoding, which always takes the likeliest one: drop top_k for greedy output, or "
                             "set temperature > 0 (e.g. 0.8) to sample")
    if isinstance(prompt_lookup, bool) or not isinstance(prompt_lookup, int) or prompt_lookup < 0:
        raise ValueError(f"prompt_lookup takes the number of draft tokens per step (0: off), got {prompt_lookup!r}")
    if prompt_lookup and temperature != 0:
        raise ValueError(f"prompt_lookup={prompt_lookup} keeps greedy decoding's output, and serves greedy "
                         f"decoding only; temperature={temperature} samples: set temperature=0, or "
                         "prompt_lookup=0 to sample")


def check_prompts(rows: list[list[int]], vocab: int, prompt_lookup: int) -> None:
    for b, row in enumerate(rows):
        if not row:
            raise ValueError(f"prompt {b} is empty: generation continues a prompt of at least one token")
        bad = [t for t in row if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt {b} has token id(s) {bad[:5]} outside the model's vocabulary "
                             f"[0, {vocab}): were they made by another model's tokenizer?")
    if prompt_lookup and len(rows) > 1:
        raise ValueError(f"prompt_lookup serves one prompt at a time (rows accept different draft lengths); "
                         f"got {len(rows)} prompts: generate them one by one, or set prompt_lookup=0")


def check_lengths(longest_prompt: int, max_new_tokens, context: int, cache_len: int | None) -> None:
    """The prompt and the tokens to generate must fit the model's context and the cache."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a whole number >= 1, got {max_new_tokens!r}")
    if longest_prompt > context:
        raise ValueError(f"the prompt has {longest_prompt} tokens, more than the model's context of {context}: "
                         f"shorten it to at most {context - 1} tokens")
    if longest_prompt + max_new_tokens > context:
        room = context - longest_prompt
        raise ValueError(f"max_new_tokens={max_new_tokens} goes past the model's context: the prompt has "
                         f"{longest_prompt} tokens and the context holds {context}, so at most {room} new "
                         f"tokens fit: lower max_new_tokens to {room}, or shorten the prompt")
    if cache_len is None:
        return
    if isinstance(cache_len, bool) or not isinstance(cache_len, int) or cache_len < 1:
        raise ValueError(f"cache_len must be a whole number of slots >= 1, or None (sized to fit), got {cache_len!r}")
    if cache_len > context:
        raise ValueError(f"cache_len={cache_len} is longer than the model's context of {context}: "
                         f"give at most {context}, or None")
    if longest_prompt > cache_len:
        raise ValueError(f"the prompt has {longest_prompt} tokens, more than the KV cache's {cache_len} "
                         f"slots (cache_len): raise cache_len to at least {longest_prompt + max_new_tokens}"
                         f" (at most the context, {context}), or cache_len=None to size it to fit")
    needed = longest_prompt + max_new_tokens
    if needed > cache_len:
        raise ValueError(f"the prompt's {longest_prompt} tokens and max_new_tokens={max_new_tokens} need "
                         f"{needed} cache slots, the KV cache has {cache_len} (cache_len): raise cache_len to "
                         f"{needed}, lower max_new_tokens to {cache_len - longest_prompt}, "
                         "or cache_len=None to size it to fit")


def cache_length(needed: int, context: int) -> int:
    """A cache length for `needed` slots: rounded up (see CACHE_ROUNDING), at most the context."""
    return min(context, -(-needed // CACHE_ROUNDING) * CACHE_ROUNDING)


def check_mode(mode, device: torch.device) -> None:
    from fvcompile.checks import check_mode as check_compile_mode

    check_compile_mode(mode)
    if mode is not None and device.type != "cuda" and torch._inductor.list_mode_options(mode).get("triton.cudagraphs"):
        raise ValueError(f"mode={mode!r} runs CUDA graphs, which need a CUDA device; the model is on {device}: "
                         "leave mode unset (None), or move the model to a GPU")
