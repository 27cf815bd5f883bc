"""SAAP on a real pretrained model: SmolLM2-135M on real text, against dense attention and baselines.

    python bench/saap_eval.py                                   # 2048 tokens, 64 clusters, 4 probes
    python bench/saap_eval.py --seq-lens 2048,4096,8192 --threads 2 --out bench/results/   # run times: bench/README.md
    python bench/saap_eval.py --seq-lens 8192 --metrics-only --index idx.safetensors   # per-layer metrics (knobs)

One index is calibrated on rows of the Python standard library's sources (`fvcompile/text.py`)
at the longest evaluated length (`--index` keeps it for the next run); each length reads the
rows after the calibration's text, one row per pass-key depth: the row's text with a pass key
hidden at that depth and the question asking for it at its end (`passkey_row`). Each method
reads, per layer, some of the keys; all are measured the same way:
- per layer, on the dense model's own attention inputs (the first `--metric-rows` rows): the
  fraction of the causal query-key pairs read (sink and window included; for the cluster
  methods also as a block-sparse kernel reads them, each cluster padded to whole key blocks and
  every listed block read whole: `saap_layout.build_blocks`), the attention-mass recall (the
  dense attention's mass on the keys read) and the relative L2 error of the attention output
  against dense;
- perplexity on the rows' text tokens and pass-key accuracy, with the method in every layer.

The methods (`METHODS`):
- saap: the pass itself, through `fvcompile.optimize`; the per-layer metrics use the pass's
  selection (each query its classifier's top `probes` clusters, among its block's top
  `--block-probes` if given; a kernel computes, per block of `query_block` queries, the union of
  their clusters' key blocks);
- window: the sink and a local window widened so that each query reads as many keys as SAAP
  reads for it (same layer, head and query);
- quest: Quest's page bounds (pages of `page` keys, per-page elementwise min and max of the
  RoPE'd keys, each query's bound sum_d max(q_d min_d, q_d max_d)), the best pages up to SAAP's
  count for that query, plus the sink and window;
- kmeans_rope: spherical k-means of each sequence's own RoPE'd keys (as many clusters), each
  query routed to the centroids nearest its RoPE'd query (as many probes);
- oracle: SAAP's clusters, each query probing those holding the most of its dense attention mass
  outside the sink and window (as many probes): the upper bound of SAAP's selection;
- oracle_keys: each query's own highest-weight keys, as many as SAAP reads for it: the upper
  bound of any selection at that budget.
The baselines (and the dense reference) run the model's traced graph with each attention
replaced by the method's attention (`Router`; with SAAP's selection it gives the pass's
logits). Each query block gathers the keys any of its queries reads, and SDPA's CPU kernel
attends over them with the rest masked (`attend_reads`), so a method costs about what it reads.
Scoring the pass key by teacher forcing is exact for greedy decoding: it answers right iff the
argmax at every answer position is the answer's next token.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

import fvcompile
from fvcompile.kernels.saap_attention import KV_BLOCK, assign_keys, probe_clusters
from fvcompile.kernels.saap_layout import build_blocks, probe_table
from fvcompile.models.gguf_loader import load_smollm2
from fvcompile.passes.saap import SAAP
from fvcompile.passes.saap_calibration import ROW_BLOCK_BYTES, attention_graph, calibrate
from fvcompile.passes.saap_index import SAAPIndex, cluster_mass, spherical_kmeans
from fvcompile.text import token_batches

METHODS = ("saap", "window", "quest", "kmeans_rope", "oracle", "oracle_keys")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-lens", default="2048", help="comma-separated token counts")
    p.add_argument("--clusters", type=int, default=64)
    p.add_argument("--probes", type=int, default=4)
    p.add_argument("--sink", type=int, default=4)
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--query-block", type=int, default=64, help="queries that probe clusters as one")
    p.add_argument("--block-probes", type=int, help="clusters a query block reads together (default: no cap)")
    p.add_argument("--page", type=int, default=16, help="keys per Quest page")
    p.add_argument("--calibration-rows", type=int, default=2, help="rows of the longest length")
    p.add_argument("--index", type=Path, help="load this index if it exists, else save the calibrated one here")
    p.add_argument("--metric-rows", type=int, default=1, help="rows whose per-layer metrics are measured")
    p.add_argument("--depths", default="0.1,0.5,0.9", help="pass-key depths, one evaluation row each")
    p.add_argument("--classifier-steps", type=int, default=200)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--saap-through", choices=("pass", "routed"), default="pass",
                   help="SAAP's perplexity and pass key through the pass, or its selection routed like the baselines'")
    p.add_argument("--metrics-only", action="store_true", help="per-layer metrics only: no perplexity, no pass key")
    p.add_argument("--threads", type=int, help="torch threads (on a shared machine 1 can beat 2)")
    p.add_argument("--out", type=Path, help="write saap_eval_cpu_<stamp>.json and .md here")
    return p.parse_args(argv)


# --- the pass-key rows -------------------------------------------------------------------------

@dataclass
class PassKeyRow:
    """One evaluation row: filler text with a pass key hidden in it, the question at the end."""

    tokens: Tensor  # (1, L)
    is_text: Tensor  # (L,) bool: the filler text's tokens (perplexity is measured on them)
    answer: int  # the answer's tokens are the last `answer` ones
    key: int
    depth: float


def passkey_row(tokenizer, text: list[int], depth: float, key: int) -> PassKeyRow:
    """The first tokens of `text` with the pass-key sentence inserted at `depth` (0: start, 1:
    end) and the question and its answer at the end, len(text) tokens in all."""
    needle = tokenizer.encode(f"\nThe pass key is {key}. Remember it. {key} is the pass key.\n").ids
    question = tokenizer.encode("\nWhat is the pass key? The pass key is").ids
    answer = tokenizer.encode(f" {key}").ids
    filler = len(text) - len(needle) - len(question) - len(answer)
    if filler < 0:
        raise ValueError(f"{len(text)} tokens cannot hold the pass-key sentences")
    at = round(depth * filler)
    parts = [(text[:at], True), (needle, False), (text[at:filler], True), (question + answer, False)]
    ids = [t for part, _ in parts for t in part]
    is_text = [flag for part, flag in parts for _ in part]
    return PassKeyRow(torch.tensor([ids]), torch.tensor(is_text), len(answer), key, depth)


def passkey_rows(tokenizer, seq_len: int, depths: list[float], skip: int, seed: int = 0) -> list[PassKeyRow]:
    """One row per depth, each from its own stretch of standard-library text after `skip` rows,
    each with its own random 5-digit key."""
    rng = random.Random(seed)
    texts = token_batches(tokenizer, seq_len=seq_len, sequences=len(depths), skip=skip)
    return [passkey_row(tokenizer, text[0].tolist(), depth, rng.randint(10000, 99999))
            for text, depth in zip(texts, depths)]


def score_row(logits: Tensor, row: PassKeyRow) -> tuple[float, int, bool]:
    """(summed NLL of the text tokens, their count, whether greedy decoding gives the answer)."""
    tokens = row.tokens[0]
    targets = row.is_text[1:]
    nll = F.cross_entropy(logits[0, :-1][targets].float(), tokens[1:][targets], reduction="sum").item()
    answer = slice(len(tokens) - row.answer, len(tokens))
    predicted = logits[0, answer.start - 1:answer.stop - 1].argmax(-1)
    return nll, int(targets.sum()), bool(torch.equal(predicted, tokens[answer]))


# --- the model with its attentions routed ----------------------------------------------------

class Router:
    """The model traced for one input shape (`saap_calibration.attention_graph`), each attention
    replaced by a call of `self.attend(layer, inputs) -> (B, Hq, L, D)` output: the graph the
    baselines and the dense reference run."""

    def __init__(self, model, example: Tensor):
        self.gm, sites = attention_graph(model, example)
        self.attend = None
        graph = self.gm.graph
        for site in sites:
            for unused in [u for u in site.node.users if u.args[1] != 0 and not u.users]:
                graph.erase_node(unused)  # the op's other outputs (logsumexp, ...), unread
            (out,) = site.node.users  # the attention output (getitem 0)
            like = out.meta["val"]
            with graph.inserting_before(site.node):
                new = graph.call_function(self._call, (site.layer, site.pre_rope_query, site.pre_rope_key, site.q,
                                                       site.k, site.v, site.scale, tuple(like.stride())))
            out.replace_all_uses_with(new)
            graph.erase_node(out)
            graph.erase_node(site.node)
        self.gm.recompile()

    def _call(self, layer, q_pre, k_pre, q, k, v, scale, stride):
        out = self.attend(LayerInputs(layer, q_pre, k_pre, q, k, v, scale))
        return torch.empty_strided(out.shape, stride, dtype=q.dtype).copy_(out)  # the op's layout

    def __call__(self, tokens: Tensor, attend) -> Tensor:
        self.attend = attend
        with torch.no_grad():
            return self.gm(tokens)


@dataclass
class LayerInputs:
    """One attention's inputs: query and key before RoPE, query, key, value (B, H, L, D)."""

    layer: int
    q_pre: Tensor
    k_pre: Tensor
    q: Tensor
    k: Tensor
    v: Tensor
    scale: float | None

    def __post_init__(self):
        group = self.q.shape[1] // self.k.shape[1]
        self.scale = self.q.shape[-1] ** -0.5 if self.scale is None else self.scale
        self.k_heads = self.k.float().repeat_interleave(group, dim=1)  # (B, Hq, L, D): each query head's keys
        self.v_heads = self.v.float().repeat_interleave(group, dim=1)

    def chunks(self, q_block: int) -> list["Chunk"]:
        """Blocks of query rows, whole query blocks, whose (B, Hq, rows, L) fp32 weights fit
        ROW_BLOCK_BYTES (the oracle and the dense reference hold that much)."""
        b, hq, lq = self.q.shape[:3]
        rows = max(q_block, ROW_BLOCK_BYTES // (4 * b * hq * lq) // q_block * q_block)
        return [Chunk(start, min(start + rows, lq), q_block) for start in range(0, lq, rows)]


@dataclass
class Chunk:
    """The queries at positions [start, end), in blocks of q_block (the last may be short)."""

    start: int
    end: int
    q_block: int

    @property
    def blocks(self) -> int:
        return -(-(self.end - self.start) // self.q_block)

    def positions(self) -> Tensor:
        """(nb, q_block) each row's position (rows past `end` pad the last block)."""
        return self.start + torch.arange(self.blocks * self.q_block).view(self.blocks, self.q_block)

    def block_ends(self) -> tuple[Tensor, Tensor]:
        """(nb,) the first and last query position of each block."""
        first = self.start + torch.arange(self.blocks) * self.q_block
        return first, torch.clamp(first + self.q_block, max=self.end) - 1

    def to_rows(self, t: Tensor) -> Tensor:
        """(B, H, end - start, ...) from a per-block (B, H, nb, q_block, ...) tensor."""
        return t.flatten(2, 3)[:, :, :self.end - self.start]

    def to_blocks(self, t: Tensor) -> Tensor:
        """(B, H, nb, q_block, ...) from a per-row (B, H, end - start, ...) tensor (padded with 0)."""
        pad = self.blocks * self.q_block - t.shape[2]
        if pad:
            t = torch.cat([t, t.new_zeros(*t.shape[:2], pad, *t.shape[3:])], dim=2)
        return t.unflatten(2, (self.blocks, self.q_block))


@dataclass
class Reads:
    """The keys one chunk's queries read: per query block the positions of the keys any of its
    queries reads (B, Hq, nb, U), padded with unread ones, and per query which of them
    (B, Hq, nb, q_block, U): attention over them costs U, not the sequence length. pos None:
    every key up to the chunk's end (U = end), for queries whose reads differ one by one."""

    pos: Tensor | None
    mask: Tensor
    chunk: Chunk  # the queries, in the blocks that gathered their keys

    def per_query(self) -> Tensor:
        """(B, Hq, rows) keys read by each query."""
        return self.chunk.to_rows(self.mask.sum(-1))

    def dense(self) -> Tensor:
        """(B, Hq, rows, end) bool: the same as a mask over every key (for tests)."""
        end = self.chunk.end
        if self.pos is None:
            return self.chunk.to_rows(self.mask)
        full = torch.zeros(*self.mask.shape[:-1], end + 1, dtype=torch.bool)
        index = torch.where(self.mask, self.pos[..., None, :].expand_as(self.mask), end)
        return self.chunk.to_rows(full.scatter_(-1, index, True)[..., :end])


def gather_reads(chunk: Chunk, candidates: Tensor, rule) -> Reads:
    """Reads from each query block's candidate keys (B, Hq, nb, end) bool and `rule`, which
    says from the candidates' positions (B, Hq, nb, U) which each query reads (B, Hq, nb, qb, U)."""
    width = max(int(candidates.sum(-1).max()), 1)
    pos = candidates.to(torch.int8).argsort(dim=-1, descending=True, stable=True)[..., :width]
    return Reads(pos, rule(pos) & candidates.gather(-1, pos)[..., None, :], chunk)


def attend_reads(x: LayerInputs, reads: Reads, lse: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """(output (B, Hq, rows, D) fp32, recall (B, Hq, rows) or None): each query's softmax
    attention over the keys it reads (SDPA's CPU kernel with the reads as an additive mask). With
    `lse` (B, Hq, rows), the dense attention's log-sum-exp, recall is the mass of the dense
    weights on the keys read: exp(masked log-sum-exp - dense log-sum-exp)."""
    chunk = reads.chunk
    q = x.q[:, :, chunk.start:chunk.end].float()
    bias = torch.zeros(reads.mask.shape).masked_fill_(~reads.mask, float("-inf"))
    if reads.pos is None:  # every key: the rows as SDPA takes them
        out, masked_lse = _flash(q, x.k_heads[:, :, :chunk.end], x.v_heads[:, :, :chunk.end], chunk.to_rows(bias),
                                 x.scale)
    else:  # each query block its own keys: blocks as the batch
        b, hq, nb, width = reads.pos.shape
        index = reads.pos[..., None].expand(b, hq, nb, width, q.shape[-1])
        keys, values = (t[:, :, None].expand(b, hq, nb, -1, -1).gather(3, index).flatten(0, 2)[:, None]
                        for t in (x.k_heads, x.v_heads))
        blocks = chunk.to_blocks(q).flatten(0, 2)[:, None]  # (B Hq nb, 1, qb, D)
        out, masked_lse = _flash(blocks, keys, values, bias.flatten(0, 2)[:, None], x.scale)
        out = chunk.to_rows(out.view(b, hq, nb, *out.shape[2:]))
        masked_lse = chunk.to_rows(masked_lse.view(b, hq, nb, -1))
    return out, None if lse is None else (masked_lse - lse).exp()


def _flash(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=bias,
                                                                          scale=scale)[:2]
    return out, lse


# --- the methods: which keys each query reads ------------------------------------------------

@dataclass
class Options:
    sink: int
    window: int
    probes: int
    query_block: int
    page: int
    clusters: int
    block_probes: int | None = None


def always(pos: Tensor, rows: Tensor, opts: Options) -> Tensor:
    """Causal sink and window reads of queries at `rows` (.., qb, 1) for keys at `pos` (.., 1, U)."""
    return (pos <= rows) & ((pos < opts.sink) | (rows - pos < opts.window))


def block_always(chunk: Chunk, end: int, opts: Options) -> Tensor:
    """(nb, end) bool: the keys some query of each block reads as sink or window."""
    first, last = chunk.block_ends()
    j = torch.arange(end)[None, :]
    return (j <= last[:, None]) & ((j < opts.sink) | (j > first[:, None] - opts.window))


class ClusterSelection:
    """Keys in clusters (key_cluster (B, Hkv, L)); each query reads the clusters it probes
    (probed (B, Hq, L, P)), the sink and the window."""

    def __init__(self, key_cluster: Tensor, probed: Tensor | None, q_heads: int, opts: Options):
        self.opts, self.key_cluster, self.probed = opts, key_cluster, probed
        self.clusters = key_cluster.repeat_interleave(q_heads // key_cluster.shape[1], dim=1)  # (B, Hq, L)

    def reads(self, chunk: Chunk, x: LayerInputs, lse: Tensor | None, budget: Tensor | None) -> Reads:
        return self._reads(chunk, self.probed[:, :, chunk.start:chunk.end])

    def _reads(self, chunk: Chunk, probed: Tensor) -> Reads:
        """Each query's reads, as a mask over every key (its probes differ from its neighbours')."""
        o, end = self.opts, chunk.end
        key_clusters = self.clusters[:, :, None, :end].expand(*probed.shape[:3], end)
        in_probed = probe_table(probed, o.clusters).gather(-1, key_clusters)
        j, rows = torch.arange(end), chunk.positions()[..., None]
        return Reads(None, (chunk.to_blocks(in_probed) | always(j, rows, o)) & (j <= rows), chunk)

    def slots_read(self, lq: int) -> int:
        """Query-key pairs a block-sparse kernel computes (`build_blocks`: each block of
        `query_block` queries reads its union's clusters, padding included)."""
        o = self.opts
        blocks = build_blocks(self.key_cluster, self.probed, o.clusters, sink=o.sink, window=o.window,
                              q_block=o.query_block, kv_block=KV_BLOCK)
        return blocks.slots_read(lq)


def saap_selection(index, x: LayerInputs, opts: Options) -> ClusterSelection:
    """What the pass selects: keys to their nearest centroid, each query probing its classifier's
    top clusters."""
    layer = x.layer
    probed = probe_clusters(index.weight[layer], index.bias[layer], x.q_pre, opts.probes, query_block=opts.query_block,
                            block_probes=opts.block_probes)
    return ClusterSelection(assign_keys(index.centroids[layer], x.k_pre), probed, x.q.shape[1], opts)


def kmeans_rope_selection(x: LayerInputs, opts: Options, iters: int = 25) -> ClusterSelection:
    """The sequence's own RoPE'd keys clustered (spherical k-means per KV head), each query
    probing the centroids nearest (highest inner product with) its RoPE'd query."""
    if x.k.shape[0] != 1:
        raise ValueError("kmeans_rope clusters one sequence's keys: batch 1")
    hq, hkv = x.q.shape[1], x.k.shape[1]
    centroids = torch.stack([spherical_kmeans(x.k[0, h], opts.clusters, iters=iters, seed=h) for h in range(hkv)])
    scores = x.q.float() @ centroids.repeat_interleave(hq // hkv, dim=0).transpose(-1, -2)[None]
    return ClusterSelection(assign_keys(centroids, x.k), scores.topk(opts.probes, dim=-1).indices, hq, opts)


class OracleSelection(ClusterSelection):
    """SAAP's clusters, each query probing those with the most of its true attention mass outside
    the sink and window: known only from the true weights, so found a chunk at a time."""

    def __init__(self, index, x: LayerInputs, opts: Options):
        super().__init__(assign_keys(index.centroids[x.layer], x.k_pre), None, x.q.shape[1], opts)
        self.found: list[Tensor] = []

    def reads(self, chunk: Chunk, x: LayerInputs, lse: Tensor, budget: Tensor | None) -> Reads:
        o, start, end = self.opts, chunk.start, chunk.end
        scores = (x.q[:, :, start:end].float() * x.scale) @ x.k_heads[:, :, :end].transpose(-1, -2)
        weights = scores.sub_(lse[..., None]).exp_()  # the dense weights (B, Hq, rows, end)
        i, j = torch.arange(start, end)[:, None], torch.arange(end)[None, :]
        weights.masked_fill_((j > i) | always(j, i, o), 0.0)  # the mass the probes can add
        probed = cluster_mass(weights, self.clusters[:, :, :end], o.clusters).topk(o.probes, dim=-1).indices
        self.found.append(probed)
        self.probed = torch.cat(self.found, dim=2)
        return self._reads(chunk, probed)


class OracleKeys:
    """Each query's own keys of highest true attention weight, as many as its budget (SAAP's
    count), plus the sink and window: the bound of any selection at that budget."""

    def __init__(self, opts: Options):
        self.opts = opts

    def reads(self, chunk: Chunk, x: LayerInputs, lse: Tensor, budget: Tensor) -> Reads:
        o, start, end = self.opts, chunk.start, chunk.end
        scores = (x.q[:, :, start:end].float() * x.scale) @ x.k_heads[:, :, :end].transpose(-1, -2)
        i, j = torch.arange(start, end)[:, None], torch.arange(end)[None, :]
        fixed = always(j, i, o)
        scores.masked_fill_((j > i) | fixed, float("-inf"))
        extra = (budget - fixed.sum(-1)).clamp(min=0)  # (B, Hq, rows)
        top = scores.topk(max(int(extra.max()), 1), dim=-1).values
        threshold = top.gather(-1, (extra - 1).clamp(min=0)[..., None])  # each query's extra-th best score
        chosen = (scores >= threshold) & (extra[..., None] > 0) & (scores > float("-inf"))
        rows = chunk.positions()[..., None]
        return Reads(None, chunk.to_blocks(chosen) | (always(torch.arange(end), rows, o) & (torch.arange(end) <= rows)),
                     chunk)


class WindowSelection:
    """The sink and the last keys up to each query, as many as its budget (SAAP's count)."""

    def __init__(self, opts: Options):
        self.opts = opts

    def reads(self, chunk: Chunk, x: LayerInputs, lse: Tensor | None, budget: Tensor) -> Reads:
        sink, rows = self.opts.sink, chunk.positions()
        width = chunk.to_blocks(budget) - torch.clamp(rows + 1, max=sink)  # (B, Hq, nb, qb): keys past the sink
        lowest = torch.where(rows <= chunk.end - 1, rows - width, chunk.end).amin(-1)  # (B, Hq, nb)
        j = torch.arange(chunk.end)
        _, last = chunk.block_ends()
        candidates = (j <= last[:, None]) & ((j < sink) | (j > lowest[..., None]))
        rows, width = rows[..., None], width[..., None]

        def rule(pos):
            pos = pos[..., None, :]
            return (pos <= rows) & ((pos < sink) | (pos > rows - width))
        return gather_reads(chunk, candidates, rule)


class QuestSelection:
    """Quest's pages: per page of RoPE'd keys the elementwise min and max; a query's bound on a
    page is sum_d max(q_d min_d, q_d max_d) >= q . k for every key k of the page. Each query
    reads the sink, the window and the pages of highest bound until its budget (SAAP's count).
    Its queries choose their pages one by one: their reads are a mask over every key."""

    def __init__(self, x: LayerInputs, opts: Options):
        self.opts = opts
        self.low, self.high = page_bounds(x.k, opts.page)  # (B, Hkv, nP, D)

    def reads(self, chunk: Chunk, x: LayerInputs, lse: Tensor | None, budget: Tensor) -> Reads:
        o, start, end = self.opts, chunk.start, chunk.end
        q = x.q[:, :, start:end].float()
        group = q.shape[1] // self.low.shape[1]
        pages = -(-end // o.page)
        low, high = (t[:, :, :pages].repeat_interleave(group, dim=1) for t in (self.low, self.high))
        bound = q.clamp(min=0) @ high.transpose(-1, -2) + q.clamp(max=0) @ low.transpose(-1, -2)  # (B, Hq, rows, nP)
        i, j = torch.arange(start, end)[:, None], torch.arange(end)[None, :]
        new = (j <= i) & ~always(j, i, o)  # (rows, end): the keys a page adds
        new_per_page = F.pad(new, (0, pages * o.page - end)).view(end - start, pages, o.page).sum(-1)
        chosen = pick_pages(bound, new_per_page, budget - always(j, i, o).sum(-1))  # (B, Hq, rows, nP)
        keys = chunk.to_blocks(chosen).repeat_interleave(o.page, dim=-1)[..., :end]  # (B, Hq, nb, qb, end)
        rows = chunk.positions()[..., None]
        return Reads(None, always(j, rows, o) | (keys & (j <= rows)), chunk)


def page_bounds(k: Tensor, page: int) -> tuple[Tensor, Tensor]:
    """(B, Hkv, nP, D) the elementwise min and max of each page of `page` keys."""
    b, h, n, d = k.shape
    pages = -(-n // page)
    k = k.float()
    low = F.pad(k, (0, 0, 0, pages * page - n), value=float("inf")).view(b, h, pages, page, d).amin(3)
    high = F.pad(k, (0, 0, 0, pages * page - n), value=float("-inf")).view(b, h, pages, page, d).amax(3)
    return low, high


def pick_pages(bound: Tensor, new_per_page: Tensor, budget: Tensor) -> Tensor:
    """(B, H, rows, nP) bool: per query, pages by decreasing bound while they fit its budget (a
    page counts the keys it adds, `new_per_page` (rows, nP); the last page is taken when at least
    half of it fits), pages adding nothing never taken."""
    new = new_per_page.expand_as(bound)
    bound = bound.masked_fill(new == 0, float("-inf"))
    order = bound.argsort(dim=-1, descending=True)
    added = new.gather(-1, order)
    before = added.cumsum(-1) - added
    take = (before + added / 2 < budget[..., None]) & (added > 0)
    return torch.zeros_like(take).scatter_(-1, order, take)


def selection(name: str, index, x: LayerInputs, opts: Options):
    """Method `name`'s selection for one layer's inputs."""
    if name == "saap":
        return saap_selection(index, x, opts)
    if name == "window":
        return WindowSelection(opts)
    if name == "quest":
        return QuestSelection(x, opts)
    if name == "kmeans_rope":
        return kmeans_rope_selection(x, opts)
    if name == "oracle":
        return OracleSelection(index, x, opts)
    if name == "oracle_keys":
        return OracleKeys(opts)
    raise ValueError(f"unknown method {name!r}; known: {', '.join(METHODS)}")


# --- attention with the methods ----------------------------------------------------------------

@dataclass
class LayerStats:
    """One method's sums over one layer's queries (every head, every row)."""

    read: int = 0  # causal query-key pairs read
    slots: int = 0  # pairs a block-sparse kernel computes (cluster methods; else = read)
    recall: float = 0.0  # summed attention-mass recall
    err2: float = 0.0  # squared L2 error of the attention output
    ref2: float = 0.0  # squared L2 of the dense output
    queries: int = 0
    causal: int = 0  # causal query-key pairs

    def summary(self) -> dict:
        return {"selectivity": self.read / self.causal, "kernel_selectivity": self.slots / self.causal,
                "recall": self.recall / self.queries, "rel_l2": (self.err2 / self.ref2) ** 0.5}


def dense_attention(x: LayerInputs) -> tuple[Tensor, Tensor]:
    """(output (B, Hq, L, D), log-sum-exp (B, Hq, L)) of causal attention (SDPA's CPU kernel)."""
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        x.q.float(), x.k_heads, x.v_heads, 0.0, True, scale=x.scale)[:2]
    return out, lse


def metric_attend(index, names: list[str], opts: Options, stats: dict):
    """Dense attention, and on the side each method's selection on the same inputs, its sums
    added to stats[name][layer] (its weights the dense ones: recall is their mass it reads)."""

    def attend(x: LayerInputs) -> Tensor:
        lq = x.q.shape[2]
        out, lse = dense_attention(x)
        selections = {name: selection(name, index, x, opts) for name in names}
        layer = {name: LayerStats() for name in names}
        for chunk in x.chunks(opts.query_block):
            rows_lse, ref = lse[:, :, chunk.start:chunk.end], out[:, :, chunk.start:chunk.end]
            saap = selections["saap"].reads(chunk, x, rows_lse, None)
            budget = saap.per_query()
            for name, chosen in selections.items():
                reads = saap if name == "saap" else chosen.reads(chunk, x, rows_lse, budget)
                approx, recall = attend_reads(x, reads, rows_lse)
                s = layer[name]
                s.read += int(reads.mask.sum())
                s.recall += recall.sum().item()
                s.err2 += (approx - ref).square().sum().item()
                s.ref2 += ref.square().sum().item()
                s.queries += recall.numel()
        causal = x.q.shape[0] * x.q.shape[1] * lq * (lq + 1) // 2
        for name, chosen in selections.items():
            s = layer[name]
            s.causal = causal
            s.slots = chosen.slots_read(lq) if isinstance(chosen, ClusterSelection) else s.read
            stats.setdefault(name, {}).setdefault(x.layer, []).append(s)
        return out

    return attend


def method_attend(index, name: str, opts: Options):
    """Attention with method `name`'s selection in the layer (its budget from SAAP's selection
    on the same inputs where it needs one)."""

    def attend(x: LayerInputs) -> Tensor:
        chosen = selection(name, index, x, opts)
        saap = chosen if name == "saap" else saap_selection(index, x, opts)
        lse = dense_attention(x)[1] if name.startswith("oracle") else None  # the oracles read the true weights
        out = torch.empty(x.q.shape, dtype=torch.float32)
        for chunk in x.chunks(opts.query_block):
            budget = None
            if name in ("window", "quest", "oracle_keys"):
                budget = saap.reads(chunk, x, None, None).per_query()
            rows_lse = None if lse is None else lse[:, :, chunk.start:chunk.end]
            reads = chosen.reads(chunk, x, rows_lse, budget)
            out[:, :, chunk.start:chunk.end] = attend_reads(x, reads)[0]
        return out

    return attend


# --- one length --------------------------------------------------------------------------------

@dataclass
class Scores:
    """Perplexity and pass-key sums of one method over the rows."""

    nll: float = 0.0
    tokens: int = 0
    passkey: list[bool] = field(default_factory=list)

    def add(self, scored: tuple[float, int, bool]) -> None:
        self.nll += scored[0]
        self.tokens += scored[1]
        self.passkey.append(scored[2])

    def summary(self) -> dict:
        return {"ppl": torch.tensor(self.nll / self.tokens).exp().item() if self.tokens else None,
                "passkey": sum(self.passkey) / len(self.passkey) if self.passkey else None,
                "passkey_rows": self.passkey}


def load_or_calibrate(model, tokenizer, args):
    """The index of `--index` if that file exists; else one calibrated on `calibration_rows`
    rows of the longest evaluated length (then saved to `--index` if given). One index serves
    every length: its keys are taken before RoPE, so where they sit does not change them."""
    if args.index and args.index.exists():
        index = SAAPIndex.load(args.index)
        return index, index.meta.get("calibrate_s", 0.0)
    seq_len = max(int(s) for s in args.seq_lens.split(","))
    began = time.perf_counter()
    rows = token_batches(tokenizer, seq_len=seq_len, sequences=args.calibration_rows)
    index = calibrate(model, rows, clusters=args.clusters, probes=args.probes,
                      classifier_steps=args.classifier_steps, model_name="smollm2-135m")
    index.meta["calibration_tokens"] = seq_len * args.calibration_rows
    index.meta["calibration_seq_len"] = seq_len
    index.meta["calibrate_s"] = time.perf_counter() - began
    if args.index:
        index.save(args.index)
    return index, index.meta["calibrate_s"]


def evaluate_length(model, tokenizer, index, seq_len: int, args) -> dict:
    opts = Options(args.sink, args.window, args.probes, args.query_block, args.page, index.shapes["clusters"],
                   args.block_probes)
    names = args.methods.split(",")
    skip = -(-index.meta["calibration_tokens"] // seq_len)  # rows after the calibration's text
    rows = passkey_rows(tokenizer, seq_len, [float(d) for d in args.depths.split(",")], skip=skip)
    router = Router(model, rows[0].tokens)
    stats: dict = {}
    scores = {name: Scores() for name in ["dense", *names]}
    timings: dict = {}
    for i, row in enumerate(rows):
        began = time.perf_counter()
        metrics = i < args.metric_rows
        attend = metric_attend(index, names, opts, stats) if metrics else (lambda x: dense_attention(x)[0])
        scores["dense"].add(score_row(router(row.tokens, attend), row))
        key = "dense_and_metrics" if metrics else "dense"
        timings[key] = timings.get(key, 0) + time.perf_counter() - began
    print(f"  dense: {scores['dense'].summary()} {timings}", flush=True)
    saap_through = None
    if not args.metrics_only:
        through_pass = saap_through_pass(model, index, seq_len, args) if args.saap_through == "pass" else None
        for name in names:
            began = time.perf_counter()
            for row in rows:
                logits = None
                if name == "saap" and through_pass is not None:
                    logits, saap_through = through_pass(row.tokens)
                if logits is None:
                    logits = router(row.tokens, method_attend(index, name, opts))
                    saap_through = saap_through or "routed"
                scores[name].add(score_row(logits, row))
            timings[name] = time.perf_counter() - began
            print(f"  {name}: {scores[name].summary()} in {timings[name]:.0f} s", flush=True)
    return summarize(seq_len, index, stats, scores, rows, timings, saap_through)


def saap_through_pass(model, index, seq_len: int, args):
    """A function of the tokens giving (logits of the model compiled with the saap pass, how),
    or (None, why) once the pass failed (the caller then routes SAAP's selection instead)."""
    saap_pass = SAAP(index, probes=args.probes, block_probes=args.block_probes, min_seq_len=min(seq_len, 1024), sink=args.sink, window=args.window,
                     query_block=args.query_block)
    torch._dynamo.reset()
    compiled = fvcompile.optimize(model, passes=[saap_pass], codegen=False)
    failed = []

    def run(tokens):
        if failed:
            return None, failed[0]
        try:
            with torch.no_grad():
                logits = compiled(tokens)
        except Exception as e:  # noqa: BLE001  (recorded in the results, SAAP then routed)
            failed.append(f"routed: the pass failed ({type(e).__name__}: {str(e).splitlines()[0]})")
            print(f"  saap: {failed[0]}", flush=True)
            return None, failed[0]
        return logits, f"pass ({compiled.fvcompile_report.rewritten('saap')} sites rewritten)"
    return run


def summarize(seq_len, index, stats, scores, rows, timings, saap_through) -> dict:
    """The length's record: per method, the per-layer metrics (summed over rows) and their mean
    over layers, perplexity and pass-key accuracy."""
    methods = {}
    dense = scores["dense"].summary()
    for name, per_layer in stats.items():
        layers = []
        for layer in sorted(per_layer):
            total = LayerStats()
            for s in per_layer[layer]:
                for key in vars(total):
                    setattr(total, key, getattr(total, key) + getattr(s, key))
            layers.append({"layer": layer, **total.summary()})
        mean = {key: statistics.mean(r[key] for r in layers) for key in layers[0] if key != "layer"}
        score = scores[name].summary()
        methods[name] = {**mean, **score, "ppl_change": score["ppl"] / dense["ppl"] - 1 if score["ppl"] else None,
                         "per_layer": layers}
    index_bytes = sum(t.numel() * t.element_size() for t in (index.centroids, index.weight, index.bias))
    shapes = index.shapes
    key_cache_bytes = shapes["layers"] * shapes["kv_heads"] * seq_len * shapes["head_dim"] * 4
    return {"seq_len": seq_len, "dense_ppl": dense["ppl"], "dense_passkey": dense["passkey"],
            "dense_passkey_rows": dense["passkey_rows"], "methods": methods,
            "passkeys": [{"key": r.key, "depth": r.depth} for r in rows],
            "index_bytes": index_bytes, "index_of_key_cache": index_bytes / key_cache_bytes,
            "timings_s": timings, "saap_through": saap_through}


def markdown(record: dict) -> str:
    a, meta = record["args"], record["index"]
    lines = [f"SAAP on SmolLM2-135M-Instruct (real weights), {record['date']}, {record['device']}, torch "
             f"{record['torch']}: {meta['shapes']['clusters']} clusters, {a['probes']} probes, query blocks of {a['query_block']} "
             f"reading {a.get('block_probes') or 'any number of'} clusters together, "
             f"sink {a['sink']}, window {a['window']}, Quest pages of {a['page']}. One index, calibrated on "
             f"{meta['calibration_sequences']} rows of {meta.get('calibration_seq_len')} tokens (Python standard "
             f"library sources, {record['calibrate_s'] / 60:.1f} min), evaluated at each length on the next rows, one "
             f"per pass-key depth ({a['depths']}); per-layer metrics on the first {a['metric_rows']} row(s), "
             f"perplexity (text tokens) and pass key on all. Keys read: the fraction of the causal query-key pairs "
             f"read, sink and window included; kernel: as a block-sparse kernel reads them (clusters padded to "
             f"whole key blocks, every listed block read whole).", "",
             "| tokens | method | keys read | kernel reads | attention-mass recall | rel. L2 (attn out) | ppl | "
             "change | pass key |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in record["results"]:
        lines.append(f"| {r['seq_len']} | dense | 100% | 100% | 1 | 0 | {_num(r['dense_ppl'])} | | "
                     f"{_frac(r['dense_passkey_rows'])} |")
        for name, m in r["methods"].items():
            change = f"{m['ppl_change']:+.2%}" if m["ppl_change"] is not None else ""
            lines.append(f"| {r['seq_len']} | {name} | {m['selectivity']:.1%} | {m['kernel_selectivity']:.1%} | "
                         f"{m['recall']:.3f} | {m['rel_l2']:.3f} | {_num(m['ppl'])} | {change} | "
                         f"{_frac(m['passkey_rows'])} |")
    lines += ["", "| tokens | SAAP index | of the key cache's bytes |", "|---:|---:|---:|"]
    for r in record["results"]:
        lines.append(f"| {r['seq_len']} | {r['index_bytes'] / 2**20:.2f} MiB | {r['index_of_key_cache']:.1%} |")
    return "\n".join(lines) + "\n"


def _num(x) -> str:
    return f"{x:.3f}" if x is not None else ""


def _frac(rows: list[bool]) -> str:
    return f"{sum(rows)}/{len(rows)}" if rows else ""


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_smollm2()
    index, calibrate_s = load_or_calibrate(model, tokenizer, args)
    print(f"index: {index.meta} ({calibrate_s:.0f} s)", flush=True)
    results = []
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H%M")
    for seq_len in (int(s) for s in args.seq_lens.split(",")):
        print(f"--- {seq_len} tokens", flush=True)
        results.append(evaluate_length(model, tokenizer, index, seq_len, args))
        r = results[-1]
        print(f"{seq_len} tokens: dense ppl {_num(r['dense_ppl'])}, pass key {_frac(r['dense_passkey_rows'])}", flush=True)
        for name, m in r["methods"].items():
            print(f"  {name}: keys read {m['selectivity']:.1%} (kernel {m['kernel_selectivity']:.1%}), recall "
                  f"{m['recall']:.3f}, rel. L2 {m['rel_l2']:.3f}, ppl {_num(m['ppl'])}, pass key "
                  f"{_frac(m['passkey_rows'])}", flush=True)
        record = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "device": "cpu", "torch": torch.__version__, "load_average": os.getloadavg(),
                  "args": vars(args) | {"out": str(args.out), "index": str(args.index)},
                  "index": index.meta | {"shapes": index.shapes}, "calibrate_s": calibrate_s, "results": results}
        table = markdown(record)
        if args.out:  # after each length: a run cut short keeps the lengths it finished
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / f"saap_eval_cpu_{stamp}.json").write_text(json.dumps(record, indent=1))
            (args.out / f"saap_eval_cpu_{stamp}.md").write_text(table)
    print("\n" + table)
    return record


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
