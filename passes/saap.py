"""saap: causal attentions rewritten into Self-Attention with Asymmetric Partitions (arXiv 2502.08246).

At each attention of an inference graph (`saap_match`: SDPA's backend op, causal, no mask, its
query and key before RoPE found) whose keys number at least `min_seq_len`, the pass puts
`fvcompile::saap_attention` in the op's place: keys join their nearest centroid, each query's
classifier picks `probes` clusters, and the query reads those clusters, the first `sink` keys and
the last `window` keys up to itself. The kernels take queries in blocks of `query_block`: each
block loads the key blocks of the clusters any of its queries probes, and each query reads its own
(per-query probing, the paper's: queries of a block probing alike cost far more quality,
bench/README.md). The layer of an attention is
its order in the graph; the index (`saap_calibration.calibrate`) holds one set of centroids and
classifiers per layer, and an index whose layers, heads or head size differ from the graph's
is an error that names them. Decoding with a static KV cache (masked
attention over the cache buffers, `saap_match.CacheWrite`) becomes `fvcompile::saap_cache_attention`:
each step's keys join their clusters, kept beside the cache, and the step reads as above once
`min_seq_len` slots are filled. Shorter sequences, other masked or non-causal attention and
attention without a found RoPE stay dense, each reported with its reason. Approximate: it runs only when
named, `fvcompile.optimize(model, passes=[SAAP(index=...)])`.
"""
from __future__ import annotations

import operator
from pathlib import Path

import torch
from torch import fx

from fvcompile.kernels import saap_attention, saap_layout, saap_triton
from fvcompile.kernels.saap_attention import register_tables
from fvcompile.passes import saap_index, saap_match
from fvcompile.passes.base import GraphPass, PassContext, PassResult, Site
from fvcompile.passes.saap_calibration import calibrate  # noqa: F401  (the index's maker, beside the pass)
from fvcompile.passes.saap_index import SAAPIndex
from fvcompile.passes.saap_match import find_attention_sites

SAAP_OP = torch.ops.fvcompile.saap_attention.default
SAAP_CACHE_OP = torch.ops.fvcompile.saap_cache_attention.default


