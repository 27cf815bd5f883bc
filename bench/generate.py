"""Generation's levers one at a time (issue #21, after arXiv 2410.00215 and gpt-fast), and where a
decode step's time goes, measured in one run on the same prompts.

    python bench/generate.py                                       # smollm2-135m, 64 new tokens
    python bench/generate.py --model llama-tiny --max-new-tokens 16 --rounds 1
    python bench/generate.py --out bench/results/                  # JSON, markdown and a plot

Each lever adds one thing to the row above it:
- eager: the model's plain forward over the whole sequence at every token (no KV cache), with
  attention as separate matmuls and softmax (SDPA held to its math backend);
- SDPA: the same with the fused attention kernel;
- compiled: the same forward through `fvcompile.optimize` (sequence length dynamic);
- static KV cache: `fvcompile.generate(compile=False)`, a preallocated cache, one token per forward;
- static KV cache, compiled: `fvcompile.generate`: prefill and a decode step compiled once;
- CUDA graphs: the decode step as a CUDA graph (`mode="reduce-overhead"`), GPU only;
- prompt lookup: drafts looked up in the context, checked k at a time (greedy output kept).
Then sparse24 on a Squared-ReLU Llama of the model's shape (random weights), against the same
model without it, and saap on a long prompt (the compiled cached decoder without and with it).
Every row reports decode tokens per second (after the first token, all prompts together), time
to first token (mean over prompts), peak memory, the compile time of its warm-up, and whether
its tokens equal its group's first row's (eager; the Squared-ReLU model without sparse24). Peak
memory is measured in a run of its own: what the lever allocates beyond the weights, its static
KV cache included. Rounds are interleaved (every lever once per round) and the median round is
reported; compiles happen in a warm-up before the first round (for the cached levers a whole
untimed run), in a fresh Inductor cache unless --warm-cache (so its time is a cold compile's).
The characterization profiles the decode step eager and compiled
(fvcompile/generation/profile.py) and plots it.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import fvcompile
from fvcompile.bench.env import environment
from fvcompile.bench.measure import peak_step_bytes, sync
from fvcompile.generation.loading import load_model
from fvcompile.generation.prompts import prompt_batch

PROMPTS = [
    "The capital of France is",
    # Text that the answer quotes: what prompt lookup is for.
    "Here is a list of fruits: apple, banana, cherry, grape, lemon, mango, orange, peach, pear, plum.\n"
    "Repeat the list exactly: apple, banana,",
]
TINY_PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9, 10, 11, 12, 7, 8, 9]]
# --levers keys, in the table's order
LEVERS = ("eager", "sdpa", "compiled", "cache", "cache-compiled", "cuda-graphs", "prompt-lookup")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="a llama or chameleon registry decoder")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (median reported)")
    p.add_argument("--batch-size", type=int, default=1, help="copies of each prompt decoded together")
    p.add_argument("--prompt-lookup", type=int, default=8, metavar="K", help="draft tokens per check")
    p.add_argument("--device", default="cpu")
    p.add_argument("--levers", default=",".join(LEVERS), help=f"comma-separated, of {','.join(LEVERS)} (default all)")
    p.add_argument("--no-profile", action="store_true", help="skip the decode-step characterization")
    p.add_argument("--no-sparse24", action="store_true", help="skip the Squared-ReLU model's rows")
    p.add_argument("--no-saap", action="store_true", help="skip the long prompt's rows (saap)")
    p.add_argument("--saap-prompt-tokens", type=int, default=4096, help="the long prompt's length, for saap")
    p.add_argument("--saap-index", type=Path, help="load this SAAP index if it exists, else save the calibrated one")
    p.add_argument("--no-codegen", action="store_true",
                   help="compile the same graphs without Inductor's code generation (a quick check of the script)")
    p.add_argument("--warm-cache", action="store_true",
                   help="compile with Inductor's usual cache (default: a fresh one, so that warm-up times are cold "
                        "compiles)")
    p.add_argument("--out", type=Path, help="write generate_<device>_<date>.json/.md/.png here")
    return p.parse_args(argv)


@dataclasses.dataclass
class Run:
    """One lever on every prompt, once."""

    tokens: list  # per prompt: the new tokens of its first row
    new_tokens: int  # after the first token, all prompts and rows
    decode_s: float
    ttft_s: list  # per prompt


def no_cache_decode(forward, tokens: torch.Tensor, max_new_tokens: int):
    """Greedy decoding that runs the whole sequence at every token: (new tokens, ttft, decode_s)."""
    device = tokens.device
    start = time.perf_counter()
    new = []
    with torch.no_grad():
        for i in range(max_new_tokens):
            torch._dynamo.maybe_mark_dynamic(tokens, 1)  # one compiled graph for every length
            token = forward(tokens)[:, -1].argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, token], dim=1)
            new.append(token)
            if i == 0:
                sync(device)
                first = time.perf_counter() - start
    sync(device)
    return torch.cat(new, dim=1), first, time.perf_counter() - start - first


def no_cache_lever(forward, math_attention: bool):
    def run(model, batch, n):
        if math_attention:
            with sdpa_kernel(SDPBackend.MATH):
                return no_cache_decode(forward, batch.tokens, n)
        return no_cache_decode(forward, batch.tokens, n)
    return run


def generate_lever(**settings):
    def run(model, batch, n):
        out = fvcompile.generate(model, batch.tokens, max_new_tokens=n, **settings)
        return out.new_tokens, out.time_to_first_token_s, out.decode_s
    run.uses_cache = True
    return run


def run_lever(run, model, batches, n, device) -> Run:
    tokens, ttft, decode_s, counted = [], [], 0.0, 0
    for batch in batches:
        new, first, rest = run(model, batch, n)
        tokens.append(new[0].tolist())
        ttft.append(first)
        decode_s += rest
        counted += new.shape[0] * (new.shape[1] - 1)
    return Run(tokens, counted, decode_s, ttft)


def peak_mib(run, model, batches, n, device) -> float:
    """Peak memory of one lever on every prompt, in a run of its own, plus the static KV cache it
    keeps between calls (allocated before)."""
    from fvcompile.generate import _caches

    peak = peak_step_bytes(lambda: run_lever(run, model, batches, n, device), device)
    cache = _caches.get(model) if getattr(run, "uses_cache", False) else None
    held = sum(b.numel() * b.element_size() for b in cache.buffers()) if cache is not None else 0
    return (peak + held) / 2**20


def levers(model, device: torch.device, args, cache_len: int) -> dict:
    """name -> run function, or the reason the lever does not run here."""
    cached = dict(cache_len=cache_len, codegen=not args.no_codegen)
    make = {
        "eager": ("eager (no KV cache, math attention)", lambda: no_cache_lever(model, math_attention=True)),
        "sdpa": ("+ SDPA (fused attention)", lambda: no_cache_lever(model, math_attention=False)),
        "compiled": ("+ compiled (no KV cache)", lambda: no_cache_lever(
            fvcompile.optimize(model, codegen=not args.no_codegen), math_attention=False)),
        "cache": ("+ static KV cache (eager)", lambda: generate_lever(compile=False, **cached)),
        "cache-compiled": ("+ static KV cache, compiled", lambda: generate_lever(
            mode="default" if device.type == "cuda" else None, **cached)),
        "cuda-graphs": ("+ CUDA graphs", lambda: generate_lever(mode="reduce-overhead", **cached)
                        if device.type == "cuda" else "n/a: CUDA graphs need a GPU"),
        "prompt-lookup": (f"+ prompt lookup (k={args.prompt_lookup})", lambda: generate_lever(
            prompt_lookup=args.prompt_lookup, **cached) if args.batch_size == 1
            else "n/a: prompt lookup decodes one prompt at a time"),
    }
    chosen = args.levers.split(",")
    return {name: build() if key in chosen else "not run (--levers)" for key, (name, build) in make.items()}


def measure(model, batches, named: dict, args, device) -> list[dict]:
    """Warm up (compile) each lever, then time `rounds` interleaved rounds; rows in order."""
    rows = {name: {"lever": name} for name in named}
    runnable = {name: run for name, run in named.items() if callable(run)}
    for name, reason in named.items():
        if not callable(reason):
            rows[name]["skipped"] = reason
    for name, run in runnable.items():
        print(f"warm-up: {name}", flush=True)
        start = time.perf_counter()
        if getattr(run, "uses_cache", False):  # a whole run: prompt lookup compiles its verify step at a draft
            run_lever(run, model, batches, args.max_new_tokens, device)
        else:  # the first call compiles (the length is dynamic from there); a whole run would take minutes
            run_lever(run, model, batches[:1], min(args.max_new_tokens, 4), device)
        rows[name]["warmup_s"] = time.perf_counter() - start
    runs = {name: [] for name in runnable}
    for r in range(args.rounds):
        for name, run in runnable.items():
            runs[name].append(run_lever(run, model, batches, args.max_new_tokens, device))
            print(f"round {r + 1}: {name}: {runs[name][-1].new_tokens / runs[name][-1].decode_s:.1f} tokens/s",
                  flush=True)
    reference = None
    for name, done in runs.items():
        median = sorted(done, key=lambda x: x.new_tokens / x.decode_s)[len(done) // 2]
        reference = reference or median.tokens
        rows[name].update(
            tokens_per_s=median.new_tokens / median.decode_s,
            tokens_per_s_rounds=[x.new_tokens / x.decode_s for x in done],
            time_to_first_token_ms=1e3 * statistics.mean(median.ttft_s),
            peak_mib=peak_mib(runnable[name], model, batches, args.max_new_tokens, device),
            same_tokens_as_first_row=median.tokens == reference,
            first_difference=_first_difference(median.tokens, reference),
            tokens=median.tokens,
        )
    return list(rows.values())


def _first_difference(tokens, reference):
    for p, (a, b) in enumerate(zip(tokens, reference)):
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return {"prompt": p, "token": i}
    return None


def sparse24_rows(model, batches, args, device, cache_len: int) -> list[dict]:
    """sparse24 on a Squared-ReLU Llama of the model's shape, against the same model without it."""
    from fvcompile.models.llama import Llama, LlamaConfig

    if not isinstance(model.cfg, LlamaConfig):
        return [{"lever": "sparse24", "skipped": f"n/a: the Squared-ReLU variant is a Llama's ({args.model} is not)"}]
    cfg = dataclasses.replace(model.cfg, ffn="relu2", tie_embeddings=False)
    torch.manual_seed(0)
    relu2 = Llama(cfg).to(device).eval()
    cached = dict(cache_len=cache_len, codegen=not args.no_codegen)
    named = {"Squared-ReLU Llama, static KV cache, compiled": generate_lever(**cached),
             "+ sparse24": generate_lever(passes=["sparse24"], **cached)}
    rows = measure(relu2, batches, named, args, device)
    # The pass's report from a compile of its own without code generation: the timed steps may
    # have come from Inductor's cache, where no pass runs, and their report would say only that.
    report = fvcompile.generate(relu2, batches[0].tokens, max_new_tokens=2, passes=["sparse24"], cache_len=cache_len,
                                codegen=False).reports["decode"]
    notes = sorted({note for run in report.pass_runs("sparse24") for note in run.result.notes})
    rows[-1]["pass_report"] = report.summary() + (f" ({'; '.join(notes)})" if notes else "")
    return rows


