"""Layers shared by the model files."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pagedkv.models.cpu_kernel import CPUKernels, kernels_for

# The batch size oneDNN's packed layout is tuned for; any other row count still multiplies correctly.
PACKING_ROWS = 64
# Up to this many rows the CPU kernel multiplies, past it oneDNN (measured: docs/benchmarks.md).
KERNEL_ROWS = 128


PACKED_DTYPES = (torch.float32, torch.bfloat16)


@dataclass
class PackedWeight:
    """A weight's packed copies, valid for the version of it they were made from."""

    key: tuple[int, int, torch.dtype, int]  # id, storage, dtype, version of the weight packed
    kernels: CPUKernels | None  # the kernels that packed ``tiles``
    tiles: torch.Tensor | None  # the CPU kernel's layout; None where it has no kernel for the weight
    onednn: torch.Tensor | None = None  # oneDNN's blocked layout, made on first use


class Linear(nn.Linear):
    """``nn.Linear`` that, on the CPU and without autograd, multiplies by a prepacked copy of
    its weight: for up to :data:`KERNEL_ROWS` rows (decode steps) with the CPU kernel
    (``csrc/linear.c``), for more with oneDNN's blocked layout (the path ``torch.compile``'s
    CPU backend takes for frozen weights).

    Measured on this machine (2 threads, SmolLM2's four layer shapes, all 30 layers' weights
    streaming from memory as in a real step; ``benchmarks/bench_kernels.py``): the kernel is
    1.2-1.3x faster than oneDNN's prepacked matmul for 1-64 rows in both dtypes (up to 1.8x in
    noisier sittings), even at 128-256, and oneDNN wins from a few hundred rows (prefill
    chunks). Unpacked, bfloat16's ``F.linear`` re-lays the weight out on every call (packing
    halved the time for 1-4 rows) and float32's goes to MKL, which runs at 100 GFLOP/s on this
    AMD CPU where oneDNN reaches 245. The packed copies are rebuilt whenever
    the weight changes (moved, cast, written in place through the parameter, or loaded from a
    state dict), so the module behaves like ``nn.Linear``; they cost up to two more copies of
    the weight in memory. A write through ``weight.data`` bypasses the version counter: call
    :meth:`repack` after one.

    A step through the modules makes 121 of these calls (one of them, the vocabulary projection,
    where :class:`~pagedkv.models.llama.FusedLayers` runs the layers), so the path to the kernel
    is kept short: the kernels are looked up when the weight is packed, not on every call, and
    2-D inputs (the flat batches models pass) are not reshaped.
    """

    _packing: PackedWeight | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if x.device.type != "cpu" or torch.is_grad_enabled() or x.dtype != weight.dtype or x.dtype not in PACKED_DTYPES:
            return F.linear(x, weight, self.bias)
        flat = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        packing = self._packed(weight)
        if packing.kernels is not None and packing.tiles is not None and flat.shape[0] <= KERNEL_ROWS:
            out = packing.kernels.linear(flat.contiguous(), packing.tiles, self.bias, self.out_features)
        elif torch.backends.mkldnn.is_available():
            if packing.onednn is None:
                with torch.no_grad():
                    packing.onednn = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACKING_ROWS)
            out = torch.ops.mkldnn._linear_pointwise(flat, packing.onednn, self.bias, "none", [], "")
        else:
            return F.linear(x, weight, self.bias)
        return out if flat is x else out.reshape(*x.shape[:-1], -1)

    def kernel_tiles(self) -> torch.Tensor | None:
        """The weight in the CPU kernel's layout, packed now if it changed; None where the
        kernel does not take this layer (another device or dtype, a bias, autograd on)."""
        weight = self.weight
        if weight.device.type != "cpu" or torch.is_grad_enabled() or self.bias is not None:
            return None
        return self._packed(weight).tiles

    def repack(self) -> None:
        """Drop the packed copies; the next forward packs the weight as it is now."""
        self._packing = None

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._packing = None  # loading may copy through .data, which no version counter sees

    def _packed(self, weight: torch.Tensor) -> PackedWeight:
        # Inference tensors keep no version counter; they cannot be written outside inference mode.
        version = 0 if weight.is_inference() else weight._version
        key = (id(weight), weight.data_ptr(), weight.dtype, version)
        if self._packing is None or self._packing.key != key:
            kernels = kernels_for(weight.detach())
            with torch.no_grad():
                tiles = kernels.pack_linear(weight.detach()) if kernels is not None else None
            self._packing = PackedWeight(key, kernels, tiles)
        return self._packing


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
