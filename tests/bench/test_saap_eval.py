"""The pieces of bench/saap_eval.py that decide its numbers: the pass-key rows, Quest's page bound
and page choice, the window and cluster read masks against the kernel's rule, and the routed
graph, which with dense attention is the model itself."""
import dataclasses
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from saap_eval import (Chunk, ClusterSelection, LayerInputs, Options, QuestSelection, Router,  # noqa: E402
                       WindowSelection, attend_reads, metric_attend, page_bounds, passkey_row, pick_pages)

from fvcompile.kernels.saap_attention import saap_attention_reference, saap_read_mask
from fvcompile.models import get
from fvcompile.models.llama import Llama

OPTS = Options(sink=2, window=4, probes=2, query_block=4, page=4, clusters=5)


def test_the_passkey_row_hides_the_key_at_its_depth_and_asks_for_it_at_the_end():
    chars = SimpleNamespace(encode=lambda text: SimpleNamespace(ids=[ord(c) for c in text]))
    text = [ord("x")] * 300
    row = passkey_row(chars, text, 0.5, 71432)
    decoded = "".join(map(chr, row.tokens[0].tolist()))
    assert row.tokens.shape == (1, 300) and row.answer == len(" 71432")
    assert decoded.endswith("What is the pass key? The pass key is 71432")
    needle = decoded.index("The pass key is 71432. Remember it.")
    text_before, text_all = int(row.is_text[:needle].sum()), int(row.is_text.sum())
    assert abs(text_before - text_all / 2) <= 1 and not row.is_text[-row.answer:].any()


