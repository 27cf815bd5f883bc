"""Registry entries of the Hybrid Transformer Demucs family."""
from __future__ import annotations

import torch

from fvcompile.models.htdemucs import HTDemucs, HTDemucsConfig, separation_loss
from fvcompile.models.registry import ModelSpec, register, seeded_randn

PAPER = "Hybrid Transformer Demucs (arXiv 2211.08553)"

CONFIGS = {
    # 2 transformer layers: one self-attention and one cross-attention layer.
    # nfft 128: the smallest with 2 layers of kernel 8 / stride 4 (64 -> 16 -> 4 bins). Compile
    # time grows with nfft: the iSTFT's overlap-add decomposes into one op per window sample.
    # 1000 samples: not a multiple of the hop (32) or of the waveform downsampling (16).
    "htdemucs-tiny": HTDemucsConfig(channels=8, depth=2, nfft=128, t_layers=2, t_heads=2,
                                    segment_samples=1000),
    # The pretrained `htdemucs` of facebookresearch/demucs (7.8 s training segments).
    "htdemucs": HTDemucsConfig(),
    # Its variant with a 512-channel projection around the transformer.
    "htdemucs-bottom512": HTDemucsConfig(bottom_channels=512),
}
# Parameter counts of the reference implementation with the same settings.
PARAMS = {"htdemucs": 26_899_536, "htdemucs-bottom512": 41_473_616}


def _register(name: str, cfg: HTDemucsConfig) -> None:
    def sources(model, batch_size: int) -> torch.Tensor:
        """Deterministic stand-in stems: (batch, n_sources, audio_channels, segment)."""
        return 0.1 * seeded_randn(model, batch_size, cfg.n_sources, cfg.audio_channels, cfg.segment_samples)

    register(ModelSpec(
        name=name,
        family="htdemucs",
        paper=PAPER,
        build=lambda: HTDemucs(cfg),
        example_inputs=lambda model, batch_size=2: (sources(model, batch_size).sum(dim=1),),
        train_batch=lambda model, batch_size=2: (sources(model, batch_size),),
        train_step=lambda model, batch: separation_loss(model, *batch),
        params=PARAMS.get(name),
        tiny=name.endswith("tiny"),
        notes="input: stereo mixture (batch, 2, samples) at 44.1 kHz; output: 4 stems",
        extra={"config": cfg},
    ))


for _name, _cfg in CONFIGS.items():
    _register(_name, _cfg)
