"""SAAP attention's speed on CPU against dense SDPA, at 8k-32k tokens, measured in one run.

    python bench/saap.py                                   # 8192,16384,32768 tokens
    python bench/saap.py --out bench/results/ --seq-lens 8192,16384,32768

The shapes are SmolLM2-135M's attention (9 query heads, 3 KV heads, head dim 64, fp32). Keys are
synthetic with cluster structure: each KV head's keys lie around `L / keys-per-cluster`
centroids, cluster sizes falling off as 1/sqrt(rank), so clusters are uneven as real ones are
(uneven clusters cost padding). The query classifiers are random, so each query block's union
is all of its `block_probes` clusters; what the kernels' time depends on is how many key blocks
each query block lists, which `selectivity` reports (query-slot pairs computed, padding and
masked slots included, over the causal pairs).

Rows per length, each the median of interleaved repeats:
- prefill: dense `scaled_dot_product_attention(is_causal=True)`; SAAP's kernel alone on a built
  layout (`sparse_attention`, FlexAttention compiled by Inductor); the whole op (key assignment,
  probing, layout, kernel), as the pass runs it;
- decode (one query over L keys): dense SDPA; SAAP's decode path (`decode_attention`: the read
  keys found from their clusters and gathered, no layout); the whole op as
  a static KV cache runs it (`saap_cache_attention`: the new key joins its cluster, the others'
  clusters kept from the prefill; probing, gathering, attention).
Times are per head (the call's time divided by the query heads).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fvcompile.kernels import saap_attention as saap_ops
from fvcompile.kernels.saap_attention import (KV_BLOCK, assign_keys, decode_attention, probe_clusters, register_tables,
                                             saap_attention, saap_read_mask, sparse_attention)
from fvcompile.kernels.saap_layout import build_blocks

Q_HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-lens", default="8192,16384,32768")
    p.add_argument("--keys-per-cluster", type=int, default=128, help="clusters = tokens / this")
    p.add_argument("--probe-fraction", type=float, default=0.05, help="clusters probed per query")
    p.add_argument("--block-probe-fraction", type=float, default=0.125,
                   help="clusters a block of queries reads together (the op's block_probes)")
    p.add_argument("--sink", type=int, default=4)
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--query-block", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path)
    return p.parse_args(argv)


def synthetic_inputs(seq_len: int, clusters: int, seed: int = 0) -> dict:
    """q, k, v (keys around per-head centroids, uneven cluster sizes) and a random index layer."""
    g = torch.Generator().manual_seed(seed)
    centroids = F.normalize(torch.randn(KV_HEADS, clusters, HEAD_DIM, generator=g), dim=-1)
    popularity = torch.arange(1, clusters + 1, dtype=torch.float) ** -0.5
    key_cluster = torch.multinomial(popularity, KV_HEADS * seq_len, replacement=True, generator=g).view(KV_HEADS, -1)
    k = centroids.gather(1, key_cluster[..., None].expand(-1, -1, HEAD_DIM)) * 4
    k = (k + torch.randn(k.shape, generator=g))[None]
    q = torch.randn(1, Q_HEADS, seq_len, HEAD_DIM, generator=g)
    v = torch.randn(1, KV_HEADS, seq_len, HEAD_DIM, generator=g)
    weight = torch.randn(Q_HEADS, HEAD_DIM, clusters, generator=g)
    return dict(q=q, k=k, v=v, centroids=centroids, weight=weight, bias=torch.zeros(Q_HEADS, clusters))


def select(inputs: dict, lq: int, probes: int, block_probes: int, args) -> tuple:
    """The keys' clusters and the clusters each of the last `lq` queries probes, as the op finds them."""
    key_cluster = assign_keys(inputs["centroids"], inputs["k"])
    probed = probe_clusters(inputs["weight"], inputs["bias"], inputs["q"][:, :, -lq:], probes,
                            query_block=args.query_block, block_probes=block_probes)
    return key_cluster, probed


def timed(fn) -> float:
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began


