"""Bad pass options: refused when the pass is built, each message listing what is allowed."""
from __future__ import annotations

import pytest

from fvcompile.passes.sparse24 import Sparse24
from fvcompile.passes.sparse24_config import Sparse24Config

# (keyword arguments of Sparse24, error type, words of the problem, words of what is allowed)
SPARSE24_CASES = {
    "emulate_none": ({"emulate": None}, ValueError, "got None", "True or False"),
    "emulate_str": ({"emulate": "yes"}, ValueError, "got 'yes'", "True or False"),
    "warmup_float": ({"warmup_steps": 2.7}, ValueError, "got 2.7", "an int >= 0"),
    "warmup_negative": ({"warmup_steps": -3}, ValueError, "got -3", "an int >= 0"),
    "warmup_bool": ({"warmup_steps": True}, ValueError, "got True", "an int >= 0"),
    "sparse_mm_maybe": ({"sparse_mm": "maybe"}, ValueError, "got 'maybe'", "None, True or False"),
    "sparse_mm_int": ({"sparse_mm": 1}, ValueError, "got 1", "None, True or False"),
    "fp8_int": ({"fp8": 3}, ValueError, "got 3", "True or False"),
    "fp8_format": ({"fp8": "e5m2"}, ValueError, "got 'e5m2'", "True or False"),
    "weight_grad_dw1": ({"sparse_weight_grad": "dW1"}, ValueError, "got 'dW1'", "'none', 'dW2', 'all'"),
    "unknown_option": ({"sparsity": 0.5}, TypeError, "no option 'sparsity'", "emulate, warmup_steps"),
    "unknown_recipe": ({"recipe": "fast"}, ValueError, "unknown sparse24 recipe 'fast'", "exact, paper, fastest"),
}


@pytest.mark.parametrize("case", list(SPARSE24_CASES))
def test_sparse24_refuses(case):
    kwargs, error, problem, allowed = SPARSE24_CASES[case]
    with pytest.raises(error) as raised:
        Sparse24(**kwargs)
    assert problem in str(raised.value) and allowed in str(raised.value), str(raised.value)


def test_sparse24_refuses_a_positional_non_config():
    with pytest.raises(TypeError, match="Sparse24 takes a Sparse24Config, a recipe= or options by keyword"):
        Sparse24(False)


def test_sparse24_refuses_a_config_and_a_recipe():
    with pytest.raises(ValueError, match="a config or a recipe, not both"):
        Sparse24(Sparse24Config(), recipe="paper")
