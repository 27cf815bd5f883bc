import json

import pytest

from fvcompile.cli import main


@pytest.mark.parametrize("argv", [["--help"], ["models", "--help"], ["bench", "--help"], ["inspect", "--help"]])
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
    assert main(["bench", "--models", "llama-tiny", "--modes", "eager", "--iters", "2", "--warmup", "0",
                 "--json", str(out_file)]) == 0
    data = json.loads(out_file.read_text())
    assert data["device"].startswith("CPU") and len(data["results"]) == 2
    assert "eager" in capsys.readouterr().out


def test_inspect_without_codegen(tmp_path):
    assert main(["inspect", "llama-tiny", "--out", str(tmp_path), "--no-codegen"]) == 0
    files = [f for fs in json.loads((tmp_path / "index.json").read_text())["graphs"].values() for f in fs]
    # No pass applies ("auto" on CPU), and the IR at every hook is still there to read.
    assert any(f.endswith("joint_at_joint_hook.py") for f in files)
    assert any(f.endswith("backward_at_post_grad_hook.py") for f in files)


def test_error_is_one_line_without_traceback(tmp_path, capsys):
    assert main(["inspect", "no-such-model", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown model 'no-such-model'" in err and "Traceback" not in err


def test_bench_rejects_unknown_pass(capsys):
    assert main(["bench", "--passes", "nope"]) == 1
    assert "unknown pass 'nope'" in capsys.readouterr().err
