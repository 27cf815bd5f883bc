"""Defects a sweep of bad inputs and edge cases found (issue #16), each held fixed."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from toy_passes import Mlp, ReluToClampPass

import fvcompile
from fvcompile.verify import VerificationError


def test_a_class_is_refused_and_left_unpatched():
    with pytest.raises(TypeError, match=r"got an nn.Module class \(Mlp\), not a model: build one first"):
        fvcompile.optimize(Mlp, passes=[ReluToClampPass()])
    assert "_compiled_call_impl" not in vars(Mlp) and type(Mlp()).__call__ is nn.Module.__call__


@pytest.mark.parametrize("build", [
    lambda: nn.Linear(8, 8),
    lambda: nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)),
    lambda: nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True),
], ids=["linear", "sequential", "transformer_layer"])
def test_modules_of_torch_nn_itself_are_compiled(build):
    model = build().eval()
    x = torch.randn(2, 3, 8)
    optimized = fvcompile.optimize(model, passes=[ReluToClampPass()], codegen=False)
    with torch.no_grad():
        torch.testing.assert_close(optimized(x), model(x))
    report = optimized.fvcompile_report
    assert report.graphs and report.graph_calls >= 1 and not report.eager_calls


def test_a_call_past_the_recompile_limit_is_reported_and_warned_once():
    optimized = fvcompile.optimize(Mlp(), passes=[ReluToClampPass()], codegen=False, dynamic=False)
    with torch._dynamo.config.patch(recompile_limit=2), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for batch in range(1, 6):
            optimized(torch.randn(batch, 16))
    report = optimized.fvcompile_report
    assert report.rewritten() == 2 and report.eager_calls == 3
    assert "recompile limit (2" in report.ran_eagerly and "dynamic=True" in report.ran_eagerly
    assert len([w for w in caught if "ran eagerly" in str(w.message)]) == 1
    assert "3 call(s) ran eagerly" in report.summary()


class DataDependent(nn.Module):
    def forward(self, x):
        y = x * 2
        if y.sum() > 0:
            return y + 1
        return y - 1


class Prints(nn.Module):
    def forward(self, x):
        y = x * 2
        print("fvcompile test: a print breaks the graph")
        return y + 1


class Item(nn.Module):
    def forward(self, x):
        y = x * 2
        return y + y.sum().item()


class Explicit(nn.Module):
    def forward(self, x):
        y = x * 2
        torch._dynamo.graph_break()
        return y + 1


@pytest.mark.parametrize("model, words", [
    (DataDependent(), "data-dependent branching"),
    (Prints(), "print"),
    (Item(), "item()"),
    (Explicit(), "graph_break()"),
], ids=["data_dependent", "print", "item", "explicit"])
def test_every_kind_of_graph_break_is_counted(model, words):
    optimized = fvcompile.optimize(model, codegen=False)
    optimized(torch.randn(4))
    breaks = optimized.fvcompile_report.graph_breaks
    assert sum(breaks.values()) == 1 and words in next(iter(breaks)), breaks
    assert "test_reliability.py:" in next(iter(breaks))  # where it broke


class DropoutMlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 16)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.drop(self.lin(x))


def test_verify_names_random_ops_in_training_mode_not_a_pass():
    with pytest.raises(VerificationError, match=r"random ops \(.*dropout.*\).*model.eval\(\).*fallback_random"):
        fvcompile.optimize(DropoutMlp(), codegen=False, verify=True)(torch.randn(64, 16))
    # The way out it names works: Inductor then draws eager's random numbers.
    fvcompile.optimize(DropoutMlp(), codegen=False, verify=True,
                       options={"fallback_random": True})(torch.randn(64, 16))


def test_verify_names_the_pass_that_rewrote():
    from toy_passes import BreakNumericsPass

    with pytest.raises(VerificationError, match="approximate pass.*break_numerics"):
        fvcompile.optimize(Mlp(), passes=[BreakNumericsPass()], codegen=False, verify=True)(torch.randn(4, 16))


@pytest.mark.parametrize("kwargs, error, words", [
    ({"include": 42}, TypeError, "include= takes a module-name glob"),
    ({"exclude": ["layers.0", 3]}, TypeError, "exclude= takes a module-name glob"),
    ({"verify": "yes"}, TypeError, "verify= takes True or False"),
    ({"codegen": None}, TypeError, "codegen= takes True or False"),
    ({"dump_dir": 3.5}, TypeError, "dump_dir= takes a folder path"),
    ({"passes": ["relu_to_clamp_twice"]}, ValueError, "unknown pass"),
], ids=["include", "exclude", "verify", "codegen", "dump_dir_type", "unknown_pass"])
def test_bad_arguments_fail_when_optimize_is_called(kwargs, error, words):
    with pytest.raises(error, match=words):
        fvcompile.optimize(Mlp(), **kwargs)


def test_a_dump_dir_that_is_a_file_or_unwritable_fails_at_once(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        fvcompile.optimize(Mlp(), dump_dir=a_file)
    with pytest.raises(ValueError, match="cannot be made"):
        fvcompile.optimize(Mlp(), dump_dir=a_file / "below")


def test_a_pass_named_twice_is_refused():
    with pytest.raises(ValueError, match="'relu_to_clamp' named more than once"):
        fvcompile.optimize(Mlp(), passes=[ReluToClampPass(), ReluToClampPass(hook="post_grad")])
