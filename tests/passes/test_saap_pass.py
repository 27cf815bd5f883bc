"""The saap pass on llama-tiny (inference, codegen=False: the post-grad graph runs as FX code):
every attention rewritten, equal to dense with every cluster probed, equal to an eager SAAP
model otherwise; short sequences stay dense; an index of another shape is a clear error."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

import fvcompile

from fvcompile.kernels.saap_attention import assign_keys, probe_clusters, saap_attention_reference
from fvcompile.models import get
from fvcompile.models.llama import Llama, apply_rope, rope_tables
from fvcompile.passes.saap import SAAP, SAAP_CACHE_OP, SAAP_OP
from fvcompile.passes.saap_calibration import calibrate
from fvcompile.passes.saap_index import SAAPIndex
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


def _eager_saap(model, index, tokens, probes, sink, window, monkeypatch, **block):
    """The model in eager mode with each attention computed as SAAP: its q and k rotated back to
    before RoPE (RoPE is a rotation: the inverse angle undoes it), the index's layer by call order;
    `block`: probe_clusters's query_block and block_probes."""
    cos, sin = model.rope_cos[:tokens.shape[1]], model.rope_sin[:tokens.shape[1]]
    layer = iter(range(len(model.layers)))

    def sdpa(q, k, v, is_causal, enable_gqa):
        i = next(layer)
        q_pre, k_pre = apply_rope(q, cos, -sin), apply_rope(k, cos, -sin)
        key_cluster = assign_keys(index.centroids[i], k_pre)
        probed = probe_clusters(index.weight[i], index.bias[i], q_pre, probes, **block)
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
    # Query blocks of 8: the op runs FlexAttention (the one test in make test that compiles it);
    # each block reads 2 of the 4 clusters together.
    model, index, tokens = model_and_index
    saap = SAAP(index, probes=1, block_probes=2, min_seq_len=16, sink=2, window=4, query_block=8)
    out, backend = _compiled(model, saap, tokens)
    assert backend.op_count(SAAP_OP) == 2
    want = _eager_saap(model, index, tokens, 1, 2, 4, monkeypatch, query_block=8, block_probes=2)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(out, model(tokens), atol=1e-3)  # it does read fewer keys
    detail = backend.sites("saap")[0].detail
    assert "1 of 4 key clusters" in detail and "2 sink and 4 window keys" in detail
    # Even clusters: query p reads min(p + 1, 6 + (p + 1 - 6) / 4) keys of its p + 1.
    expected = sum(min(n, 6 + max(n - 6, 0) / 4) for n in range(1, SEQ + 1)) / sum(range(1, SEQ + 1))
    assert f"~{expected:.0%} of the causal keys read" in detail


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
    with pytest.raises(ValueError, match=r"block_probes must be an int in 2..4"):
        SAAP(index, probes=2, block_probes=1)
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