def saap_rows(model, tokenizer, args, device) -> list[dict]:
    """saap on a long prompt (`--saap-prompt-tokens` of the standard library's sources, one row),
    the compiled static-cache decoder without and with it; the index is calibrated on the two
    rows of text before the prompt (or loaded from `--saap-index`)."""
    from fvcompile.passes.saap import SAAP, SAAPIndex, calibrate
    from fvcompile.text import token_batches

    if tokenizer is None:
        return [{"lever": "saap (long prompt)", "skipped": f"n/a: the long prompt is text; {args.model} has no tokenizer"}]
    n = args.saap_prompt_tokens
    if args.saap_index and args.saap_index.exists():
        index = SAAPIndex.load(args.saap_index)
    else:
        index = calibrate(model, token_batches(tokenizer, seq_len=n, sequences=2), clusters=64, probes=4,
                          model_name=args.model)
        if args.saap_index:
            index.save(args.saap_index)
    prompt = token_batches(tokenizer, seq_len=n, sequences=1, skip=2)[0]
    batches = [prompt_batch(prompt.repeat(args.batch_size, 1), tokenizer, device)]
    cached = dict(cache_len=n + args.max_new_tokens + 1, codegen=not args.no_codegen)
    return measure(model, batches, {f"long prompt ({n} tokens), static KV cache, compiled": generate_lever(**cached),
                                    "+ saap": generate_lever(passes=[SAAP(index)], **cached)}, args, device)


