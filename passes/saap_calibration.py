"""SAAP calibration: a model's own keys and queries, from real text, fitted into a `SAAPIndex`.

The model is traced to an ATen graph (`make_fx`, one trace per input shape) and its attentions
found by the same matcher the pass uses (`saap_match`); the traced graph is then changed to
return, for every layer, the query and key before RoPE and after it, and run on each batch.
Per layer and head the index clusters the pre-RoPE keys and trains the query classifiers on the
true attention (post-RoPE, causal, GQA) of the same sequences (`saap_index.fit_layer`).
"""
from __future__ import annotations

import torch
from rich.progress import track
from torch import Tensor, nn
from torch.fx.experimental.proxy_tensor import make_fx

from fvcompile.kernels.saap_attention import attention_weights
from fvcompile.passes.saap_index import SAAPIndex, fit_layer
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
    per_layer: list[list[tuple]] = []  # per layer: (keys, queries, attention maker) per sequence
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
            per_layer[i] += [(k_pre[b], q_pre[b], _attention_of(q[b:b + 1], k[b:b + 1], scale))
                             for b in range(q.shape[0])]
    fits = [fit_layer(sequences, clusters, iters=iters, classifier_steps=classifier_steps, seed=i)
            for i, sequences in enumerate(track(per_layer, description="SAAP: fitting layers", disable=not progress))]
    meta = {"model": model_name, "probes": probes, "iters": iters, "classifier_steps": classifier_steps,
            "calibration_sequences": len(per_layer[0]), "query": "before RoPE"}
    return SAAPIndex.from_layers(fits, meta)


def tap_module(model: nn.Module, example: Tensor):
    """A callable that runs `model`'s traced graph on an input of `example`'s shape and returns,
    per attention layer, (query before RoPE, key before RoPE, query, key, value, scale)."""
    with torch.no_grad():
        gm = make_fx(model)(example)
    sites = find_attention_sites(gm.graph)
    if not sites:
        raise ValueError("SAAP calibration found no attention (scaled_dot_product_attention) in the model")
    missing = [f"layer {s.layer}: {s.reason}" for s in sites if s.pre_rope_key is None or s.pre_rope_query is None]
    if missing:
        raise ValueError("SAAP calibration needs each attention's query and key before RoPE; " + "; ".join(missing))
    causal = [s.layer for s in sites if not s.is_causal or s.has_mask]
    if causal:
        raise ValueError(f"SAAP is for causal attention without a mask; layers {causal} are not")
    output = next(iter(gm.graph.find_nodes(op="output")))
    output.args = (tuple(n for s in sites for n in (s.pre_rope_query, s.pre_rope_key, s.q, s.k, s.v)),)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    scales = [s.scale for s in sites]

    def run(batch: Tensor):
        flat = gm(batch)
        return [(*flat[5 * i:5 * i + 5], scales[i]) for i in range(len(sites))]
    return run


def _attention_of(q: Tensor, k: Tensor, scale: float | None):
    """A function making one sequence's (Hq, L, L) weights when the fit needs them (held, the
    weights of every layer and sequence would not fit in memory at long lengths)."""
    return lambda: causal_attention(q, k, scale)[0]


def causal_attention(q: Tensor, k: Tensor, scale: float | None) -> Tensor:
    """(B, Hq, L, L) softmax weights of q (B, Hq, L, D) over k (B, Hkv, L, D), causal, GQA."""
    causal = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
    return attention_weights(q, k, causal, scale)
