"""SAAP calibration on llama-tiny: the traced taps return the model's own keys and queries before
and after RoPE, the index has the model's shapes, and models it cannot serve get clear errors."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fvcompile.models import get
from fvcompile.models.llama import Llama, apply_rope
from fvcompile.passes.saap_calibration import calibrate, tap_module


def _model(layers=2):
    torch.manual_seed(0)
    cfg = dataclasses.replace(get("llama-tiny").extra["config"], n_layers=layers)
    return Llama(cfg).eval(), cfg


def test_the_taps_are_the_models_own_keys_and_queries():
    model, cfg = _model()
    tokens = torch.randint(0, cfg.vocab_size, (2, 24))
    seen = {}
    for i, layer in enumerate(model.layers):
        layer.attention.wk.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(("k", i), out))
        layer.attention.wq.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(("q", i), out))
    taps = tap_module(model, tokens)  # traced on fake tensors: the hooks see fakes, then the real run's
    with torch.no_grad():
        model(tokens)
        layers = taps(tokens)
    assert len(layers) == cfg.n_layers
    cos, sin = model.rope_cos[:24], model.rope_sin[:24]
    for i, (q_pre, k_pre, q, k, _, _) in enumerate(layers):
        expected_k = seen[("k", i)].view(2, 24, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
        expected_q = seen[("q", i)].view(2, 24, cfg.n_heads, cfg.head_dim).transpose(1, 2)
        torch.testing.assert_close(k_pre, expected_k)
        torch.testing.assert_close(q_pre, expected_q)
        torch.testing.assert_close(k, apply_rope(expected_k, cos, sin))
        torch.testing.assert_close(q, apply_rope(expected_q, cos, sin))


def test_calibrate_gives_an_index_of_the_models_shapes(tmp_path):
    model, cfg = _model()
    batches = [torch.randint(0, cfg.vocab_size, (2, 32)) for _ in range(2)]
    index = calibrate(model, batches, clusters=4, probes=2, iters=5, classifier_steps=10,
                      model_name="llama-tiny", progress=False)
    assert index.shapes == {"layers": 2, "kv_heads": cfg.n_kv_heads, "q_heads": cfg.n_heads, "clusters": 4,
                            "head_dim": cfg.head_dim}
    assert index.meta["calibration_sequences"] == 4 and index.meta["probes"] == 2
    index.check_fits(layers=2, q_heads=cfg.n_heads, kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, model="llama-tiny")


class NoRope(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(16, 48)

    def forward(self, x):
        q, k, v = self.qkv(x).view(1, x.shape[1], 3, 2, 8).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def test_models_it_cannot_serve_get_clear_errors():
    model = NoRope()
    with pytest.raises(ValueError, match="before RoPE; layer 0: no half-split RoPE"):
        calibrate(model, [torch.randn(1, 8, 16)], clusters=2, probes=1, progress=False)
    with pytest.raises(ValueError, match="probes must be in 1..clusters"):
        calibrate(model, [torch.randn(1, 8, 16)], clusters=2, probes=3, progress=False)
    with pytest.raises(ValueError, match="at least one batch"):
        calibrate(model, [], clusters=2, probes=1, progress=False)


def test_the_command_line_writes_an_index(tmp_path, capsys):
    from fvcompile.cli import main
    from fvcompile.passes.saap_index import SAAPIndex

    out = tmp_path / "tiny.safetensors"
    assert main(["calibrate", "saap", "--model", "llama-tiny", "--out", str(out), "--clusters", "4", "--probes", "2",
                 "--seq-len", "32", "--sequences", "2", "--classifier-steps", "5"]) == 0
    index = SAAPIndex.load(out)
    assert index.meta["model"] == "llama-tiny" and index.shapes["clusters"] == 4
    assert main(["calibrate", "saap", "--model", "deit-tiny", "--out", str(tmp_path / "x")]) == 1
    assert "serves Llama-family models" in capsys.readouterr().err


def test_real_text_rows_are_consecutive_tokens_of_the_standard_library():
    from types import SimpleNamespace

    from fvcompile.text import token_batches

    by_bytes = SimpleNamespace(encode=lambda text: SimpleNamespace(ids=list(text.encode()[:5000])))
    rows = token_batches(by_bytes, seq_len=100, sequences=3, skip=1)
    assert [tuple(r.shape) for r in rows] == [(1, 100)] * 3
    first = token_batches(by_bytes, seq_len=100, sequences=2)
    assert torch.equal(first[1], rows[0])  # skip=1 starts one row later
    with pytest.raises(ValueError, match="fewer than the"):
        token_batches(SimpleNamespace(encode=lambda text: SimpleNamespace(ids=[1])), seq_len=10**9, sequences=1)


def test_cluster_masses_made_a_block_of_rows_at_a_time_equal_the_whole_attentions():
    from fvcompile.passes.saap_calibration import causal_attention, cluster_mass_rows, row_blocks
    from fvcompile.passes.saap_index import cluster_mass

    torch.manual_seed(0)
    q, k = torch.randn(1, 4, 40, 8), torch.randn(1, 2, 40, 8)
    key_cluster = torch.randint(0, 5, (1, 4, 40))
    small = 4 * 4 * 40 * 7  # seven rows a block: the last block is short
    assert len(row_blocks(q, small)) == 6
    whole = cluster_mass(causal_attention(q, k, None), key_cluster, 5)
    torch.testing.assert_close(cluster_mass_rows(q, k, None, key_cluster, 5, max_bytes=small), whole)