def measure_length(seq_len: int, args) -> dict:
    clusters = max(seq_len // args.keys_per_cluster, 2)
    probes = max(round(clusters * args.probe_fraction), 1)
    block_probes = min(max(round(clusters * args.block_probe_fraction), probes), clusters)
    inputs = synthetic_inputs(seq_len, clusters)
    register_tables(f"bench/{seq_len}", inputs["centroids"], inputs["weight"], inputs["bias"])
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    op_kwargs = dict(tables=f"bench/{seq_len}", probes=probes, block_probes=block_probes, sink=args.sink,
                     window=args.window, scale=HEAD_DIM ** -0.5, query_block=args.query_block)
    row = {"seq_len": seq_len, "clusters": clusters, "probes": probes, "block_probes": block_probes}
    for phase, lq in (("prefill", seq_len), ("decode", 1)):
        key_cluster, probed = select(inputs, lq, probes, block_probes, args)
        q_last = q[:, :, -lq:]
        if phase == "prefill":  # FlexAttention over the cluster layout's listed blocks
            blocks = build_blocks(key_cluster, probed, inputs["centroids"].shape[1], sink=args.sink,
                                  window=args.window, q_block=args.query_block, kv_block=KV_BLOCK)
            kernel = lambda: sparse_attention(q_last, k, v, blocks, sink=args.sink, window=args.window)  # noqa: E731
            computed = blocks.slots_read(lq)
            op = lambda: saap_attention(q_last, k, v, q_last, k, **op_kwargs)  # noqa: E731
        else:  # the read keys gathered, no layout
            kernel = lambda: decode_attention(q_last, k, v, key_cluster, probed, sink=args.sink,  # noqa: E731
                                              window=args.window)
            computed = int(saap_read_mask(key_cluster, probed, sink=args.sink, window=args.window).sum())
            # The op through a cache, its clusters as a prefill through the cache op leaves them.
            saap_ops._cache_clusters(op_kwargs["tables"], k)[:] = assign_keys(inputs["centroids"], k)
            visible = torch.zeros(1, 1, 1, seq_len)  # additive: every slot up to the query's
            op = lambda: saap_ops.saap_cache_attention(  # noqa: E731
                q_last, k, v, visible, q_last, k[:, :, -1:], torch.tensor([seq_len - 1]), k, min_seq_len=1,
                **op_kwargs)
        causal_pairs = Q_HEADS * sum(seq_len - lq + 1 + i for i in range(lq))
        variants = {
            "dense": lambda: F.scaled_dot_product_attention(q_last, k, v, is_causal=lq > 1, enable_gqa=True),
            "saap_kernel": kernel,
            "saap_op": op,
        }
        with torch.no_grad():
            for fn in variants.values():
                fn()  # compiles FlexAttention for this shape; warms the caches
            times = {name: [] for name in variants}
            for _ in range(args.repeats):
                for name, fn in variants.items():
                    times[name].append(timed(fn))
        per_head = {name: statistics.median(t) / Q_HEADS * 1e3 for name, t in times.items()}
        row[phase] = {"ms_per_head": per_head, "spread_ms_per_head": {
            name: (max(t) - min(t)) / Q_HEADS * 1e3 for name, t in times.items()},
            "selectivity": computed / causal_pairs,
            "kernel_speedup": per_head["dense"] / per_head["saap_kernel"],
            "op_speedup": per_head["dense"] / per_head["saap_op"]}
        print(f"{seq_len} {phase}: dense {per_head['dense']:.3f} ms/head, SAAP kernel {per_head['saap_kernel']:.3f} "
              f"({row[phase]['kernel_speedup']:.2f}x), op {per_head['saap_op']:.3f} ({row[phase]['op_speedup']:.2f}x); "
              f"slots computed {row[phase]['selectivity']:.1%} of causal", flush=True)
    return row


def markdown(record: dict) -> str:
    a = record["args"]
    lines = [f"SAAP attention on {record['device']} ({record['threads']} threads), {record['date']}, torch "
             f"{record['torch']}: {Q_HEADS} query / {KV_HEADS} KV heads, head dim {HEAD_DIM}, fp32; clusters = tokens / "
             f"{a['keys_per_cluster']}, {a['probe_fraction']:.0%} probed per query, {a['block_probe_fraction']:.1%} per block of "
             f"{a['query_block']} queries, sink "
             f"{a['sink']}, window {a['window']}, key blocks of {KV_BLOCK}; median of {a['repeats']} interleaved runs; "
             f"load average {record['load_average_1_5_15min']['before'][0]:.2f} before, "
             f"{record['load_average_1_5_15min']['after'][0]:.2f} after",
             "", "| tokens | phase | clusters (probed per query, block) | slots computed | dense ms/head | SAAP kernel ms/head | speedup | "
             "SAAP op ms/head | speedup |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in record["results"]:
        for phase in ("prefill", "decode"):
            p, t = r[phase], r[phase]["ms_per_head"]
            lines.append(f"| {r['seq_len']} | {phase} | {r['clusters']} ({r['probes']}, {r['block_probes']}) | {p['selectivity']:.1%} | "
                         f"{t['dense']:.3f} | {t['saap_kernel']:.3f} | {p['kernel_speedup']:.2f}x | {t['saap_op']:.3f} | "
                         f"{p['op_speedup']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    args = parse_args(argv)
    load_before = os.getloadavg()  # other work on the machine skews CPU timings: recorded beside them
    results = [measure_length(int(n), args) for n in args.seq_lens.split(",")]
    record = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "device": "cpu",
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              "load_average_1_5_15min": {"before": load_before, "after": os.getloadavg()},
              "args": vars(args) | {"out": str(args.out)}, "results": results}
    table = markdown(record)
    print("\n" + table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H%M")
        (args.out / f"saap_cpu_{stamp}.json").write_text(json.dumps(record, indent=1))
        (args.out / f"saap_cpu_{stamp}.md").write_text(table)
    return record


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
