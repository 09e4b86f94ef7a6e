"""The CPU kernels (``csrc/``): paged attention, linear layers, RMSNorm and RoPE, built once,
loaded with ctypes.

Why C and not PyTorch ops: decode attention over a paged cache is a memory-bound read of
each sequence's own blocks; in PyTorch it takes a padded gather (a copy of every context,
padded to the longest) and matmuls a few rows tall, which measured several times slower
than the read itself (docs/benchmarks.md has the profile). The kernel reads the cache in
place. RMSNorm is about fifteen small PyTorch ops on the CPU, and a decode step runs 61 of
them; the kernel is one pass per row, fused with the residual add before it. RoPE is eight ops
and a copy of q and k; the kernel rotates them in place in one pass (3-5x faster). A decode
step's linear layers stream every weight once for a few rows: the linear kernel keeps that stream
closer to memory speed than oneDNN's blocked kernels (1.2-1.3x faster for 1-64 rows; see
``models.layers.Linear``). (SwiGLU's silu(gate) * up was tried as a kernel too: no faster than
PyTorch's three ops, so not kept.) And a Llama layer's kernels run as one call
(``csrc/llama_layer.c``, driven by ``models.llama.FusedLayers``): a decode step was otherwise about
300 Python calls around them, 5-15 us apiece.

The sources are plain C with OpenMP, compiled by the system's C compiler on first use (about
a second; no PyTorch headers) and cached under ``~/.cache/pagedkv/kernels`` by a hash of the
sources, the command and the CPU. The library shares PyTorch's OpenMP runtime (already loaded
under the same soname), so its threads are PyTorch's threads.

Without a compiler, or with ``PAGEDKV_CPU_KERNEL=0``, :func:`load_cpu_kernel` returns None:
attention takes the gather path, which stays the reference the kernel is tested against,
linear layers oneDNN's prepacked matmul, and RMSNorm and RoPE PyTorch's own.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCES = sorted((Path(__file__).with_name("csrc")).glob("*.[ch]"))
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
# q, tokens, q_stride, k_cache, v_cache, num_blocks, out, block_tables, table_width, query_starts,
# query_lens, context_lens, seqs, heads, kv_heads, head_dim, block_size, scale
_ARGTYPES: list[type[ctypes.c_void_p] | type[ctypes.c_int64] | type[ctypes.c_float]] = [
    ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
    ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, *[ctypes.c_void_p] * 3, *[ctypes.c_int64] * 5, ctypes.c_float,
]
_OUT_OF_MEMORY, _BAD_INPUT = 1, 2  # the C's status codes
# x, tokens, token_stride, heads, head_dim, positions, cos, sin, max_positions
_ROPE_ARGTYPES: list[type[ctypes.c_void_p] | type[ctypes.c_int64]] = [
    ctypes.c_void_p, *[ctypes.c_int64] * 4, *[ctypes.c_void_p] * 3, ctypes.c_int64,
]


# x, rows, k, packed, bias, y, n
_LINEAR_ARGTYPES: list[type[ctypes.c_void_p] | type[ctypes.c_int64]] = [
    ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
    ctypes.c_int64,
]
# x, residual, weight, out, rows, dim, eps
_NORM_ARGTYPES: list[type[ctypes.c_void_p] | type[ctypes.c_int64] | type[ctypes.c_float]] = [
    *[ctypes.c_void_p] * 4, ctypes.c_int64, ctypes.c_int64, ctypes.c_float,
]

_LAYER_STATUS = {1: MemoryError, 2: ValueError, 3: ValueError}


class LlamaStep(ctypes.Structure):
    """One forward's shapes, metadata and buffers for ``csrc/llama_layer.c`` (its struct
    llama_step, field for field). Addresses are plain integers: whoever fills one keeps the
    tensors alive for as long as it is used."""

    _fields_ = [
        *[(name, ctypes.c_int64) for name in (
            "bf16", "tokens", "hidden", "heads", "kv_heads", "head_dim", "intermediate", "layers",
            "seqs", "block_size", "num_blocks", "table_width", "max_positions",
        )],
        *[(name, ctypes.c_void_p) for name in (
            "positions", "slots", "block_tables", "query_starts", "query_lens", "context_lens", "cos", "sin",
            "layer_table", "x", "residual", "normed", "qkv", "attn", "gate_up",
        )],
        ("eps", ctypes.c_float),
        ("scale", ctypes.c_float),
    ]


class CPUKernels:
    """The compiled kernels, for float32 and bfloat16 CPU tensors."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._attention = {torch.float32: library.paged_attention_f32, torch.bfloat16: library.paged_attention_bf16}
        self._norm = {torch.float32: library.rms_norm_f32, torch.bfloat16: library.rms_norm_bf16}
        for function in self._attention.values():
            function.argtypes = _ARGTYPES
            function.restype = ctypes.c_int
        self._rope = {torch.float32: library.rope_f32, torch.bfloat16: library.rope_bf16}
        for function in self._norm.values():
            function.argtypes = _NORM_ARGTYPES
            function.restype = None
        for function in self._rope.values():
            function.argtypes = _ROPE_ARGTYPES
            function.restype = ctypes.c_int
        library.linear_supported.argtypes = [ctypes.c_int]
        self._linear = {dtype: function for dtype, function, bf16 in
                        [(torch.float32, library.linear_f32, 0), (torch.bfloat16, library.linear_bf16, 1)]
                        if library.linear_supported(bf16)}
        for function in self._linear.values():
            function.argtypes = _LINEAR_ARGTYPES
            function.restype = ctypes.c_int
        self._llama_layer = library.llama_layer
        self._llama_layer.argtypes = [ctypes.POINTER(LlamaStep), ctypes.c_int64, ctypes.c_void_p]
        self._llama_layer.restype = ctypes.c_int

    def supports(self, dtype: torch.dtype) -> bool:
        return dtype in self._attention

    def supports_linear(self, dtype: torch.dtype) -> bool:
        """Whether this build has the linear kernel for ``dtype`` (bfloat16's needs AVX512-BF16)."""
        return dtype in self._linear

    def rms_norm(
        self, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``x / rms(x) * weight`` over the last dimension, in float32, rounded once to x's
        dtype (torch.nn.RMSNorm's definition). With ``residual``: first ``residual += x`` in
        place, then the sum is normalized. Tensors contiguous, on the CPU, of one dtype."""
        dim = x.shape[-1]
        operands = (x, weight) if residual is None else (x, weight, residual)
        if not all_cpu_contiguous(x.dtype, *operands):
            raise ValueError("rms_norm takes contiguous CPU tensors of one dtype")
        if weight.shape != (dim,) or (residual is not None and residual.shape != x.shape):
            raise ValueError(f"rms_norm: weight must be [{dim}] and residual shaped like x {tuple(x.shape)}")
        out = torch.empty_like(x)
        self._norm[x.dtype](x.data_ptr(), None if residual is None else residual.data_ptr(), weight.data_ptr(),
                            out.data_ptr(), x.numel() // dim, dim, eps)
        return out

    def rope_(self, x: torch.Tensor, heads: int, positions: torch.Tensor, cos: torch.Tensor,
              sin: torch.Tensor) -> None:
        """Rotate, in place, the first ``heads`` heads of each token of ``x`` ([T, H, D]: its
        heads and dims contiguous, tokens possibly apart, as in the fused QKV output) by RoPE's
        rotate-half form at ``positions`` (int64 [T]), with ``cos``/``sin`` tables
        [max_positions, D / 2] in x's dtype; computed in float32, rounded once."""
        if x.dim() != 3 or not x[0].is_contiguous() or x.device.type != "cpu" or x.dtype not in self._rope:
            raise ValueError("rope_ takes a float32 or bfloat16 CPU tensor [T, H, D], each token's heads contiguous")
        tokens, _, dim = x.shape
        if not 0 < heads <= x.shape[1] or dim % 2:
            raise ValueError(f"rope_: heads must be in [1, {x.shape[1]}] and the head size ({dim}) even")
        if cos.shape != (cos.shape[0], dim // 2) or sin.shape != cos.shape or not all_cpu_contiguous(x.dtype, cos, sin):
            raise ValueError(f"rope_: cos and sin must be contiguous [max_positions, {dim // 2}] in {x.dtype}")
        if positions.shape != (tokens,) or not all_cpu_contiguous(torch.int64, positions):
            raise ValueError(f"rope_: positions must be a contiguous int64 tensor of {tokens} elements")
        status = self._rope[x.dtype](x.data_ptr(), tokens, x.stride(0), heads, dim, positions.data_ptr(),
                                     cos.data_ptr(), sin.data_ptr(), cos.shape[0])
        if status == _BAD_INPUT:
            raise ValueError(f"rope_: a position lies outside [0, {cos.shape[0]})")

    def pack_linear(self, weight: torch.Tensor) -> torch.Tensor | None:
        """``weight`` ([n, k]) in :meth:`linear`'s layout: tiles of 16 output columns, n padded
        with zeros to a multiple of 32; bfloat16 keeps k's pairs together. None where this
        build has no linear kernel for the dtype (or, in bfloat16, k is odd)."""
        n, k = weight.shape
        if weight.dtype not in self._linear or (weight.dtype == torch.bfloat16 and k % 2):
            return None
        padded = weight.new_zeros(-(-n // 32) * 32, k)
        padded[:n] = weight
        if weight.dtype == torch.bfloat16:
            return padded.reshape(-1, 16, k // 2, 2).permute(0, 2, 1, 3).contiguous()
        return padded.reshape(-1, 16, k).permute(0, 2, 1).contiguous()

    def linear(self, x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, n: int) -> torch.Tensor:
        """``x @ weight.T + bias`` for ``x`` [rows, k] contiguous, with the weight packed by
        :meth:`pack_linear`; summed in float32, rounded once to x's dtype."""
        rows, k = x.shape
        if not x.is_contiguous() or x.dtype != packed.dtype or packed.numel() != -(-n // 32) * 32 * k:
            raise ValueError(f"linear: x must be contiguous [rows, {k}] of the packed weight's dtype and size")
        if bias is not None and (bias.shape != (n,) or bias.dtype != x.dtype or not bias.is_contiguous()):
            raise ValueError(f"linear: bias must be a contiguous [{n}] tensor in {x.dtype}")
        y = x.new_empty(rows, n)
        status = self._linear[x.dtype](x.data_ptr(), rows, k, packed.data_ptr(),
                                       None if bias is None else bias.data_ptr(), y.data_ptr(), n)
        if status:
            raise ValueError(f"linear: this build has no {x.dtype} kernel for {k} inputs (status {status})")
        return y

    def llama_layer(self, step: LlamaStep, layer: int, act: torch.Tensor | None) -> None:
        """Layer ``layer`` of a Llama model as one call (``csrc/llama_layer.c``), ``act`` the
        previous layer's MLP activation (None for layer 0). The caller built ``step`` from
        tensors it checked, and keeps them alive."""
        status = self._llama_layer(ctypes.byref(step), layer, None if act is None else act.data_ptr())
        if status:
            raise _LAYER_STATUS.get(status, RuntimeError)(
                f"llama_layer: layer {layer} failed (status {status}: 1 out of memory, 2 an index out of range)"
            )

    def paged_attention(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        out: torch.Tensor,
        block_tables: torch.Tensor,
        query_starts: torch.Tensor,
        query_lens: torch.Tensor,
        context_lens: torch.Tensor,
    ) -> None:
        """Write into ``out`` ([T, H, D], like ``q``) the attention of the ``query_lens[i]`` tokens
        from ``query_starts[i]`` on over the first ``context_lens[i]`` tokens of sequence i's
        blocks (``block_tables[i]``), causal within the new tokens. Rows of ``out`` that no
        sequence names are left as they are. Index tensors are int64, all tensors on the CPU and
        contiguous, except that ``q``'s tokens may lie apart (a slice of the fused QKV output,
        its heads and dims contiguous); the caller's metadata guarantees every index is in range."""
        if not all_cpu_contiguous(torch.int64, block_tables, query_starts, query_lens, context_lens):
            raise ValueError("paged_attention: block tables, starts and lengths must be contiguous int64 CPU tensors")
        if q.dim() != 3 or k_cache.dim() != 4 or v_cache.shape != k_cache.shape or out.shape != q.shape:
            raise ValueError("paged_attention: q and out [T, H, D], k_cache and v_cache [blocks, block_size, Hkv, D]")
        if not all_cpu_contiguous(q.dtype, k_cache, v_cache, out) or q.device.type != "cpu" or not q[0].is_contiguous():
            raise ValueError("paged_attention: q, caches and out must be contiguous CPU tensors of one dtype "
                             "(q: each token's heads)")
        if q.shape[2] != k_cache.shape[3]:
            raise ValueError("paged_attention: q and the caches must share one head size")
        tokens, heads, dim = q.shape
        num_blocks, block_size, kv_heads, _ = k_cache.shape
        if heads % kv_heads:
            raise ValueError(f"paged_attention: {heads} query heads do not share {kv_heads} K/V heads evenly")
        status = self._attention[q.dtype](
            q.data_ptr(), tokens, q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), num_blocks, out.data_ptr(),
            block_tables.data_ptr(), block_tables.shape[1], query_starts.data_ptr(), query_lens.data_ptr(),
            context_lens.data_ptr(), len(query_starts), heads, kv_heads, dim, block_size, dim**-0.5,
        )
        if status == _BAD_INPUT:
            raise ValueError("paged_attention: a sequence's tokens or blocks lie outside q or the cache, "
                             "or its context is shorter than its new tokens")
        if status == _OUT_OF_MEMORY:
            raise MemoryError("paged_attention could not allocate its score buffer")


def all_cpu_contiguous(dtype: torch.dtype, *tensors: torch.Tensor) -> bool:
    """Whether every tensor is a contiguous CPU tensor of ``dtype``. A plain loop rather than
    ``any`` over a generator: a decode step checks hundreds of tensors."""
    for t in tensors:
        if t.dtype != dtype or t.device.type != "cpu" or not t.is_contiguous():
            return False
    return True


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "pagedkv" / "kernels"


def _cpu_flags() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    return next((line for line in lines if line.startswith(("flags", "Features"))), platform.processor())


def _build(compiler: str, extra_flags: Sequence[str] = ()) -> Path:
    flags = [*FLAGS, *extra_flags]
    sources = [path.read_bytes() for path in SOURCES]
    key = hashlib.sha256(b"\0".join([*sources, " ".join([compiler, *flags]).encode(), _cpu_flags().encode()]))
    target = _cache_dir() / f"pagedkv-kernels-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        c_files = [str(path) for path in SOURCES if path.suffix == ".c"]
        subprocess.run([compiler, *flags, *c_files, "-o", str(built), "-lm"],
                       check=True, capture_output=True, text=True)
        os.replace(built, target)  # atomic: a concurrent build of the same source is harmless
    return target


def build_cpu_kernels(extra_flags: Sequence[str] = ()) -> CPUKernels:
    """Build (or take from the cache) and load the kernels, compiled with ``extra_flags`` after
    the usual ones: the tests build them without an instruction set (``-mno-avx512bf16``) to
    check the paths other CPUs take. Raises if there is no compiler or the build fails."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise FileNotFoundError("no C compiler found (set CC)")
    return CPUKernels(ctypes.CDLL(str(_build(compiler, extra_flags))))


@functools.cache
def load_cpu_kernel() -> CPUKernels | None:
    """The kernels, built on first use; None (with one warning) when they cannot be built."""
    switch = os.environ.get("PAGEDKV_CPU_KERNEL", "1").strip().lower()
    if switch not in ("0", "1", "false", "true", "off", "on", "no", "yes"):
        raise ValueError(f"PAGEDKV_CPU_KERNEL={switch!r}: 1/true/on/yes builds the kernels, 0/false/off/no does not")
    if switch in ("0", "false", "off", "no"):
        return None
    try:
        return build_cpu_kernels()
    except FileNotFoundError:
        log.warning("no C compiler found: CPU attention, RMSNorm and RoPE take slower PyTorch paths "
                    "(set CC to build the kernels)")
        return None
    except (OSError, subprocess.CalledProcessError) as error:
        detail = error.stderr if isinstance(error, subprocess.CalledProcessError) else error
        log.warning("the CPU kernels did not build (%s): attention, RMSNorm and RoPE take slower "
                    "PyTorch paths", detail)
        return None


def kernels_for(x: torch.Tensor) -> CPUKernels | None:
    """The kernels, where they apply to ``x``: a CPU tensor of a dtype they take, outside
    autograd (they have no backward)."""
    if x.device.type != "cpu" or torch.is_grad_enabled():
        return None
    kernels = load_cpu_kernel()
    return kernels if kernels is not None and kernels.supports(x.dtype) else None
