"""`fvcompile bench`'s machinery, in seconds: one group of one tiny model measured end to end with
cheap stand-ins for Inductor's code generation, and the summary, attribution, comparison,
outputs and plots on synthetic records. The real suite is run by hand (bench/README.md)."""
import json
import tomllib
from pathlib import Path

import pytest
import torch

import fvcompile
import fvcompile.bench.runner as runner
from fvcompile.bench.compare import DifferentDevices, compare_records
from fvcompile.bench.grid import Settings, Variant
from fvcompile.bench.metrics import attribution_rows, geomean, summary_rows
from fvcompile.bench.outputs import to_markdown, write_all
from fvcompile.cli import main
from fvcompile.models.registry import ModelSpec

ROOT = Path(__file__).resolve().parents[2]


class BrokenMLP(torch.nn.Module):
    """Two linears with a graph break between them."""

    def __init__(self):
        super().__init__()
        self.up, self.down = torch.nn.Linear(16, 32), torch.nn.Linear(32, 16)

    def forward(self, x):
        h = self.up(x).relu()
        torch._dynamo.graph_break()
        return self.down(h)


SPEC = ModelSpec("broken-mlp", "test", "", BrokenMLP, lambda m, b: (torch.randn(b, 16),),
                 lambda m, batch: m(*batch).square().mean(), lambda m, b: (torch.randn(b, 16),))


def cheap_compile(model, variant: Variant):
    """Dynamo and AOTAutograd as the suite runs them, without Inductor's C++ build: "inductor" on
    Dynamo's eager backend, fvcompile with codegen=False (its passes still run); the sparse24
    set stands for a variant that fails to compile."""
    if variant.mode == "inductor":
        return torch.compile(model, backend="eager")
    if variant.mode == "fvcompile":
        if variant.passes == ("sparse24",):
            raise RuntimeError("boom while compiling")
        return fvcompile.optimize(model, passes=variant.pass_argument(), codegen=False)
    return model


def test_one_group_end_to_end(monkeypatch):
    """Every metric of a cell is measured, a failing variant is a row, and the pass that rewrote
    something is ablated in the same run."""
    monkeypatch.setattr(runner, "compile_variant", cheap_compile)
    settings = Settings(rounds=2, iters=1, warmup=0, cold="in-process",
                        pass_sets=(("fp8_dense",), ("sparse24",)))
    cells = {(c.variant, c.ablation_of): c for c in runner.bench_model("broken-mlp", "infer", settings, spec=SPEC)}
    assert list(cells) == [("eager", ""), ("inductor", ""), ("fvcompile[fp8_dense]", ""),
                           ("fvcompile[sparse24]", ""), ("fvcompile[none]", "fp8_dense")]

    eager, inductor, fp8, broken, without = cells.values()
    assert eager.status == inductor.status == without.status == "ok"
    assert fp8.status == "approximate" and "fp8_dense" in fp8.reason and fp8.rewritten["fp8_dense"] > 0
    assert broken.status == "compile_error" and broken.reason == "RuntimeError: boom while compiling"
    for c in (inductor, fp8, without):
        assert len(c.round_ms) == 2 and c.speedup > 0 and c.speedup_vs_inductor > 0
        assert c.speedup_lo <= c.speedup <= c.speedup_hi
        assert c.compile_cold_s > 0 and c.compile_warm_s > 0 and c.cold_in == "in-process"
        assert c.memory_ratio > 0 and c.peak_mb > 0
        assert c.graph_breaks == 1 and c.recompilations == 0
    assert eager.speedup == 1.0 and eager.graph_breaks == 0

    rows = attribution_rows([c.to_dict() for c in cells.values()])
    assert [(r["pass_set"], r["pass"], r["status"]) for r in rows] == [("fp8_dense", "fp8_dense", "ok")]
    assert rows[0]["speedup"] > 0 and rows[0]["rewritten"] == fp8.rewritten["fp8_dense"]


def cell(model, variant, speedup, status="ok", task="infer", **extra):
    """A synthetic cell: `speedup` against eager, with a 2% spread; eager and Inductor alike."""
    base = {"model": model, "task": task, "variant": variant, "mode": variant.split("[")[0],
            "passes": variant[len("fvcompile["):-1] if variant.startswith("fvcompile") else "",
            "ablation_of": "", "left_out": "", "status": status, "reason": "" if status == "ok" else "it broke",
            "round_ms": [10 / speedup] * 3, "speedup": speedup, "speedup_lo": speedup * 0.98,
            "speedup_hi": speedup * 1.02, "speedup_vs_inductor": speedup, "speedup_vs_inductor_lo": speedup * 0.98,
            "speedup_vs_inductor_hi": speedup * 1.02, "compile_cold_s": 10.0, "compile_warm_s": 1.0,
            "peak_mb": 4.0, "memory_ratio": 1.0, "graph_breaks": 0, "recompilations": 0, "rewritten": {}}
    return {**base, **extra}


