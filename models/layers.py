"""Layers shared by the model files."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pagedkv.models.cpu_kernel import CPUKernels, kernels_for

# The batch size the packed layouts are tuned for; any other row count still multiplies correctly.
PACKING_ROWS = 64


PACKED_DTYPES = (torch.float32, torch.bfloat16)


class Linear(nn.Linear):
    """``nn.Linear`` that, on the CPU and without autograd, multiplies by a copy of its weight
    prepacked into oneDNN's blocked layout, the path ``torch.compile``'s CPU backend takes for
    frozen weights.

    Measured on this machine (one core, SmolLM2's four layer shapes): in bfloat16 a plain
    ``F.linear`` re-lays the weight out on every call, and packing halves the time for 1-4 rows,
    saves a third at 8-16 rows and 10% at 64. In float32 ``F.linear`` goes to MKL, which runs
    at 100 GFLOP/s on this AMD CPU where oneDNN reaches 245 (2.4x at 64 rows and more; MKL's
    unpacked kernel for a handful of rows was slower still). The packed copy is rebuilt whenever
    the weight changes (moved, cast, written in place through the parameter, or loaded from a
    state dict), so the module behaves like ``nn.Linear``; it costs one more copy of the weight
    in memory. A write through ``weight.data`` bypasses the version counter: call
    :meth:`repack` after one.
    """

    _packed: torch.Tensor | None = None
    _packed_for: tuple[int, int, torch.dtype, int] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if (x.device.type != "cpu" or torch.is_grad_enabled() or x.dtype != weight.dtype
                or x.dtype not in PACKED_DTYPES or not torch.backends.mkldnn.is_available()):
            return F.linear(x, weight, self.bias)
        flat = x.reshape(-1, x.shape[-1])
        out = torch.ops.mkldnn._linear_pointwise(flat, self._packed_weight(), self.bias, "none", [], "")
        return out.reshape(*x.shape[:-1], -1)

    def repack(self) -> None:
        """Drop the packed copy; the next forward packs the weight as it is now."""
        self._packed = None

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._packed = None  # loading may copy through .data, which no version counter sees

    def _packed_weight(self) -> torch.Tensor:
        weight = self.weight
        # Inference tensors keep no version counter; they cannot be written outside inference mode.
        version = 0 if weight.is_inference() else weight._version
        key = (id(weight), weight.data_ptr(), weight.dtype, version)
        if self._packed is None or self._packed_for != key:
            with torch.no_grad():
                self._packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACKING_ROWS)
            self._packed_for = key
        return self._packed


class RMSNorm(nn.RMSNorm):
    """``nn.RMSNorm`` that runs as one C pass per row on the CPU without autograd (PyTorch's
    own is about fifteen small ops there), and that can fuse the residual add before it:
    :meth:`add_and_norm`. Elsewhere, or without the CPU kernels, PyTorch computes it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernels = self._kernels(x)
        if kernels is None:
            return super().forward(x)
        return kernels.rms_norm(x, self.weight, self._eps())

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The norm of ``residual + x``, and that sum (the caller's running residual stream).
        The kernel writes the sum into ``residual``'s own storage; use the returned one."""
        kernels = self._kernels(x)
        if kernels is None or not residual.is_contiguous():
            residual = residual + x
            return super().forward(residual), residual
        return kernels.rms_norm(x, self.weight, self._eps(), residual), residual

    def _eps(self) -> float:
        return self.eps if self.eps is not None else torch.finfo(self.weight.dtype).eps

    def _kernels(self, x: torch.Tensor) -> CPUKernels | None:
        if self.weight is None or x.dtype != self.weight.dtype or not x.is_contiguous():
            return None
        return kernels_for(x)
