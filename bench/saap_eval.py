"""SAAP on a real pretrained model: SmolLM2-135M on real text, against dense attention.

    python bench/saap_eval.py                              # 2048 tokens, 64 clusters, 4 probes
    python bench/saap_eval.py --out bench/results/         # run times: bench/README.md

The index is calibrated on rows of the Python standard library's sources (`fvcompile/text.py`)
at the evaluated length; the evaluation reads the rows after them (text the index never saw).
For each length it measures, in one run:
- perplexity of the model compiled with the saap pass (`fvcompile.optimize(codegen=False)`: the
  post-grad graph run as FX code, the same numbers as Inductor's, without its compile time)
  against the same model dense;
- per layer, from the attention's own inputs (`saap_calibration.tap_module`): the selectivity
  (the fraction of the causal keys a query reads, sink and window included; the index's bytes
  beside), the attention-mass recall (the true attention's mass on the keys read), and the
  relative L2 error of the attention output against dense.
Still to come (issue #18): the pass-key test, the baselines (sink and window only, Quest's page
bounds, k-means on RoPE'd keys, the oracle) at the same budget, 8k tokens.
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import fvcompile
from fvcompile.kernels.saap_attention import (assign_keys, probe_clusters, saap_attention_reference, saap_read_mask,
                                              selectivity)
from fvcompile.models.gguf_loader import load_smollm2
from fvcompile.passes.saap import SAAP
from fvcompile.passes.saap_calibration import calibrate, causal_attention, tap_module
from fvcompile.text import token_batches


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-lens", default="2048", help="comma-separated token counts")
    p.add_argument("--clusters", type=int, default=64)
    p.add_argument("--probes", type=int, default=4)
    p.add_argument("--sink", type=int, default=4)
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--calibration-rows", type=int, default=4)
    p.add_argument("--eval-rows", type=int, default=2)
    p.add_argument("--classifier-steps", type=int, default=200)
    p.add_argument("--out", type=Path, help="write saap_eval_cpu_<stamp>.json and .md here")
    return p.parse_args(argv)


def next_token_nll(logits: torch.Tensor, tokens: torch.Tensor) -> float:
    """Mean negative log-likelihood of each next token (its exp is the perplexity)."""
    return F.cross_entropy(logits[0, :-1].float(), tokens[0, 1:]).item()


def layer_metrics(index, taps, probes: int, sink: int, window: int) -> list[dict]:
    """Per layer: selectivity, attention-mass recall and the output's relative L2 error."""
    out = []
    for layer, (q_pre, k_pre, q, k, v, scale) in enumerate(taps):
        key_cluster = assign_keys(index.centroids[layer], k_pre)
        probed = probe_clusters(index.weight[layer], index.bias[layer], q_pre, probes)
        mask = saap_read_mask(key_cluster, probed, sink=sink, window=window)
        weights = causal_attention(q, k, scale)  # (1, Hq, L, L)
        recall = (weights * mask).sum(-1).mean().item()
        group = q.shape[1] // k.shape[1]
        dense = weights @ v.float().repeat_interleave(group, dim=1)
        approx = saap_attention_reference(q, k, v, key_cluster, probed, sink=sink, window=window, scale=scale).float()
        out.append({"layer": layer, "selectivity": selectivity(mask), "recall": recall,
                    "rel_l2": ((approx - dense).norm() / dense.norm()).item()})
    return out


def evaluate_length(model, tokenizer, seq_len: int, args) -> dict:
    began = time.perf_counter()
    calibration = token_batches(tokenizer, seq_len=seq_len, sequences=args.calibration_rows)
    index = calibrate(model, calibration, clusters=args.clusters, probes=args.probes,
                      classifier_steps=args.classifier_steps, model_name="smollm2-135m")
    calibrate_s = time.perf_counter() - began
    rows = token_batches(tokenizer, seq_len=seq_len, sequences=args.eval_rows, skip=args.calibration_rows)
    saap = SAAP(index, probes=args.probes, min_seq_len=min(seq_len, 1024), sink=args.sink, window=args.window)
    torch._dynamo.reset()
    compiled = fvcompile.optimize(model, passes=[saap], codegen=False)
    taps = tap_module(model, rows[0])
    dense_nll, saap_nll, layers = [], [], []
    with torch.no_grad():
        for row in rows:
            dense_nll.append(next_token_nll(model(row), row))
            saap_nll.append(next_token_nll(compiled(row), row))
            layers.append(layer_metrics(index, taps(row), args.probes, args.sink, args.window))
    per_layer = [{key: statistics.mean(r[i][key] for r in layers) for key in layers[0][i]} for i in range(len(layers[0]))]
    dense_ppl, saap_ppl = torch.tensor(dense_nll).mean().exp().item(), torch.tensor(saap_nll).mean().exp().item()
    index_bytes = sum(t.numel() * t.element_size() for t in (index.centroids, index.weight, index.bias))
    return {
        "seq_len": seq_len, "dense_ppl": dense_ppl, "saap_ppl": saap_ppl, "ppl_change": saap_ppl / dense_ppl - 1,
        "selectivity": statistics.mean(r["selectivity"] for r in per_layer),
        "recall": statistics.mean(r["recall"] for r in per_layer),
        "rel_l2": statistics.mean(r["rel_l2"] for r in per_layer),
        "index_bytes": index_bytes, "calibrate_s": calibrate_s, "per_layer": per_layer,
        "rewritten_layers": compiled.fvcompile_report.rewritten("saap"),
    }


def markdown(record: dict) -> str:
    a = record["args"]
    lines = [f"SAAP on SmolLM2-135M-Instruct (real weights), {record['date']}, {record['device']}, torch "
             f"{record['torch']}: {a['clusters']} clusters, {a['probes']} probes, sink {a['sink']}, window "
             f"{a['window']}; calibrated on {a['calibration_rows']} rows, evaluated on the next {a['eval_rows']} "
             f"(Python standard library sources)", "",
             "| tokens | dense ppl | SAAP ppl | change | keys read | attention-mass recall | rel. L2 (attn out) | index |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in record["results"]:
        lines.append(f"| {r['seq_len']} | {r['dense_ppl']:.3f} | {r['saap_ppl']:.3f} | {r['ppl_change']:+.2%} | "
                     f"{r['selectivity']:.1%} | {r['recall']:.3f} | {r['rel_l2']:.3f} | {r['index_bytes'] / 2**20:.2f} MiB |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    args = parse_args(argv)
    model, tokenizer = load_smollm2()
    results = []
    for seq_len in (int(s) for s in args.seq_lens.split(",")):
        print(f"--- {seq_len} tokens", flush=True)
        results.append(evaluate_length(model, tokenizer, seq_len, args))
        r = results[-1]
        print(f"{seq_len} tokens: ppl {r['dense_ppl']:.3f} dense, {r['saap_ppl']:.3f} SAAP ({r['ppl_change']:+.2%}); "
              f"keys read {r['selectivity']:.1%}, recall {r['recall']:.3f}, rel. L2 {r['rel_l2']:.3f}", flush=True)
    record = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "device": "cpu", "torch": torch.__version__, "args": vars(args) | {"out": str(args.out)},
              "results": results}
    table = markdown(record)
    print("\n" + table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H%M")
        (args.out / f"saap_eval_cpu_{stamp}.json").write_text(json.dumps(record, indent=1))
        (args.out / f"saap_eval_cpu_{stamp}.md").write_text(table)
    return record


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
