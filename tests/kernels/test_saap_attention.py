"""SAAP attention's reference against dense causal SDPA (every cluster probed) and against a
per-query loop that gathers the keys each query reads (any selection), forward and backward;
the sparse CPU path (FlexAttention over the listed blocks; one query block: gathered blocks)
against the reference."""
import math

import pytest
import torch
import torch.nn.functional as F

from fvcompile.kernels.saap_attention import (decode_attention, probe_clusters, saap_attention_reference,
                                             saap_read_mask, selectivity, sparse_attention)
from fvcompile.kernels.saap_layout import build_blocks

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3)}


def _inputs(b=2, hq=4, hkv=2, lq=24, lk=24, d=16, clusters=5, probes=2, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, lq, d, generator=g).to(dtype)
    k = torch.randn(b, hkv, lk, d, generator=g).to(dtype)
    v = torch.randn(b, hkv, lk, d, generator=g).to(dtype)
    key_cluster = torch.randint(0, clusters, (b, hkv, lk), generator=g)
    probed = torch.stack([torch.randperm(clusters, generator=g)[:probes] for _ in range(b * hq * lq)])
    return q, k, v, key_cluster, probed.view(b, hq, lq, probes)


def _loop_reference(q, k, v, key_cluster, probed, sink, window):
    """Each query on its own: the indices of the keys it reads, gathered, softmax over them."""
    b, hq, lq, d = q.shape
    lk, group = k.shape[2], hq // k.shape[1]
    out = torch.empty(b, hq, lq, d)
    for bi in range(b):
        for h in range(hq):
            for i in range(lq):
                pos = lk - lq + i
                read = [j for j in range(pos + 1) if j < sink or pos - j < window
                        or int(key_cluster[bi, h // group, j]) in probed[bi, h, i].tolist()]
                keys, values = k[bi, h // group, read].float(), v[bi, h // group, read].float()
                weights = (keys @ q[bi, h, i].float() / math.sqrt(d)).softmax(0)
                out[bi, h, i] = weights @ values
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("lq", [24, 1], ids=["prefill", "decode"])
def test_every_cluster_probed_is_dense_causal_attention(dtype, lq):
    q, k, v, key_cluster, _ = _inputs(lq=lq, dtype=dtype)
    every = torch.arange(5).expand(*q.shape[:3], 5)
    out = saap_attention_reference(q, k, v, key_cluster, every, sink=0, window=1)
    kk, vv = k.repeat_interleave(2, dim=1).float(), v.repeat_interleave(2, dim=1).float()
    # A query at position p reads keys 0..p: for decode (the last position) that is every key.
    mask = torch.ones(lq, k.shape[2], dtype=torch.bool).tril(k.shape[2] - lq)
    dense = F.scaled_dot_product_attention(q.float(), kk, vv, attn_mask=mask)
    torch.testing.assert_close(out, dense.to(dtype), **TOL[dtype])


@pytest.mark.parametrize("sink,window,probes", [(0, 1, 2), (3, 4, 1), (2, 6, 0), (0, 24, 0)])
def test_any_selection_matches_the_per_query_loop(sink, window, probes):
    q, k, v, key_cluster, probed = _inputs(probes=probes, seed=probes + window)
    out = saap_attention_reference(q, k, v, key_cluster, probed, sink=sink, window=window)
    torch.testing.assert_close(out, _loop_reference(q, k, v, key_cluster, probed, sink, window), **TOL[torch.float32])


def test_gradients_match_the_per_query_loop():
    q, k, v, key_cluster, probed = _inputs(b=1, hq=2, hkv=1, lq=12, lk=12, seed=3)
    grad = torch.randn(1, 2, 12, 16)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    saap_attention_reference(*leaves, key_cluster, probed, sink=1, window=3).backward(grad)
    expected = [t.clone().requires_grad_() for t in (q, k, v)]
    _loop_reference(*expected, key_cluster, probed, 1, 3).backward(grad)
    for got, want in zip(leaves, expected):
        torch.testing.assert_close(got.grad, want.grad, **TOL[torch.float32])


def test_the_read_mask_counts_sink_window_and_clusters_once():
    _, k, _, key_cluster, probed = _inputs(b=1, hq=2, hkv=1, lq=16, lk=16, probes=0)
    mask = saap_read_mask(key_cluster, probed, sink=2, window=3)
    # Sink and window only: query p reads min(p + 1, 2 + 3) keys (they overlap near the start).
    assert mask[0, 0].sum(-1).tolist() == [min(p + 1, 5) for p in range(16)]
    every = torch.arange(5).expand(1, 2, 16, 5)
    assert selectivity(saap_read_mask(key_cluster, every, sink=0, window=1)) == 1.0
    assert 0 < selectivity(mask) < 1


@pytest.mark.parametrize("change,error", [
    (dict(window=0), "window must be >= 1"),
    (dict(sink=-1), "sink must be >= 0"),
    (dict(probed=torch.zeros(2, 3, 24, 1, dtype=torch.long)), "probed must start with q's"),
    (dict(probed=torch.zeros(2, 4, 24, 1)), "integer tensors"),
    (dict(key_cluster=torch.zeros(2, 2, 20, dtype=torch.long)), "key_cluster must be k's"),
])
def test_bad_inputs_name_the_problem(change, error):
    q, k, v, key_cluster, probed = _inputs()
    args = dict(key_cluster=key_cluster, probed=probed, sink=0, window=1) | change
    with pytest.raises((ValueError, TypeError), match=error):
        saap_attention_reference(q, k, v, **args)


# One query block gathers its key blocks (here); several run FlexAttention, whose compile (~10 s)
# is paid once, in the pass's tests (prefill through the saap pass).
SPARSE_CASES = {"decode": (1, 48, torch.float32), "decode_fp16": (1, 48, torch.float16),
                "one_block": (12, 48, torch.float32)}


@pytest.mark.parametrize("lq,lk,dtype", SPARSE_CASES.values(), ids=SPARSE_CASES.keys())
def test_sparse_path_equals_the_reference(lq, lk, dtype):
    clusters, probes, q_block = 6, 2, 16
    q, k, v, key_cluster, _ = _inputs(b=1, hq=4, hkv=2, lq=lq, lk=lk, clusters=clusters, dtype=dtype, seed=lq)
    g = torch.Generator().manual_seed(lk)
    # Each query its own probes: the one query block's union is read, each query masked to its own.
    probed = torch.stack([torch.randperm(clusters, generator=g)[:probes] for _ in range(4 * lq)]).view(1, 4, lq, -1)
    blocks = build_blocks(key_cluster, probed, clusters, sink=2, window=5, q_block=q_block, kv_block=16)
    out = sparse_attention(q, k, v, blocks, sink=2, window=5, scale=0.3)
    want = saap_attention_reference(q, k, v, key_cluster, probed, sink=2, window=5, scale=0.3)
    torch.testing.assert_close(out, want, **TOL[dtype])


def test_a_query_block_probes_at_most_block_probes_clusters():
    g = torch.Generator().manual_seed(3)
    clusters, probes, q_block, cap = 8, 2, 4, 3
    weight, bias = torch.randn(2, 16, clusters, generator=g), torch.randn(2, clusters, generator=g)
    queries = torch.randn(1, 2, 10, 16, generator=g)  # the last block holds 2 queries
    probed = probe_clusters(weight, bias, queries, probes, query_block=q_block, block_probes=cap)
    logits = queries @ weight + bias[:, None, :]
    for h in range(2):
        for start in range(0, 10, q_block):
            block = logits[0, h, start:start + q_block]
            kept = block.softmax(-1).sum(0).topk(cap).indices.tolist()  # the block's most probable clusters
            for i, row in enumerate(block):
                want = sorted(kept, key=lambda c: -row[c])[:probes]  # each query its best of those
                assert sorted(probed[0, h, start + i].tolist()) == sorted(want)
    uncapped = probe_clusters(weight, bias, queries, probes)
    assert torch.equal(probe_clusters(weight, bias, queries, probes, query_block=q_block, block_probes=clusters),
                       uncapped)
    with pytest.raises(ValueError, match=r"block_probes \(1\) must be >= probes \(2\)"):
        probe_clusters(weight, bias, queries, probes, query_block=q_block, block_probes=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_attention_equals_the_reference(dtype):
    # One query per row and head, its keys found from their clusters and gathered (no layout).
    q, k, v, key_cluster, probed = _inputs(lq=1, lk=40, clusters=6, dtype=dtype, seed=7)
    out = decode_attention(q, k, v, key_cluster, probed, sink=3, window=5, scale=0.3)
    want = saap_attention_reference(q, k, v, key_cluster, probed, sink=3, window=5, scale=0.3)
    torch.testing.assert_close(out, want, **TOL[dtype])
