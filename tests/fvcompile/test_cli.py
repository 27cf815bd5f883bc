import json
from pathlib import Path

import pytest

from fvcompile.cli import main


@pytest.mark.parametrize("argv", [["--help"], ["models", "--help"], ["bench", "--help"], ["inspect", "--help"],
                                  ["generate", "--help"]])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    assert "usage: fvcompile" in capsys.readouterr().out


def test_models_lists_parameter_counts(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "llama3-8b" in out and "8,030,261,248" in out


def test_bench_eager_writes_json(tmp_path, capsys):
    out_file = tmp_path / "bench.json"
    assert main(["bench", "--models", "llama-tiny", "--modes", "eager", "--rounds", "1", "--iters", "2",
                 "--warmup", "0", "--json", str(out_file)]) == 0
    data = json.loads(out_file.read_text())
    assert data["device"].startswith("CPU") and len(data["results"]) == 2
    assert "eager" in capsys.readouterr().out


def test_inspect_without_codegen(tmp_path, capsys):
    assert main(["inspect", "llama-tiny", "--out", str(tmp_path), "--no-codegen"]) == 0
    files = [f for fs in json.loads((tmp_path / "index.json").read_text())["graphs"].values() for f in fs]
    # No pass applies ("auto" on CPU), and the IR at every hook is still there to read.
    assert any(f.endswith("joint_at_joint_hook.py") for f in files)
    assert any(f.endswith("backward_at_post_grad_hook.py") for f in files)
    capsys.readouterr()

    # The same dump read back later lists every file it indexed.
    assert main(["inspect", "--from", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "single process" in out and all(Path(f).name in out for f in files)


def test_error_is_one_line_without_traceback(tmp_path, capsys):
    assert main(["inspect", "no-such-model", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown model 'no-such-model'" in err and "Traceback" not in err


def test_bench_rejects_unknown_pass(capsys):
    with pytest.raises(SystemExit) as e:  # argparse's usage error, while parsing
        main(["bench", "--passes", "nope"])
    assert e.value.code == 2
    assert "argument --passes: unknown pass 'nope'" in capsys.readouterr().err


def test_bench_rejects_unknown_task_and_mode(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--task", "inference", "--modes", "eager", "--iters", "1"])
    assert "argument --task: unknown task 'inference'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "--task", "infer", "--modes", "eagr", "--iters", "1"])
    assert "argument --modes: unknown mode 'eagr'" in capsys.readouterr().err


def test_bench_checks_json_path_before_the_run(tmp_path, capsys, monkeypatch):
    """An unwritable --json path is refused before the first model runs: the run's results
    are never lost to a path found bad at its end."""
    import fvcompile.bench

    runs = []
    monkeypatch.setattr(fvcompile.bench, "bench_model", lambda *args, **kwargs: runs.append(args) or [])
    with pytest.raises(SystemExit) as e:
        main(["bench", "--modes", "eager", "--json", str(tmp_path / "missing" / "out.json")])
    assert e.value.code == 2 and runs == []
    assert "argument --json: folder" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--iters", "--batch-size"])
def test_bench_refuses_zero_before_the_run(flag, capsys, monkeypatch):
    import fvcompile.bench

    runs = []
    monkeypatch.setattr(fvcompile.bench, "bench_model", lambda *args, **kwargs: runs.append(args) or [])
    with pytest.raises(SystemExit) as e:
        main(["bench", "--modes", "eager", flag, "0"])
    assert e.value.code == 2 and runs == []
    assert f"argument {flag}: expected a whole number >= 1, got '0'" in capsys.readouterr().err


def test_error_raised_while_compiling_is_one_line(tmp_path, capsys):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    assert main(["inspect", "llama-tiny", "--out", str(not_a_dir), "--no-codegen", "--task", "infer"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Error" in err and "TORCHDYNAMO_VERBOSE" not in err, err


def test_inspect_infer_shows_the_eval_mode_graph(tmp_path, monkeypatch):
    """`inspect --task infer` dumps the graph `bench` times: the model in eval mode."""
    import torch

    import fvcompile.models.registry
    from fvcompile.models.registry import ModelSpec

    class Dropper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.drop = torch.nn.Linear(4, 4), torch.nn.Dropout(0.5)

        def forward(self, x):
            return self.drop(self.lin(x))

    spec = ModelSpec("dropper", "test", "", Dropper, lambda m, b: (torch.randn(b, 4),),
                     lambda m, batch: m(*batch).sum(), lambda m, b: (torch.randn(b, 4),))
    monkeypatch.setattr(fvcompile.models.registry, "get", lambda name: spec)
    assert main(["inspect", "dropper", "--out", str(tmp_path), "--no-codegen", "--task", "infer"]) == 0
    inference = next(tmp_path.rglob("*inference_at_post_grad_hook.py")).read_text()
    assert "linear" in inference or "addmm" in inference
    assert "rand" not in inference and "bernoulli" not in inference


def test_generate_prints_the_new_tokens_and_their_rate(capsys):
    import torch

    from fvcompile.generation.loading import load_model
    from fvcompile.models.llama import generate_greedy

    assert main(["generate", "llama-tiny", "--prompt-ids", "1,2,3", "--max-new-tokens", "4", "--no-compile"]) == 0
    out = capsys.readouterr().out
    model, _ = load_model("llama-tiny")  # the same seeded weights
    expected = generate_greedy(model, torch.tensor([[1, 2, 3]]), 4)[0, 3:].tolist()
    assert f"new token ids: {expected}" in out
    assert "4 new tokens in 4 forwards: time to first token" in out and "tokens/s (eager, static KV cache)" in out


def test_generate_text_on_a_model_without_tokenizer_says_use_ids(capsys):
    assert main(["generate", "llama-tiny", "--prompt", "hello", "--no-compile"]) == 1
    err = capsys.readouterr().err
    assert "llama-tiny has no tokenizer" in err and "--prompt-ids" in err


def test_generate_refuses_top_k_when_greedy_before_loading(capsys, monkeypatch):
    import fvcompile.generation.loading as loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(SystemExit) as e:
        main(["generate", "llama-tiny", "--prompt-ids", "1", "--top-k", "5"])
    assert e.value.code == 2 and "give --temperature > 0" in capsys.readouterr().err


def test_generate_profile_prints_the_breakdown_and_writes_the_plot(tmp_path, capsys):
    plot = tmp_path / "decode.png"
    assert main(["generate", "llama-tiny", "--prompt-ids", "1,2,3", "--max-new-tokens", "2", "--no-compile",
                 "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert all(part in out for part in ("attention", "FFN linears", "other linears", "host", "step without profiler"))
    assert plot.stat().st_size > 0
