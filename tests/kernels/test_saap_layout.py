"""SAAP's slots and block lists read exactly the keys of the reference's rule, each key once,
as the kernels read them (full blocks whole, partial ones through the mask), whether a block's
queries probe alike or each its own clusters."""
import pytest
import torch

from fvcompile.kernels.saap_attention import saap_read_mask
from fvcompile.kernels.saap_layout import block_union, build_blocks, pack_bits, per_query, probe_table, read_mask

CASES = {  # b, hq, hkv, lq, lk, clusters, probes, sink, window, q_block, kv_block
    "prefill_gqa": (2, 4, 2, 37, 37, 5, 2, 3, 4, 8, 4),
    "decode": (1, 2, 1, 1, 50, 6, 2, 2, 5, 16, 8),
    "no_sink": (1, 2, 2, 20, 20, 3, 3, 0, 1, 4, 4),
    "one_kv_head": (2, 4, 1, 64, 64, 8, 1, 4, 8, 16, 8),
    "last_queries": (1, 2, 1, 9, 40, 4, 1, 1, 3, 4, 8),
}


def random_probes(g, b, hq, rows, clusters, probes):
    """(b, hq, rows, probes): distinct clusters per row."""
    return torch.stack([torch.randperm(clusters, generator=g)[:probes] for _ in range(b * hq * rows)]).view(
        b, hq, rows, probes)


@pytest.mark.parametrize("each_query", [False, True], ids=["block_probes", "query_probes"])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_block_lists_read_the_reference_keys(case, each_query):
    b, hq, hkv, lq, lk, clusters, probes, sink, window, q_block, kv_block = case
    g = torch.Generator().manual_seed(lk + lq)
    key_cluster = torch.randint(0, clusters, (b, hkv, lk), generator=g)
    if each_query:
        probed = random_probes(g, b, hq, lq, clusters, probes)
    else:
        probed = per_query(random_probes(g, b, hq, -(-lq // q_block), clusters, probes), lq, q_block)
    blocks = build_blocks(key_cluster, probed, clusters, sink=sink, window=window, q_block=q_block, kv_block=kv_block)
    got = read_mask(blocks, lq=lq, lk=lk, sink=sink, window=window)
    want = saap_read_mask(key_cluster, probed, sink=sink, window=window)
    assert torch.equal(got, want)
    assert blocks.slots_read(lq) >= int(want.sum())  # the kernel computes at least what is read


def test_a_cluster_block_is_full_only_where_every_query_of_the_block_probes_it():
    key_cluster = (torch.arange(64) >= 32).long().view(1, 1, 64)  # cluster 0: keys 0-31, cluster 1: 32-63
    alike = torch.zeros(1, 1, 64, 1, dtype=torch.long)  # every query probes cluster 0
    one_differs = alike.clone()
    one_differs[0, 0, 50] = 1
    kw = dict(sink=0, window=1, q_block=16, kv_block=16)
    full = [build_blocks(key_cluster, probed, 2, **kw).full_num_blocks[0, 0, 3].item() for probed in (alike, one_differs)]
    assert full == [2, 0]  # the last query block: cluster 0's two blocks, then masked for query 50


def test_probe_bits_hold_each_querys_clusters():
    table = torch.zeros(2, 70, dtype=torch.bool)
    table[0, [0, 31, 32, 69]] = True
    table[1, 5] = True
    bits = pack_bits(table)
    assert bits.dtype == torch.int32 and bits.shape == (2, 3)
    unpacked = (bits[..., None] >> torch.arange(32)) & 1
    assert torch.equal(unpacked.flatten(-2)[:, :70].bool(), table)


def test_cluster_part_pads_each_cluster_to_whole_blocks():
    key_cluster = torch.tensor([[[2, 0, 2, 2, 1, 2, 2]]])  # cluster 0: 1 key, 1: 1, 2: 5
    blocks = build_blocks(key_cluster, torch.zeros(1, 1, 7, 1, dtype=torch.long), 3, sink=0, window=1, q_block=8,
                          kv_block=4)
    assert blocks.band_len == 8
    assert blocks.slot_pos[0, 0, 8:].tolist() == [1, -1, -1, -1, 4, -1, -1, -1, 0, 2, 3, 5, 6, -1, -1, -1]


def test_lists_are_as_wide_as_the_candidates_not_the_sequence():
    g = torch.Generator().manual_seed(1)
    key_cluster = torch.randint(0, 32, (1, 1, 2048), generator=g)
    probed = per_query(torch.randint(0, 32, (1, 1, 128, 1), generator=g), 2048, 16)
    blocks = build_blocks(key_cluster, probed, 32, sink=4, window=16, q_block=16, kv_block=16)
    most_in_a_cluster = int(torch.bincount(key_cluster.flatten()).max())
    assert blocks.kv_indices.shape[-1] <= 1 + 3 + -(-most_in_a_cluster // 16)  # sink, window, one cluster
    assert blocks.slot_pos.shape[-1] // 16 > 10 * blocks.kv_indices.shape[-1]


def test_the_slots_length_depends_on_the_keys_alone():
    # A compiled kernel is specialised to its shapes: every layer's clustering must give the same.
    even = torch.arange(40).remainder(4).view(1, 1, 40)
    skewed = torch.zeros(1, 1, 40, dtype=torch.long)
    lengths = {build_blocks(kc, torch.zeros(1, 1, 40, 1, dtype=torch.long), 4, sink=0, window=1, q_block=16,
                            kv_block=8).slot_pos.shape[-1] for kc in (even, skewed)}
    assert len(lengths) == 1


def test_a_blocks_union_holds_the_clusters_its_queries_probe():
    probed = torch.tensor([[[[0, 1], [1, 2], [3, 0], [3, 3], [4, 4]]]])  # 5 queries, blocks of 2
    union = block_union(probe_table(probed, 6), q_block=2)
    assert [sorted(u for u in row if u >= 0) for row in union[0, 0].tolist()] == [[0, 1, 2], [0, 3], [4]]
