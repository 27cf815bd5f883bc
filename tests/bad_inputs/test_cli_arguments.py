"""Bad command lines for `fvcompile bench` and `inspect`: each refused while parsing, before any
model is built or compiled, with a message naming the argument and what it allows (issue #16)."""
import os
import re
import tempfile

import pytest

import fvcompile.bench
from fvcompile.cli import main


@pytest.fixture
def no_work(monkeypatch):
    """bench_model and optimize fail the test if reached: a bad argument must stop the run first."""
    def called(*args, **kwargs):
        raise AssertionError("work started before the arguments were checked")

    monkeypatch.setattr(fvcompile.bench, "bench_model", called)
    monkeypatch.setattr(fvcompile, "optimize", called)


def unwritable_folder(tmp_path):
    """A folder this process cannot create files in: a read-only one, or /sys when we are root."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    for candidate in (folder, "/sys"):
        try:
            with tempfile.NamedTemporaryFile(dir=candidate):
                pass
        except OSError:
            return str(candidate)
    pytest.skip("no folder here refuses this process's writes")


# (arguments after the command, the argument named, what the message says is allowed)
BENCH_CASES = {
    "iters 0": (["--iters", "0"], "--iters", "expected a whole number >= 1, got '0'"),
    "iters negative": (["--iters", "-3"], "--iters", "expected a whole number >= 1, got '-3'"),
    "iters fraction": (["--iters", "2.5"], "--iters", "expected a whole number >= 1, got '2.5'"),
    "iters word": (["--iters", "many"], "--iters", "expected a whole number >= 1"),
    "warmup negative": (["--warmup", "-1"], "--warmup", "expected a whole number >= 0, got '-1'"),
    "batch-size 0": (["--batch-size", "0"], "--batch-size", "expected a whole number >= 1, got '0'"),
    "unknown model": (["--models", "llama-tiny,nope"], "--models",
                      "unknown model 'nope'; known models: .*llama-tiny.*see `fvcompile models`"),
    "no model": (["--models", ","], "--models", "give at least one model"),
    "unknown task": (["--task", "inference"], "--task",
                     "unknown task 'inference': choose from infer, train"),
    "unknown mode": (["--modes", "eager,eagr"], "--modes",
                     "unknown mode 'eagr': choose from eager, inductor, fvcompile"),
    "unknown pass": (["--passes", "nope"], "--passes", "unknown pass 'nope'.*sparse24"),
    "device typo": (["--device", "cpux"], "--device", "expected cpu, cuda or cuda:N, got 'cpux'"),
    "device kind": (["--device", "meta"], "--device", "expected cpu, cuda or cuda:N, got 'meta'"),
    "dtype": (["--dtype", "int8"], "--dtype", "invalid choice: 'int8' \\(choose from 'float32'"),
    "json in a missing folder": (["--json", "{tmp}/no-such-folder/out.json"], "--json",
                                 "folder .*no-such-folder does not exist: create it first, or give "
                                 "a file path in an existing folder you can write"),
    "json is a folder": (["--json", "{tmp}"], "--json", "is a folder, not a file"),
    "json under a file": (["--json", "{tmp}/a-file/out.json"], "--json", "a-file does not exist"),
    "json in a read-only folder": (["--json", "{unwritable}/out.json"], "--json",
                                   "cannot write into folder .* give a file path in an existing "
                                   "folder you can write"),
}


@pytest.mark.parametrize("case", BENCH_CASES)
def test_bench_refuses_before_any_work(case, tmp_path, capsys, no_work):
    argv, argument, allowed = BENCH_CASES[case]
    (tmp_path / "a-file").write_text("")
    unwritable = unwritable_folder(tmp_path) if "{unwritable}" in " ".join(argv) else ""
    argv = [a.format(tmp=tmp_path, unwritable=unwritable) for a in argv]
    with pytest.raises(SystemExit) as e:
        main(["bench", "--modes", "eager", "--iters", "1", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"fvcompile bench: error: argument {argument}: " in err, err
    assert re.search(allowed, err), err


def test_bench_refuses_cuda_without_a_gpu(capsys, no_work):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit) as e:
        main(["bench", "--device", "cuda"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "argument --device: 'cuda': this machine has no CUDA device" in err and "use --device cpu" in err


def test_inspect_refuses_batch_size_0(tmp_path, capsys, no_work):
    with pytest.raises(SystemExit) as e:
        main(["inspect", "llama-tiny", "--out", str(tmp_path), "--batch-size", "0"])
    assert e.value.code == 2
    assert "argument --batch-size: expected a whole number >= 1, got '0'" in capsys.readouterr().err


def test_bench_json_is_writable_after_the_check(tmp_path, monkeypatch):
    """A good --json path passes the check, which leaves nothing behind, and gets the results."""
    monkeypatch.setattr(fvcompile.bench, "bench_model", lambda *args, **kwargs: [])
    out = tmp_path / "results.json"
    assert main(["bench", "--modes", "eager", "--json", str(out)]) == 0
    assert sorted(os.listdir(tmp_path)) == ["results.json"]
