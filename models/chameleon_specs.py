"""Registry entries of the Chameleon family (early-fusion text + image-token decoder)."""
from __future__ import annotations

import torch

from fvcompile.models.chameleon import (
    Chameleon,
    ChameleonConfig,
    build_mixed_sequence,
    next_token_loss,
)
from fvcompile.models.registry import ModelSpec, model_device, register

PAPER = "Chameleon (arXiv 2405.09818)"

CONFIGS = {
    # 128 image codes at ids [4, 132), <end image> 132, <begin image> 133, text 134..511;
    # 16 codes per image (a 4x4 grid).
    "chameleon-tiny": ChameleonConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, ffn_hidden=128,
                                      max_seq_len=128, n_image_codes=128, image_tokens=16),
    "chameleon-7b": ChameleonConfig(),
}

# chameleon-7b (d = 4096, 32 layers, 32 heads of 128, FFN 11008, vocab 65,536, untied output;
# the VQ image tokenizer is not counted):
#   token embedding     65,536 * 4,096                      =   268,435,456
#   per layer: wq/wk/wv/wo   4 * 4,096^2                    =    67,108,864
#              q/k norm      2 * (32*128 weight + 32*128 bias) =     16,384
#              SwiGLU        3 * 4,096 * 11,008             =   135,266,304
#              2 RMSNorms    2 * 4,096                      =         8,192
#              layer total                                  =   202,399,744
#   32 layers           32 * 202,399,744                    = 6,476,791,808
#   final RMSNorm                                           =         4,096
#   output projection   4,096 * 65,536                      =   268,435,456
#   total                                                   = 7,013,666,816
# (the same as Hugging Face's ChameleonForConditionalGeneration without its VQ model).
PARAMS = {"chameleon-7b": 7_013_666_816}

# Text tokens before the image; the sequence is text + <boi> + image codes + <eoi>.
TEXT_LEN = {"chameleon-tiny": 8}


def _register(name: str, cfg: ChameleonConfig) -> None:
    text_len = TEXT_LEN.get(name, 254)  # 254 + 1026 = 1280 tokens for the 7B

    def mixed_tokens(model, batch_size: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(0)
        text_shape = (batch_size, text_len)
        text = torch.randint(cfg.first_text_id, cfg.vocab_size, text_shape, generator=gen)
        codes = torch.randint(0, cfg.n_image_codes, (batch_size, cfg.image_tokens), generator=gen)
        return build_mixed_sequence(text, codes, cfg).to(model_device(model))

    register(ModelSpec(
        name=name,
        family="chameleon",
        paper=PAPER,
        build=lambda: Chameleon(cfg),
        # The forward sees all but the last token, exactly what the training step feeds it.
        example_inputs=lambda model, batch_size=2: (mixed_tokens(model, batch_size)[:, :-1],),
        train_batch=lambda model, batch_size=2: (mixed_tokens(model, batch_size),),
        train_step=lambda model, batch: next_token_loss(model, *batch,
                                                        z_loss_weight=cfg.z_loss_weight),
        params=PARAMS.get(name),
        tiny=name.endswith("tiny"),
        notes="one text + image mixed sequence: text, <boi>, image codes, <eoi>; QK-norm per head; "
              "cross-entropy + 1e-5 z-loss",
        extra={"config": cfg, "seq_len": text_len + cfg.image_tokens + 2},
    ))


for _name, _cfg in CONFIGS.items():
    _register(_name, _cfg)
