"""The saap pass on llama-tiny (inference, codegen=False: the post-grad graph runs as FX code):
every attention rewritten, equal to dense with every cluster probed, equal to an eager SAAP
model otherwise; short sequences stay dense; an index of another shape is a clear error."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

import fvcompile

from fvcompile.kernels.saap_attention import assign_keys, saap_attention_reference
from fvcompile.kernels.saap_layout import per_query, probe_blocks
from fvcompile.models import get
from fvcompile.models.llama import Llama, apply_rope
from fvcompile.passes.saap import SAAP, SAAP_OP
from fvcompile.passes.saap_calibration import calibrate
from fvcompile.testing import PassTestBackend

SEQ = 32


@pytest.fixture(scope="module")
def model_and_index():
    torch.manual_seed(0)
    cfg = dataclasses.replace(get("llama-tiny").extra["config"], n_layers=2)
    model = Llama(cfg).eval()
    batches = [torch.randint(0, cfg.vocab_size, (2, SEQ)) for _ in range(2)]
    index = calibrate(model, batches, clusters=4, probes=2, iters=5, classifier_steps=20, progress=False)
    return model, index, torch.randint(0, cfg.vocab_size, (1, SEQ))


def _compiled(model, saap, tokens):
    backend = PassTestBackend(saap)
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(model, backend=backend, fullgraph=True)(tokens)
    return out, backend


def _eager_saap(model, index, tokens, probes, sink, window, monkeypatch, query_block=64):
    """The model in eager mode with each attention computed as SAAP: its q and k rotated back to
    before RoPE (RoPE is a rotation: the inverse angle undoes it), the index's layer by call order."""
    cos, sin = model.rope_cos[:SEQ], model.rope_sin[:SEQ]
    layer = iter(range(len(model.layers)))

    def sdpa(q, k, v, is_causal, enable_gqa):
        i = next(layer)
        q_pre, k_pre = apply_rope(q, cos, -sin), apply_rope(k, cos, -sin)
        key_cluster = assign_keys(index.centroids[i], k_pre)
        probed = per_query(probe_blocks(index.weight[i], index.bias[i], q_pre, probes, query_block), SEQ, query_block)
        return saap_attention_reference(q, k, v, key_cluster, probed, sink=sink, window=window)
    monkeypatch.setattr(F, "scaled_dot_product_attention", sdpa)
    with torch.no_grad():
        out = model(tokens)
    monkeypatch.undo()
    return out


def test_every_cluster_probed_is_dense(model_and_index):
    model, index, tokens = model_and_index
    out, backend = _compiled(model, SAAP(index, probes=4, min_seq_len=16, sink=0, window=1), tokens)
    assert backend.op_count(SAAP_OP) == 2 and len(backend.sites("saap")) == 2
    with torch.no_grad():
        torch.testing.assert_close(out, model(tokens), atol=1e-5, rtol=1e-5)


def test_fewer_probes_equal_the_eager_saap_model(model_and_index, monkeypatch):
    # Query blocks of 8: FlexAttention's path (its compile is paid in the kernel tests too).
    model, index, tokens = model_and_index
    out, backend = _compiled(model, SAAP(index, probes=1, min_seq_len=16, sink=2, window=4, query_block=8), tokens)
    assert backend.op_count(SAAP_OP) == 2
    want = _eager_saap(model, index, tokens, 1, 2, 4, monkeypatch, query_block=8)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(out, model(tokens), atol=1e-3)  # it does read fewer keys
    detail = backend.sites("saap")[0].detail
    assert "1 of 4 key clusters" in detail and "2 sink and 4 window keys" in detail


def test_short_sequences_stay_dense_and_say_why(model_and_index):
    model, index, tokens = model_and_index
    out, backend = _compiled(model, SAAP(index, min_seq_len=64), tokens)
    assert backend.op_count(SAAP_OP) == 0
    skipped = backend.sites("saap", rewritten=False)
    assert [s.reason for s in skipped] == ["short", "short"] and "below min_seq_len=64" in skipped[0].detail
    with torch.no_grad():
        torch.testing.assert_close(out, model(tokens))


def test_bad_options_and_an_index_of_another_model(model_and_index):
    model, index, tokens = model_and_index
    with pytest.raises(ValueError, match=r"probes must be an int in 1..4"):
        SAAP(index, probes=5)
    with pytest.raises(ValueError, match="window must be an int >= 1"):
        SAAP(index, window=0)
    three_layers = dataclasses.replace(index, centroids=index.centroids[[0, 1, 1]], weight=index.weight[[0, 1, 1]],
                                       bias=index.bias[[0, 1, 1]])
    with pytest.raises(Exception, match="does not fit the model.*layers: index 3, model 2"):
        _compiled(model, SAAP(three_layers, min_seq_len=16), tokens)


@pytest.mark.inductor
def test_inductor_code_generation_runs_the_rewritten_graph(model_and_index, monkeypatch):
    # Inductor's C++ code calls the op (its index tables found by key, not graph constants).
    model, index, tokens = model_and_index
    torch._dynamo.reset()
    compiled = fvcompile.optimize(model, passes=[SAAP(index, probes=1, min_seq_len=16, sink=2, window=4)])
    with torch.no_grad():
        out = compiled(tokens)
    torch.testing.assert_close(out, _eager_saap(model, index, tokens, 1, 2, 4, monkeypatch), atol=1e-5, rtol=1e-5)