def characterization(model, batches, args) -> list:
    from fvcompile.generation.profile import profile_variants

    return profile_variants(model, prompt_len=batches[0].longest, batch_size=args.batch_size, steps=16)


def table_markdown(rows: list[dict]) -> str:
    lines = ["| lever | tokens/s | time to first token | peak memory | warm-up (compile) | same tokens as its group's first row |",
             "|---|---:|---:|---:|---:|---|"]
    for row in rows:
        if "skipped" in row:
            lines.append(f"| {row['lever']} | {row['skipped']} | | | | |")
            continue
        same = "yes" if row["same_tokens_as_first_row"] else (
            f"no (prompt {row['first_difference']['prompt']}, token {row['first_difference']['token']})")
        lines.append(f"| {row['lever']} | {row['tokens_per_s']:.1f} | {row['time_to_first_token_ms']:.1f} ms | "
                     f"{row['peak_mib']:.3g} MiB | {row['warmup_s']:.1f} s | {same} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    unknown = set(args.levers.split(",")) - set(LEVERS)
    if unknown:
        raise SystemExit(f"unknown lever(s) {', '.join(sorted(unknown))}: --levers takes {','.join(LEVERS)}")
    device = torch.device(args.device)
    if not args.warm_cache:  # read by Inductor at each compile
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="fvcompile-generate-bench-")
    env = environment(args.device)
    print(f"{env['device']} | torch {env['versions']['torch']} | {env['date']} | load {env['load_average']}")
    model, tokenizer = load_model(args.model, args.device)
    prompts = PROMPTS if tokenizer is not None else TINY_PROMPTS
    batches = [prompt_batch([p] * args.batch_size, tokenizer, device) for p in prompts]
    longest = max(b.longest for b in batches)
    # One cache length for every cached lever and prompt: each compiled step keeps its shapes.
    cache_len = min(longest + args.max_new_tokens + args.prompt_lookup + 1, model.cfg.max_seq_len)
    rows = measure(model, batches, levers(model, device, args, cache_len), args, device)
    if not args.no_sparse24:
        rows += sparse24_rows(model, batches, args, device, cache_len)
    if not args.no_saap:
        rows += saap_rows(model, tokenizer, args, device)
    profiles = [] if args.no_profile else characterization(model, batches, args)
    record = {"script": "bench/generate.py", "model": args.model, "environment": env,
              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "prompts": [b.rows[0] for b in batches], "cache_len": cache_len, "rows": rows,
              "profiles": [p.to_dict() for p in profiles],
              "anchors": "not run: Hugging Face transformers and llama-cpp-python anchors are not part of this script yet"}
    text = render(record, profiles)
    print(text)
    if args.out:
        write(record, text, profiles, args.out, device)
    return 0