class LastQueryAttention(torch.nn.Module):
    """One attention whose only query is the last position (a decode step without a cache):
    `is_causal=False` reads every key, as decode does; `is_causal=True` would read key 0 only
    (SDPA aligns causal queries to the first keys)."""

    def __init__(self, is_causal: bool, heads=4, kv_heads=2, head_dim=8, seq=40):
        super().__init__()
        self.is_causal, self.heads, self.kv_heads, self.head_dim = is_causal, heads, kv_heads, head_dim
        self.q = torch.nn.Linear(16, heads * head_dim, bias=False)
        self.kv = torch.nn.Linear(16, 2 * kv_heads * head_dim, bias=False)
        self.cos, self.sin = rope_tables(head_dim, seq, 10000.0)

    def forward(self, x):
        b, n, _ = x.shape
        q = self.q(x[:, -1:]).view(b, 1, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(x).view(b, n, 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(q, self.cos[n - 1:n], self.sin[n - 1:n]), apply_rope(k, self.cos[:n], self.sin[:n])
        return F.scaled_dot_product_attention(q, k, v, is_causal=self.is_causal, enable_gqa=True)


def test_one_query_reading_every_key_is_decode_and_is_rewritten():
    torch.manual_seed(0)
    module, x = LastQueryAttention(is_causal=False).eval(), torch.randn(1, 40, 16)
    index = SAAPIndex(torch.nn.functional.normalize(torch.randn(1, 2, 3, 8), dim=-1), torch.randn(1, 4, 8, 3),
                      torch.zeros(1, 4, 3))
    out, backend = _compiled(module, SAAP(index, probes=1, min_seq_len=16, sink=2, window=4), x)
    assert backend.op_count(SAAP_OP) == 1
    with torch.no_grad():
        q = module.q(x[:, -1:]).view(1, 1, 4, 8).transpose(1, 2)
        k, v = module.kv(x).view(1, 40, 2, 2, 8).permute(2, 0, 3, 1, 4)
        rope = lambda t, at: apply_rope(t, module.cos[at], module.sin[at])  # noqa: E731
        probed = probe_clusters(index.weight[0], index.bias[0], q, 1)
        want = saap_attention_reference(rope(q, slice(39, 40)), rope(k, slice(0, 40)), v, assign_keys(index.centroids[0], k),
                                        probed, sink=2, window=4)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def test_causal_with_fewer_queries_than_keys_stays_dense():
    torch.manual_seed(0)
    module, x = LastQueryAttention(is_causal=True).eval(), torch.randn(1, 40, 16)
    index = SAAPIndex(torch.randn(1, 2, 3, 8), torch.randn(1, 4, 8, 3), torch.zeros(1, 4, 3))
    out, backend = _compiled(module, SAAP(index, probes=1, min_seq_len=16), x)
    assert backend.op_count(SAAP_OP) == 0
    assert [s.reason for s in backend.sites("saap", rewritten=False)] == ["not_causal"]
    with torch.no_grad():
        torch.testing.assert_close(out, module(x))


def test_decoding_through_a_kv_cache_reads_as_saap_over_the_filled_slots(model_and_index, monkeypatch):
    # Prefill 32 tokens, then decode two, through the model's static cache: each step's logits
    # equal the eager SAAP model's last ones on the whole sequence so far.
    model, index, tokens = model_and_index
    saap = SAAP(index, probes=1, min_seq_len=16, sink=2, window=4, query_block=8)
    cache = model.new_kv_cache(1, SEQ + 8)
    start = torch.zeros(1, dtype=torch.long)
    backend = PassTestBackend(saap)
    torch._dynamo.reset()
    step = torch.compile(model, backend=backend, fullgraph=True, dynamic=False)
    sequence = tokens
    with torch.no_grad():
        logits = step(tokens, cache, torch.arange(SEQ), start)
        torch.testing.assert_close(logits, _eager_saap(model, index, tokens, 1, 2, 4, monkeypatch), atol=1e-5, rtol=1e-5)
        for pos in (SEQ, SEQ + 1):
            sequence = torch.cat([sequence, logits[:, -1:].argmax(-1)], 1)
            logits = step(sequence[:, -1:], cache, torch.tensor([pos]), start)
            want = _eager_saap(model, index, sequence, 1, 2, 4, monkeypatch)[:, -1:]
            torch.testing.assert_close(logits, want, atol=1e-5, rtol=1e-5)
    # 2 layers in each graph (prefill, decode; Dynamo may compile decode twice), none dense.
    assert backend.op_count(SAAP_CACHE_OP) in (4, 6) and not backend.sites("saap", rewritten=False)


def test_the_cache_op_is_dense_where_rows_are_padded(model_and_index):
    # A left-padded row's mask hides the slots before its start: no causal prefix, so SDPA with the mask.
    _, index, _ = model_and_index
    saap = SAAP(index, probes=1, min_seq_len=4, sink=2, window=4, query_block=8)  # registers the tables
    g = torch.Generator().manual_seed(0)
    q, q_pre = torch.randn(2, 4, 1, 16, generator=g), torch.randn(2, 4, 1, 16, generator=g)
    k, v = torch.randn(2, 2, 12, 16, generator=g), torch.randn(2, 2, 12, 16, generator=g)
    slots = torch.tensor([9])
    readable = (torch.arange(12) <= 9) & (torch.arange(12)[None, :] >= torch.tensor([[0], [3]]))  # row 1 starts at 3
    mask = torch.where(readable, 0.0, float("-inf"))[:, None, None, :]
    out = torch.ops.fvcompile.saap_cache_attention(
        q, k, v, mask, q_pre, k[:, :, 9:10], slots, k, tables=saap._tables_key(0), probes=1, block_probes=4, sink=2,
        window=4, scale=0.25, query_block=8, min_seq_len=4)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.25, enable_gqa=True))
