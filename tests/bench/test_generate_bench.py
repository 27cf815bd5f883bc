"""bench/generate.py end to end on a tiny Llama, with its uncompiled levers (the compiled steps are
tested in tests/fvcompile/test_generate.py): each lever decodes the eager row's tokens, and the record
and table say what did not run."""
import importlib.util
import json
import os
import sys
from pathlib import Path

import fvcompile

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "generate.py"


def load_script():
    spec = importlib.util.spec_from_file_location("bench_generate", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_the_lever_table_on_a_tiny_llama(tmp_path, capsys):
    fvcompile.reset()
    bench = load_script()
    assert bench.main(["--model", "llama-tiny", "--max-new-tokens", "4", "--rounds", "2", "--levers", "eager,sdpa,cache",
                       "--no-profile", "--no-sparse24", "--warm-cache", "--out", str(tmp_path)]) == 0
    fvcompile.reset()
    assert "fvcompile-generate-bench-" not in os.environ.get("TORCHINDUCTOR_CACHE_DIR", "")  # --warm-cache: ours kept
    [record_file] = tmp_path.glob("generate_cpu_*_llama-tiny.json")
    rows = {row["lever"]: row for row in json.loads(record_file.read_text())["rows"]}
    measured = [row for row in rows.values() if "skipped" not in row]
    assert len(measured) == 3 and all(row["same_tokens_as_first_row"] for row in measured)
    assert all(row["tokens_per_s"] > 0 and row["peak_mib"] > 0 and len(row["tokens_per_s_rounds"]) == 2
               for row in measured)
    assert rows["+ static KV cache, compiled"]["skipped"] == "not run (--levers)"
    table = record_file.with_suffix(".md").read_text()
    assert "| + static KV cache (eager) |" in table
    assert "torch 2." in capsys.readouterr().out  # the device and versions, printed first
