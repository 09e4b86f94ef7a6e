"""models.layers.Linear computes exactly what nn.Linear does, whichever way it takes."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from pagedkv.models.layers import Linear


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_matches_f_linear_for_every_row_count(bias: bool, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    layer = Linear(48, 80, bias=bias).to(dtype)
    for rows in (1, 2, 3, 8, 16, 17, 40):
        x = torch.randn(rows, 48).to(dtype)
        out = layer(x)
        expected = torch.nn.functional.linear(x, layer.weight, layer.bias)
        assert out.shape == (rows, 80) and out.is_contiguous()
        tolerance: dict[str, Any] = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {}
        torch.testing.assert_close(out, expected, **tolerance)
