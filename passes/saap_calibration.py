"""SAAP calibration: a model's own keys and queries, from real text, fitted into a `SAAPIndex`.

The model is traced to an ATen graph (`make_fx`, one trace per input shape) and its attentions
found by the same matcher the pass uses (`saap_match`); the traced graph is then changed to
return, for every layer, the query and key before RoPE and after it, and run on each batch.
Per layer and head the index clusters the pre-RoPE keys and trains the query classifiers on the
true attention (post-RoPE, causal, GQA) of the same sequences (`saap_index.fit_layer`).

Memory: the taps of every layer and sequence are held until that layer is fitted (then freed);
the attention weights never are: each sequence's cluster masses are made a block of query rows
at a time (`cluster_mass_rows`), so a layer's fit holds (Hq, rows, L) weights, not (Hq, L, L).
"""
from __future__ import annotations

import torch
from rich.progress import track
from torch import Tensor, nn
from torch.fx.experimental.proxy_tensor import make_fx

from fvcompile.kernels.saap_attention import attention_weights
from fvcompile.passes.saap_index import SAAPIndex, cluster_mass, fit_layer
from fvcompile.passes.saap_match import find_attention_sites


def calibrate(model: nn.Module, batches: list[Tensor], *, clusters: int, probes: int, iters: int = 25,
              classifier_steps: int = 200, model_name: str | None = None, progress: bool = True) -> SAAPIndex:
    """A SAAP index for `model` from `batches` (each a model input, e.g. (B, L) token ids).

    clusters: key clusters per layer and KV head; probes: the clusters a query reads by default
    (recorded in the index, the pass's default); iters: k-means iterations; classifier_steps:
    Adam steps per query classifier."""
    if not batches:
        raise ValueError("calibrate needs at least one batch of calibration inputs")
    if not 0 < probes <= clusters:
        raise ValueError(f"probes must be in 1..clusters ({clusters}), got {probes}")
    per_layer: list[list[tuple]] = []  # per layer: (keys, queries, cluster-mass maker) per sequence
    taps: dict[tuple, object] = {}  # input shape -> tap_module's callable
    for batch in track(batches, description="SAAP: collecting keys and queries", disable=not progress):
        shape = tuple(batch.shape)
        if shape not in taps:
            taps[shape] = tap_module(model, batch)
        with torch.no_grad():
            layers = taps[shape](batch)
        for i, (q_pre, k_pre, q, k, _, scale) in enumerate(layers):
            if len(per_layer) <= i:
                per_layer.append([])
            per_layer[i] += [(k_pre[b], q_pre[b], _mass_of(q[b:b + 1], k[b:b + 1], scale))
                             for b in range(q.shape[0])]
        del layers
    taps.clear()
    sequences = len(per_layer[0])
    fits = []
    for i in track(range(len(per_layer)), description="SAAP: fitting layers", disable=not progress):
        layer, per_layer[i] = per_layer[i], None  # freed once fitted
        fits.append(fit_layer(layer, clusters, iters=iters, classifier_steps=classifier_steps, seed=i))
        del layer
    meta = {"model": model_name, "probes": probes, "iters": iters, "classifier_steps": classifier_steps,
            "calibration_sequences": sequences, "query": "before RoPE"}
    return SAAPIndex.from_layers(fits, meta)


def tap_module(model: nn.Module, example: Tensor):
    """A callable that runs `model`'s traced graph on an input of `example`'s shape and returns,
    per attention layer, (query before RoPE, key before RoPE, query, key, value, scale)."""
    gm, sites = attention_graph(model, example)
    output = next(iter(gm.graph.find_nodes(op="output")))
    output.args = (tuple(n for s in sites for n in (s.pre_rope_query, s.pre_rope_key, s.q, s.k, s.v)),)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    scales = [s.scale for s in sites]

    def run(batch: Tensor):
        flat = gm(batch)
        return [(*flat[5 * i:5 * i + 5], scales[i]) for i in range(len(sites))]
    return run


def attention_graph(model: nn.Module, example: Tensor):
    """(`model` traced to an ATen graph for inputs of `example`'s shape, its attention sites in
    layer order), each site a causal attention without a mask whose query and key before RoPE
    were found; otherwise a ValueError says which layer is not. Traced on fake tensors: tracing
    does not run the model."""
    with torch.no_grad():
        gm = make_fx(model, tracing_mode="fake", _allow_non_fake_inputs=True)(example)
    sites = find_attention_sites(gm.graph)
    if not sites:
        raise ValueError("SAAP calibration found no attention (scaled_dot_product_attention) in the model")
    missing = [f"layer {s.layer}: {s.reason}" for s in sites if s.pre_rope_key is None or s.pre_rope_query is None]
    if missing:
        raise ValueError("SAAP calibration needs each attention's query and key before RoPE; " + "; ".join(missing))
    causal = [s.layer for s in sites if not s.is_causal or s.has_mask]
    if causal:
        raise ValueError(f"SAAP is for causal attention without a mask; layers {causal} are not")
    return gm, sites


def _mass_of(q: Tensor, k: Tensor, scale: float | None):
    """The cluster-mass maker of one sequence (`fit_layer`'s function form)."""
    return lambda key_cluster, clusters: cluster_mass_rows(q, k, scale, key_cluster[None], clusters)[0]


# The most bytes of attention weights one block of query rows may hold (rows * keys * heads * 4).
ROW_BLOCK_BYTES = 128 * 2**20


def causal_attention(q: Tensor, k: Tensor, scale: float | None) -> Tensor:
    """(B, Hq, L, L) softmax weights of q (B, Hq, L, D) over k (B, Hkv, L, D), causal, GQA."""
    return causal_attention_rows(q, k, scale, 0, q.shape[2])


def causal_attention_rows(q: Tensor, k: Tensor, scale: float | None, start: int, end: int) -> Tensor:
    """(B, Hq, end - start, end): the causal softmax weights of the queries at positions
    [start, end) over the keys before `end` (the later keys have no weight), q and k as
    `causal_attention` takes them (prefill: Lq == Lk)."""
    pos = torch.arange(start, end, device=q.device)[:, None]
    causal = torch.arange(end, device=q.device)[None, :] <= pos
    return attention_weights(q[:, :, start:end], k[:, :, :end], causal, scale)


def row_blocks(q: Tensor, max_bytes: int = ROW_BLOCK_BYTES):
    """[start, end) blocks of query rows whose (B, Hq, rows, L) fp32 weights stay under max_bytes."""
    b, hq, lq = q.shape[:3]
    rows = max(1, max_bytes // (4 * b * hq * lq))
    return [(start, min(start + rows, lq)) for start in range(0, lq, rows)]


def cluster_mass_rows(q: Tensor, k: Tensor, scale: float | None, key_cluster: Tensor, clusters: int, *,
                      max_bytes: int = ROW_BLOCK_BYTES) -> Tensor:
    """(B, Hq, L, clusters): each query's causal attention mass in each key cluster (key_cluster
    (B, Hq, L), the cluster of each key for each query head), made a block of query rows at a time
    (`row_blocks`), never holding (Hq, L, L) weights."""
    out = []
    for start, end in row_blocks(q, max_bytes):
        weights = causal_attention_rows(q, k, scale, start, end)
        out.append(cluster_mass(weights, key_cluster[..., :end], clusters))
    return torch.cat(out, dim=2)
