"""lorakit.checks.all_finite: the one-reduction finiteness proof and its exact fallback."""

import pytest
import torch

from lorakit.checks import all_finite


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_all_finite(dtype):
    t = torch.randn(64, 8).to(dtype)
    assert all_finite(t)
    for bad in (float("nan"), float("inf"), float("-inf")):
        u = t.clone()
        u[5, 3] = bad
        assert not all_finite(u)
    both = t.clone()
    both[0, 0], both[1, 1] = float("inf"), float("-inf")     # inf + -inf: the sum is NaN, still caught
    assert not all_finite(both)


def test_finite_values_whose_sum_overflows_are_finite():
    big = torch.full((4,), 3e38, dtype=torch.float32)          # the sum overflows to inf
    assert all_finite(big)
    assert all_finite(torch.empty(0))