def render(record: dict, profiles: list) -> str:
    env = record["environment"]
    parts = [f"# Generation levers: {record['model']}, {record['settings']['max_new_tokens']} new tokens, "
             f"batch {record['settings']['batch_size']}",
             f"{env['device']}; torch {env['versions']['torch']}; {env['date']}; load average {env['load_average']}",
             "", table_markdown(record["rows"])]
    for row in record["rows"]:
        if row.get("pass_report"):
            parts += ["", f"sparse24's report (decode step): {row['pass_report']}"]
    if profiles:
        from fvcompile.generation.profile import markdown

        parts += ["", "## Decode step: where the time goes", "", markdown(profiles)]
    return "\n".join(parts)


def write(record: dict, text: str, profiles: list, out: Path, device: torch.device) -> None:
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H%M")
    kind = "cpu" if device.type == "cpu" else torch.cuda.get_device_name(device).split()[-1].lower()
    stem = out / f"generate_{kind}_{stamp}_{record['model']}"
    stem.with_suffix(".json").write_text(json.dumps(record, indent=2, default=str))
    stem.with_suffix(".md").write_text(text + "\n")
    if profiles:
        from fvcompile.generation.profile import write_plot

        write_plot(profiles, stem.with_suffix(".png"), title=f"{record['model']}: decode step")
    print(f"wrote {stem}.json, .md" + (", .png" if profiles else ""))


if __name__ == "__main__":
    sys.exit(main())