def record(cells, device="CPU test x2", torch_version="2.13.0"):
    return {"device": device, "date": "2026-12-07T00:00:00Z", "results": cells, "settings": {"rounds": 5},
            "environment": {"device": device, "device_type": "cpu", "versions": {"torch": torch_version}},
            "summary": summary_rows(cells), "attribution": attribution_rows(cells)}


RUN = [cell("a", "eager", 1.0), cell("a", "inductor", 2.0), cell("a", "fvcompile[sparse24]", 4.0,
                                                                    rewritten={"sparse24": 3}),
       cell("a", "fvcompile[none]", 2.0, ablation_of="sparse24", left_out="sparse24"),
       cell("b", "eager", 1.0), cell("b", "inductor", 8.0), cell("b", "fvcompile[sparse24]", 1.0, status="mismatch")]


def test_summary_is_geometric_means_and_pass_rate():
    rows = {r["variant"]: r for r in summary_rows(RUN)}
    assert set(rows) == {"eager", "inductor", "fvcompile[sparse24]"}  # the ablation is no summary row
    assert rows["inductor"]["speedup"] == pytest.approx(4.0)  # sqrt(2 * 8)
    assert rows["fvcompile[sparse24]"]["pass_rate"] == 0.5 and rows["fvcompile[sparse24]"]["speedup"] == 4.0
    assert rows["fvcompile[sparse24]"]["failures"] == ["mismatch"]
    assert geomean([None, 0.0, float("nan")]) is None
    (row,) = attribution_rows(RUN)
    assert row["pass"] == "sparse24" and row["rewritten"] == 3 and row["speedup"] == pytest.approx(2.0)


def test_compare_reports_beyond_noise_and_refuses_another_device():
    new = [dict(c) for c in RUN]
    new[1] = cell("a", "inductor", 2.02)  # within noise
    new[2] = cell("a", "fvcompile[sparse24]", 3.0, rewritten={"sparse24": 3})  # -25%: a regression
    new[6] = cell("b", "fvcompile[sparse24]", 1.2)  # mismatch -> ok: an improvement
    comparison = compare_records(record(RUN), record(new, torch_version="2.14.0"))
    assert comparison.notes == ["warning: different torch: 2.13.0 (old) vs 2.14.0 (new)"]
    assert [(c.cell, c.metric) for c in comparison.regressions] == [
        ("a infer fvcompile[sparse24]", "speedup"), ("a infer fvcompile[sparse24]", "speedup_vs_inductor")]
    assert [(c.cell, c.metric) for c in comparison.improvements] == [("b infer fvcompile[sparse24]", "status")]
    with pytest.raises(DifferentDevices, match="different devices: CPU test x2 \\(old\\) vs H100"):
        compare_records(record(RUN), record(new, device="H100"))


def test_outputs_and_plots_are_written(tmp_path):
    rec = record(RUN)
    written = write_all(rec, tmp_path, "run")
    names = sorted(p.name for p in written)
    assert names == ["compile_time.png", "memory.png", "passes.png", "run.csv", "run.json", "run.md", "speedup.png"]
    assert all(p.stat().st_size > 0 for p in written)
    assert "| infer | inductor | 2/2 | 4.00x |" in to_markdown(rec)


def test_compare_on_the_command_line(tmp_path, capsys):
    old, new = tmp_path / "old.json", tmp_path / "new.json"
    old.write_text(json.dumps(record(RUN)))
    new.write_text(json.dumps(record(RUN, device="H100")))
    assert main(["bench", "--compare", str(old), str(new)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "different devices" in err and "--force" in err
    assert main(["bench", "--compare", str(old), str(new), "--force"]) == 0
    out = capsys.readouterr().out
    assert "warning: the runs are of different devices" in out and "0 regression(s), 0 improvement(s)" in out


def test_micro_benchmarks_stay_out_of_the_default_run():
    """`make test` collects tests/ only: the kernel micro-benchmarks (bench/micro) run by hand."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert config["tool"]["pytest"]["ini_options"]["testpaths"] == ["tests"]
    assert list((ROOT / "bench" / "micro").glob("test_*.py"))
