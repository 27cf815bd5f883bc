"""`fvcompile::saap_attention` (kernels/saap_attention.py) against its reference and the dense
causal attention it replaces (`scaled_dot_product_attention`), with random SAAP tables: the keys'
clusters and each query's probed clusters are computed inside every call, as the op does.
The op has no backward (the saap pass rewrites inference graphs): forward only for it."""
import math

import pytest
import torch
import torch.nn.functional as F
from microbench import DEVICE, DIRECTIONS, FLOAT, measure, needs, shapes

import fvcompile  # noqa: F401
from fvcompile.kernels.saap_attention import (assign_keys, probe_clusters, register_tables,
                                              saap_attention_reference)

PROBES, BLOCK_PROBES, SINK, WINDOW, QUERY_BLOCK, KEYS_PER_CLUSTER = 4, 8, 4, 64, 64, 256
# The reference holds a (batch, heads, queries, keys) mask: up to this many tokens.
REFERENCE_MAX_TOKENS = 8192


def problem(batch, q_heads, kv_heads, tokens, dim):
    """q, k, v (after RoPE) and q, k before it (random stand-ins), and the key of random tables."""
    def rand(*shape):
        return torch.randn(*shape, device=DEVICE, dtype=FLOAT)

    clusters = max(tokens // KEYS_PER_CLUSTER, BLOCK_PROBES)
    key = f"microbench-{q_heads}-{kv_heads}-{dim}-{clusters}"
    tables = (rand(kv_heads, clusters, dim), rand(q_heads, dim, clusters), rand(q_heads, clusters))
    register_tables(key, *tables)
    q, k, v = rand(batch, q_heads, tokens, dim), rand(batch, kv_heads, tokens, dim), rand(batch, kv_heads, tokens, dim)
    return (q, k, v, rand(*q.shape), rand(*k.shape)), key, tables


def saap_op(key):
    def run(q, k, v, q_pre, k_pre):
        return torch.ops.fvcompile.saap_attention(q, k, v, q_pre, k_pre, tables=key, probes=PROBES,
                                                  block_probes=BLOCK_PROBES, sink=SINK, window=WINDOW,
                                                  scale=1 / math.sqrt(q.shape[-1]), query_block=QUERY_BLOCK)
    return run


def reference(tables):
    centroids, weight, bias = tables

    def run(q, k, v, q_pre, k_pre):
        return saap_attention_reference(q, k, v, assign_keys(centroids, k_pre),
                                        probe_clusters(weight, bias, q_pre, PROBES, query_block=QUERY_BLOCK,
                                                       block_probes=BLOCK_PROBES), sink=SINK, window=WINDOW)
    return run


def sdpa(q, k, v, q_pre, k_pre):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


IMPLS = ("fvcompile", "reference", "sdpa (dense causal)")


@pytest.mark.parametrize("shape", shapes("attention"), ids=str)
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("impl", IMPLS)
def test_saap_attention(benchmark, impl, direction, shape):
    inputs, key, tables = problem(*shape)
    if impl == "fvcompile":
        needs(direction == "fwd", "the op has no backward (inference graphs only)")
    if impl == "reference":
        needs(shape[3] <= REFERENCE_MAX_TOKENS, "the reference's dense mask does not fit at this length")
    for x in inputs[:3]:
        x.requires_grad_(direction != "fwd")
    fn = {"fvcompile": saap_op(key), "reference": reference(tables), "sdpa (dense causal)": sdpa}[impl]
    measure(benchmark, f"saap_attention {direction} {shape}", fn, list(inputs), direction)