class SAAP(GraphPass):
    """index: a `SAAPIndex` or the path of one; probes: clusters each query reads (None: the
    index's); block_probes: clusters a block of `query_block` queries reads together, each query
    its best `probes` of them (None: no cap, each query its own best anywhere); min_seq_len: fewer
    keys stay dense; sink, window: keys always read; query_block: the queries a kernel takes
    together (it loads each key block once for all of them)."""

    name = "saap"
    hook = "post_grad"
    exact = False
    helpers = (saap_index, saap_match, saap_attention, saap_layout, saap_triton)

    def __init__(self, index: SAAPIndex | str | Path, *, probes: int | None = None, block_probes: int | None = None,
                 min_seq_len: int = 1024, sink: int = 4, window: int = 64, query_block: int = 64):
        self.index = index if isinstance(index, SAAPIndex) else SAAPIndex.load(index)
        clusters = self.index.shapes["clusters"]
        self.probes = self.index.meta.get("probes") if probes is None else probes
        if not isinstance(self.probes, int) or not 0 < self.probes <= clusters:
            raise ValueError(f"probes must be an int in 1..{clusters} (the index's clusters), got {self.probes!r}")
        self.block_probes = clusters if block_probes is None else block_probes
        if not isinstance(self.block_probes, int) or not self.probes <= self.block_probes <= clusters:
            raise ValueError(f"block_probes must be an int in {self.probes}..{clusters} (probes to the index's "
                             f"clusters), got {block_probes!r}")
        for option, value, least in (("min_seq_len", min_seq_len, 1), ("sink", sink, 0), ("window", window, 1),
                                     ("query_block", query_block, 1)):
            if not isinstance(value, int) or value < least:
                raise ValueError(f"{option} must be an int >= {least}, got {value!r}")
        self.min_seq_len, self.sink, self.window, self.query_block = min_seq_len, sink, window, query_block
        self.digest = self.index.digest()  # here: the pass runs under the graph's fake mode
        for layer in range(self.index.shapes["layers"]):  # the op finds its layer's tables by key
            register_tables(self._tables_key(layer), self.index.centroids[layer], self.index.weight[layer],
                            self.index.bias[layer])

    def options(self):
        return {"index": self.digest, "probes": self.probes, "block_probes": self.block_probes, "min_seq_len": self.min_seq_len,
                "sink": self.sink, "window": self.window, "query_block": self.query_block}

    def applies_to(self, ctx: PassContext) -> bool:
        return ctx.is_inference  # prefill and decode: no backward through the selection

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        sites = find_attention_sites(gm.graph)
        result = PassResult()
        if not sites:
            return result
        q, k = sites[0].q.meta["val"], sites[0].k.meta["val"]
        self.index.check_fits(layers=len(sites), q_heads=q.shape[1], kv_heads=k.shape[1], head_dim=q.shape[-1])
        for site in sites:
            why = self._dense_reason(site)
            if why:
                result.skipped.append(Site(site.node.name, detail=f"layer {site.layer}: stays dense: {why[1]}",
                                           kind="attention", reason=why[0]))
                continue
            op = self._rewrite(gm, site)
            clusters = self.index.shapes["clusters"]
            reads = (f"layer {site.layer}: {self.probes} of {clusters} key clusters per query, {self.block_probes} "
                     f"per block of {self.query_block}, plus {self.sink} sink and {self.window} window keys")
            if site.key_cache is None:
                keys = site.k.meta["val"].shape[-2]
                reads += f", over {keys} keys: ~{self._expected_read(site):.0%} of the causal keys read if clusters are even"
            else:
                reads += (f", over a KV cache: each step's keys join their clusters; dense while under "
                          f"min_seq_len={self.min_seq_len} keys are filled or rows are padded")
            result.rewritten.append(Site(site.node.name, kind="attention", ops={str(op): 1}, detail=reads))
        return result

    def _dense_reason(self, site) -> tuple[str, str] | None:
        keys = site.k.meta["val"].shape[-2]
        cached = site.key_cache is not None and site.value_cache is not None and site.has_mask and not site.is_causal
        if not cached and keys < self.min_seq_len:
            return "short", f"{keys} keys, below min_seq_len={self.min_seq_len}"
        if not cached and (site.has_mask or not _reads_a_causal_prefix(site)):
            return "not_causal", ("SAAP serves causal attention without a mask (queries at the last positions: "
                                  "is_causal with as many queries as keys, or one query reading every key), or a "
                                  "static KV cache's masked attention")
        if site.pre_rope_key is None or site.pre_rope_query is None:
            return "no_rope", site.reason or "no half-split RoPE found on the query"
        q = site.q.meta["val"]
        if q.is_cuda and (q.shape[-1] < saap_triton.DOT_MIN or not _power_of_two(self.query_block, saap_triton.DOT_MIN)):
            return "kernel_shape", (f"the Triton kernels need a head dim >= {saap_triton.DOT_MIN} and query_block a "
                                    f"power of 2 >= {saap_triton.DOT_MIN}: head dim {q.shape[-1]}, query_block "
                                    f"{self.query_block}")
        users = {u.args[1] for u in site.node.users if u.target is operator.getitem}
        if users - {0} or len(users) != len(site.node.users):
            return "uses_more_outputs", "the graph reads more of the attention op than its output"
        return None

    def _expected_read(self, site) -> float:
        """The fraction of causal keys a query reads on average with clusters of equal size (the
        measured fraction depends on the data: bench/saap_eval.py)."""
        queries, keys = site.q.meta["val"].shape[-2], site.k.meta["val"].shape[-2]
        share = self.probes / self.index.shapes["clusters"]
        causal = [keys - queries + 1 + i for i in range(queries)]
        read = [min(n, self.sink + self.window + share * max(n - self.sink - self.window, 0)) for n in causal]
        return sum(read) / sum(causal)

    def _rewrite(self, gm: fx.GraphModule, site):
        """Put the op in the site's place; return the op."""
        graph = gm.graph
        scale = site.scale if site.scale is not None else site.q.meta["val"].shape[-1] ** -0.5
        kwargs = {"tables": self._tables_key(site.layer), "probes": self.probes, "block_probes": self.block_probes,
                  "sink": self.sink, "window": self.window, "scale": float(scale), "query_block": self.query_block}
        if site.key_cache is None:
            op, args = SAAP_OP, (site.q, site.k, site.v, site.pre_rope_query, site.pre_rope_key)
        else:
            op, kwargs = SAAP_CACHE_OP, {**kwargs, "min_seq_len": self.min_seq_len}
            args = (site.q, site.k, site.v, site.mask, site.pre_rope_query, site.pre_rope_key, site.key_cache.slots,
                    site.key_cache.buffer)
        with graph.inserting_before(site.node):
            new = graph.call_function(op, args, kwargs)
        (out,) = site.node.users
        new.meta["val"] = out.meta["val"]
        out.replace_all_uses_with(new)
        graph.erase_node(out)
        graph.erase_node(site.node)
        return op

    def _tables_key(self, layer: int) -> str:
        return f"{self.digest}/{layer}"


def _reads_a_causal_prefix(site) -> bool:
    """Each query reads the keys up to its own position, the queries being the last ones: SDPA's
    is_causal aligns queries to the first keys, which is that only when there are as many; one
    query without is_causal (decode) reads every key."""
    queries, keys = site.q.meta["val"].shape[-2], site.k.meta["val"].shape[-2]
    return queries == keys if site.is_causal else queries == 1


def _power_of_two(n: int, least: int) -> bool:
    return n >= least and n & (n - 1) == 0
