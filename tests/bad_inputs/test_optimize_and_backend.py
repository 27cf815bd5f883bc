"""Bad inputs to `fvcompile.optimize` and to `torch.compile(backend="fvcompile", options=...)`:
each fails with an error of the right type whose message names the problem and the way out."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fvcompile


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return torch.relu(self.lin(x))


# (keyword arguments of optimize, error type, words of the problem, words of the way out)
OPTIMIZE_CASES = {
    "model_none": ({"model": None}, TypeError, "got NoneType", "nn.Module instance or a function"),
    "model_int": ({"model": 3}, TypeError, "got int", "nn.Module instance or a function"),
    "model_class": ({"model": Tiny}, TypeError, "nn.Module class (Tiny)", "build one first"),
    "model_plain_class": ({"model": dict}, TypeError, "a class (dict)", "build one first"),
    "passes_int": ({"passes": 3}, TypeError, "got 3", "'auto', a list of pass names"),
    "passes_none": ({"passes": None}, TypeError, "got None", "'auto', a list of pass names"),
    "passes_unknown": ({"passes": ["sparse42"]}, ValueError, "unknown pass 'sparse42'", "sparse24"),
    "passes_twice": ({"passes": ["sparse24", "sparse24"]}, ValueError, "named more than once", "name each pass once"),
    "passes_nested": ({"passes": [["sparse24"]]}, ValueError, "unknown pass", "pass names"),
    "include_int": ({"include": 42}, TypeError, "got 42", "include=['layers.0'"),
    "exclude_mixed": ({"exclude": ["a", None]}, TypeError, "got ['a', None]", "module-name glob"),
    "verify_str": ({"verify": "yes"}, TypeError, "got 'yes'", "True or False"),
    "codegen_int": ({"codegen": 0}, TypeError, "got 0", "True or False"),
    "dump_dir_number": ({"dump_dir": 1.5}, TypeError, "got float", "folder path"),
    "mode_unknown": ({"mode": "fastest"}, ValueError, "mode='fastest'", "max-autotune"),
    "mode_int": ({"mode": 3}, TypeError, "got 3", "mode name"),
    "inductor_option_typo": ({"options": {"epilog_fusion": False}}, ValueError, "'epilog_fusion'",
                             "did you mean epilogue_fusion"),
    "inductor_option_unknown": ({"options": {"make_it_fast": True}}, ValueError, "'make_it_fast'",
                                "torch._inductor.config"),
}


@pytest.mark.parametrize("case", list(OPTIMIZE_CASES))
def test_optimize_refuses(case):
    kwargs, error, problem, way_out = OPTIMIZE_CASES[case]
    kwargs = dict(kwargs)
    model = kwargs.pop("model", Tiny())
    with pytest.raises(error) as raised:
        fvcompile.optimize(model, **kwargs)
    assert problem in str(raised.value) and way_out in str(raised.value), str(raised.value)


def test_optimize_refuses_a_dump_dir_that_is_a_file(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(ValueError, match=r"is a file, not a folder: give a folder path"):
        fvcompile.optimize(Tiny(), dump_dir=tmp_path / "f")


def test_optimize_refuses_a_dump_dir_below_a_file(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(ValueError, match=r"cannot be made .*give a folder you can write"):
        fvcompile.optimize(Tiny(), dump_dir=tmp_path / "f" / "dump")


def test_optimize_refuses_a_pass_object_with_a_misspelt_hook():
    class Misspelt(fvcompile.GraphPass):
        name = "misspelt"
        hook = "post-grad"

    with pytest.raises(ValueError, match=r"has hook 'post-grad'; a pass runs at one of: 'joint'"):
        fvcompile.optimize(Tiny(), passes=[Misspelt()])


# The backend sees its options at the first compile: Dynamo wraps the error, ours is its cause.
BACKEND_CASES = {
    "passes_int": ({"passes": 7}, TypeError, "got 7", "'auto', a list of pass names"),
    "passes_unknown": ({"passes": ["saap2"]}, ValueError, "unknown pass 'saap2'", "pass names"),
    "codegen_str": ({"codegen": "no"}, TypeError, "codegen= takes True or False", "got 'no'"),
    "include_int": ({"include": 1}, TypeError, "include= takes a module-name glob", "got 1"),
    "report_dict": ({"report": {}}, TypeError, "got dict", "fvcompile.OptimizeReport"),
    "inductor_typo": ({"max_autotun": True}, ValueError, "'max_autotun'", "did you mean max_autotune"),
}


@pytest.mark.parametrize("case", list(BACKEND_CASES))
def test_backend_options_are_refused_at_the_first_compile(case):
    options, error, problem, way_out = BACKEND_CASES[case]
    compiled = torch.compile(Tiny(), backend="fvcompile", options=options)
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed) as raised:
        compiled(torch.randn(2, 4))
    cause = raised.value.__cause__ or raised.value.inner_exception
    assert isinstance(cause, error) and problem in str(cause) and way_out in str(cause), repr(cause)


def test_backend_refuses_a_dump_dir_that_is_a_file(tmp_path):
    (tmp_path / "f").write_text("")
    compiled = torch.compile(Tiny(), backend="fvcompile", options={"dump_dir": str(tmp_path / "f")})
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match="is a file, not a folder"):
        compiled(torch.randn(2, 4))
