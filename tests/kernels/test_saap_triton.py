"""SAAP's Triton kernels (prefill, decode) against the reference on random clusters and probes,
and against dense causal SDPA with every cluster probed; keys in slots and by position. Without a
GPU they run in Triton's interpreter (tests/conftest.py), so the shapes are tiny."""
import dataclasses
import os

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and no Triton interpreter (TRITON_INTERPRET=1)", allow_module_level=True)

from fvcompile.kernels.saap_attention import saap_attention_reference  # noqa: E402
from fvcompile.kernels.saap_layout import build_blocks, per_query  # noqa: E402
from fvcompile.kernels.saap_triton import (gather_slots, saap_attention_triton, saap_decode,  # noqa: E402
                                           saap_prefill)

TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float16: dict(atol=2e-3, rtol=2e-3)}
SINK, WINDOW = 3, 20


def _case(b, hq, hkv, lq, lk, *, clusters=5, probes=2, d=16, dtype=torch.float32, seed=0, q_block=16, kv_block=16,
          sink=SINK, window=WINDOW, each_query=False):
    """Random q, k, v, key clusters and probes, alike in each query block or each query its own;
    the blocks; the reference output."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=g).to(dtype).to(DEVICE)
               for h, n in ((hq, lq), (hkv, lk), (hkv, lk)))
    key_cluster = torch.randint(0, clusters, (b, hkv, lk), generator=g).to(DEVICE)
    rows = lq if each_query else -(-lq // q_block)
    probed = torch.stack([torch.randperm(clusters, generator=g)[:probes] for _ in range(b * hq * rows)])
    probed = probed.view(b, hq, rows, probes).to(DEVICE)
    probed = probed if each_query else per_query(probed, lq, q_block)
    blocks = build_blocks(key_cluster, probed, clusters, sink=sink, window=window, q_block=q_block, kv_block=kv_block)
    want = saap_attention_reference(q, k, v, key_cluster, probed, sink=sink, window=window)
    return q, k, v, blocks, want


def _keys(k, v, blocks, by_position):
    return (k, v) if by_position else gather_slots(k, v, blocks.slot_pos)


PREFILL = {  # b, hq, hkv, lq, lk, keys by position (else in slots), each query its own probes
    "gqa": (2, 2, 1, 40, 40, False, False),
    "mha": (1, 2, 2, 48, 48, True, False),
    "last_queries": (1, 2, 1, 24, 56, True, False),
    "each_query": (1, 2, 1, 40, 40, True, True),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", PREFILL.values(), ids=PREFILL.keys())
def test_prefill_matches_the_reference(case, dtype):
    *shape, by_position, each_query = case
    lq, lk = shape[3:]
    q, k, v, blocks, want = _case(*shape, dtype=dtype, seed=lq + lk, each_query=each_query)
    out = saap_prefill(q, *_keys(k, v, blocks, by_position), blocks, lq=lq, lk=lk, sink=SINK, window=WINDOW,
                       scale=None, by_position=by_position)
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out, want, **TOL[dtype])


DECODE = {  # queries, splits, keys by position; "idle": more splits than listed blocks (they add nothing)
    "one": (1, 2, False),
    "five_queries": (5, 3, True),
    "idle": (1, 12, True),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", DECODE.values(), ids=DECODE.keys())
def test_decode_matches_the_reference(case, dtype):
    lq, splits, by_position = case
    q, k, v, blocks, want = _case(2, 2, 1, lq, 60, dtype=dtype, seed=lq + splits, each_query=True)
    assert int((blocks.kv_num_blocks + blocks.full_num_blocks).max()) < 12  # "idle" has idle programs
    out = saap_decode(q, *_keys(k, v, blocks, by_position), blocks, lq=lq, lk=60, sink=SINK, window=WINDOW,
                      by_position=by_position, splits=splits)
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out, want, **TOL[dtype])


@pytest.mark.parametrize("lq", [48, 1], ids=["prefill", "decode"])
def test_every_cluster_probed_is_dense_causal_sdpa(lq):
    lk, clusters = 48, 4
    q, k, v, blocks, _ = _case(1, 2, 1, lq, lk, clusters=clusters, probes=clusters, sink=0, window=1, seed=lq)
    out = saap_attention_triton(q, k, v, blocks, lq=lq, lk=lk, sink=0, window=1, scale=0.3)
    mask = torch.ones(lq, lk, dtype=torch.bool, device=DEVICE).tril(lk - lq)
    dense = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=mask,
                                           scale=0.3)
    torch.testing.assert_close(out, dense, **TOL[torch.float32])


def test_nothing_read_gives_zeros_not_nan():
    q, k, v, blocks, _ = _case(1, 2, 1, 16, 32)
    none = torch.zeros_like(blocks.kv_num_blocks)
    empty = dataclasses.replace(blocks, kv_num_blocks=none, full_num_blocks=none)
    out = saap_prefill(q, k, v, empty, lq=16, lk=32, sink=SINK, window=WINDOW, by_position=True)
    assert torch.equal(out, torch.zeros_like(out))
    q, k, v, blocks, _ = _case(1, 2, 1, 1, 32)
    empty = dataclasses.replace(blocks, kv_num_blocks=none[..., :1], full_num_blocks=none[..., :1])
    out = saap_decode(q, k, v, empty, lq=1, lk=32, sink=SINK, window=WINDOW, by_position=True, splits=2)
    assert torch.equal(out, torch.zeros_like(out))


def test_clear_errors():
    q, k, v, blocks, _ = _case(1, 2, 1, 8, 32, q_block=8)
    with pytest.raises(ValueError, match="q_block=16"):
        saap_prefill(q, k, v, blocks, lq=8, lk=32, sink=SINK, window=WINDOW, by_position=True)
    q, k, v, blocks, _ = _case(1, 2, 1, 16, 32, d=8)
    with pytest.raises(ValueError, match="head dim 8"):
        saap_prefill(q, k, v, blocks, lq=16, lk=32, sink=SINK, window=WINDOW, by_position=True)
    q, k, v, blocks, _ = _case(1, 2, 1, 16, 32)
    with pytest.raises(ValueError, match="slots: gather_slots"):  # keys by position passed as slots
        saap_prefill(q, k, v, blocks, lq=16, lk=32, sink=SINK, window=WINDOW)
    with pytest.raises(ValueError, match="one query block"):
        q, k, v, blocks, _ = _case(1, 2, 1, 32, 32)
        saap_decode(q, k, v, blocks, lq=32, lk=32, sink=SINK, window=WINDOW, by_position=True)
