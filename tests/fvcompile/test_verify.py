"""verify.compare: what counts as the compiled output differing from eager."""
import pytest
import torch

from fvcompile.verify import VerificationError, compare


def test_nan_and_inf_in_the_same_places_agree():
    out = torch.tensor([float("nan"), float("inf"), -float("inf"), 1.0])
    compare(out, out.clone())


def test_nan_where_eager_has_a_number_differs():
    with pytest.raises(VerificationError, match="output 0"):
        compare(torch.tensor([1.0, 2.0]), torch.tensor([1.0, float("nan")]))


def test_complex_outputs_are_compared_within_tolerance():
    e = torch.randn(8, dtype=torch.complex64)
    compare(e, e + 1e-7)
    with pytest.raises(VerificationError, match="max abs error"):
        compare(e, e + 1e-2j)


def test_a_changed_dtype_differs():
    e = torch.randn(4)
    with pytest.raises(VerificationError, match="dtype"):
        compare(e, e.to(torch.bfloat16))
