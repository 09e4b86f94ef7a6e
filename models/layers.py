"""Layers shared by the model files."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FEW_ROWS = range(1, 17)


class Linear(nn.Linear):
    """``nn.Linear`` that computes a product with 1-16 rows as ``(W @ x^T)^T`` on the CPU.

    The CPU build's BLAS (MKL) is pathologically slow for float32 products with a handful
    of rows on our benchmark machine (an AMD EPYC). Streaming SmolLM2's 30 layers of
    weights: ``F.linear`` took 36 ms for 1 row and 60-68 ms for 2-3 rows; swapped operands
    take 16-25 ms, a single row being sent as two copies of itself (its own kernel is the
    slow one). From about 32 rows on the two ways are within noise, so larger products,
    other dtypes and other devices stay on ``F.linear``. These are decode steps with a few
    sequences, which every run ends with.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        if rows in FEW_ROWS and x.dtype == torch.float32 and x.device.type == "cpu" and x.dim() == 2:
            operand = torch.cat([x, x]) if rows == 1 else x
            out = torch.mm(self.weight, operand.t()).t()[:rows].contiguous()
            return out if self.bias is None else out + self.bias
        return F.linear(x, self.weight, self.bias)