def test_the_quest_bound_holds_for_every_key_of_its_page():
    torch.manual_seed(0)
    k, q = torch.randn(1, 2, 37, 8), torch.randn(1, 2, 5, 8)
    low, high = page_bounds(k, 4)
    bound = q.clamp(min=0) @ high.transpose(-1, -2) + q.clamp(max=0) @ low.transpose(-1, -2)  # (1, 2, 5, 10)
    scores = q @ k.transpose(-1, -2)  # (1, 2, 5, 37)
    for key in range(37):
        assert (scores[..., key] <= bound[..., key // 4] + 1e-5).all()
    assert ((scores[..., 36] - bound[..., 9]).abs().amin() < 1e-5)  # a one-key page: tight


def test_pages_are_taken_by_bound_while_they_fit_the_budget():
    bound = torch.tensor([[[[3.0, 5.0, 1.0, 4.0]]]])
    new = torch.tensor([[4, 4, 4, 0]])  # the last page adds nothing: never taken
    assert pick_pages(bound, new, torch.tensor([[[8]]])).tolist() == [[[[True, True, False, False]]]]
    assert pick_pages(bound, new, torch.tensor([[[6]]])).tolist() == [[[[False, True, False, False]]]]
    assert pick_pages(bound, new, torch.tensor([[[7]]])).tolist() == [[[[True, True, False, False]]]]


def _inputs(seed=0, lq=24):
    torch.manual_seed(seed)
    q, k = torch.randn(1, 4, lq, 8), torch.randn(1, 2, lq, 8)
    return LayerInputs(0, q, k, q, k, torch.randn(1, 2, lq, 8), None)


def test_cluster_reads_are_the_kernels_read_mask_and_attention():
    x = _inputs()
    key_cluster, probed = torch.randint(0, 5, (1, 2, 24)), torch.randint(0, 5, (1, 4, 24, 2))
    whole = saap_read_mask(key_cluster, probed, sink=OPTS.sink, window=OPTS.window)
    chunk = Chunk(8, 22, OPTS.query_block)  # the last block short
    reads = ClusterSelection(key_cluster, probed, 4, OPTS).reads(chunk, x, None, None)
    assert torch.equal(reads.dense(), whole[:, :, 8:22, :22])
    expected = saap_attention_reference(x.q, x.k, x.v, key_cluster, probed, sink=OPTS.sink, window=OPTS.window)
    torch.testing.assert_close(attend_reads(x, reads)[0], expected[:, :, 8:22])


def test_the_window_and_quest_read_their_budget():
    x = _inputs()
    chunk = Chunk(16, 24, OPTS.query_block)
    budget = torch.randint(6, 9, (1, 4, 8)).minimum(torch.arange(16, 24) + 1)
    window = WindowSelection(OPTS).reads(chunk, x, None, budget)
    assert torch.equal(window.per_query(), budget)
    dense = window.dense()
    assert dense[..., :OPTS.sink].all() and dense[..., 16:].diagonal(dim1=-2, dim2=-1).all()
    quest = QuestSelection(x, OPTS).reads(chunk, x, None, budget).dense()
    assert (quest.sum(-1) - budget).abs().max() <= OPTS.page // 2
    assert not quest.triu(diagonal=17).any()  # causal


def test_the_routed_graph_with_dense_attention_is_the_model():
    torch.manual_seed(0)
    cfg = dataclasses.replace(get("llama-tiny").extra["config"], n_layers=2)
    model = Llama(cfg).eval()
    tokens = torch.randint(0, cfg.vocab_size, (1, 24))
    stats = {}
    index = SimpleNamespace(centroids=torch.nn.functional.normalize(torch.randn(2, cfg.n_kv_heads, 5, cfg.head_dim), dim=-1),
                            weight=torch.randn(2, cfg.n_heads, cfg.head_dim, 5), bias=torch.zeros(2, cfg.n_heads, 5))
    with torch.no_grad():
        routed = Router(model, tokens)(tokens, metric_attend(index, ["saap", "window"], OPTS, stats))
        torch.testing.assert_close(routed, model(tokens), atol=1e-4, rtol=1e-4)
    assert sorted(stats["saap"]) == [0, 1] and stats["window"][0][0].read == stats["saap"][0][0].read


def test_the_oracle_probes_the_clusters_holding_most_of_each_querys_mass():
    from saap_eval import OracleSelection, dense_attention

    from fvcompile.passes.saap_calibration import causal_attention
    from fvcompile.passes.saap_index import cluster_mass

    x = _inputs(lq=16)
    index = SimpleNamespace(centroids=torch.nn.functional.normalize(torch.randn(1, 2, 5, 8), dim=-1))
    oracle = OracleSelection(index, x, OPTS)
    chunk = Chunk(0, 16, OPTS.query_block)
    oracle.reads(chunk, x, dense_attention(x)[1], None)
    weights = causal_attention(x.q, x.k, None)
    i, j = torch.arange(16)[:, None], torch.arange(16)[None, :]
    weights = weights.masked_fill((j < OPTS.sink) | (i - j < OPTS.window), 0.0)  # outside sink and window
    mass = cluster_mass(weights, oracle.clusters, 5)  # (B, Hq, queries, clusters)
    best = mass.topk(OPTS.probes, dim=-1).values.sum(-1)
    torch.testing.assert_close(mass.gather(-1, oracle.probed).sum(-1), best)


def test_saap_reads_each_querys_own_clusters():
    from saap_eval import saap_selection

    x = _inputs()
    index = SimpleNamespace(centroids=torch.nn.functional.normalize(torch.randn(1, 2, 5, 8), dim=-1),
                            weight=torch.randn(1, 4, 8, 5), bias=torch.zeros(1, 4, 5))
    chosen = saap_selection(index, x, OPTS)
    reads = chosen.reads(Chunk(0, 24, OPTS.query_block), x, None, None).dense()
    assert torch.equal(reads, saap_read_mask(chosen.key_cluster, chosen.probed, sink=OPTS.sink, window=OPTS.window))


def test_the_key_oracle_reads_each_querys_best_keys_within_its_budget():
    from saap_eval import OracleKeys, dense_attention

    x = _inputs()
    chunk = Chunk(16, 24, OPTS.query_block)
    budget = torch.full((1, 4, 8), 9)
    lse = dense_attention(x)[1][:, :, 16:24]
    reads = OracleKeys(OPTS).reads(chunk, x, lse, budget)
    assert torch.equal(reads.per_query(), budget)
    recall = attend_reads(x, reads, lse)[1]
    window = WindowSelection(OPTS).reads(chunk, x, None, budget)
    assert (recall >= attend_reads(x, window, lse)[1] - 1e-6).all()  # no selection of 9 keys holds more mass
