"""models.layers.Linear computes exactly what nn.Linear does, whichever way it takes, and its
prepacked weight follows every change of the weight; the C passes for RMSNorm and RoPE equal
torch's."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from pagedkv.models.cpu_kernel import CPUKernels, load_cpu_kernel
from pagedkv.models.layers import KERNEL_ROWS, Linear, RMSNorm
from pagedkv.models.llama import RotaryEmbedding, rotate
from tests.helpers import needs_cpu_kernel


def tolerance(dtype: torch.dtype) -> dict[str, Any]:
    return {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {}


@pytest.mark.parametrize("grad", [False, True], ids=["inference", "autograd"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_matches_f_linear_for_every_row_count(bias: bool, dtype: torch.dtype, grad: bool,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Every row count, whichever way it takes: the CPU kernel up to KERNEL_ROWS (where this
    build has one for the dtype), oneDNN past it, F.linear under autograd."""
    torch.manual_seed(0)
    layer = Linear(48, 80, bias=bias).to(dtype)
    kernel_rows: list[int] = []
    multiply = CPUKernels.linear

    def counted(self: CPUKernels, x: torch.Tensor, *rest: Any) -> torch.Tensor:
        kernel_rows.append(len(x))
        return multiply(self, x, *rest)

    monkeypatch.setattr(CPUKernels, "linear", counted)
    row_counts = (1, 2, 3, 8, 12, 13, 17, 40, 64, 100, 129, 300)  # kernel's row blocks, then oneDNN's
    for rows in row_counts:
        x = torch.randn(rows, 48).to(dtype)
        with torch.set_grad_enabled(grad):
            out = layer(x)
        expected = torch.nn.functional.linear(x, layer.weight, layer.bias)
        assert out.shape == (rows, 80) and out.is_contiguous()
        torch.testing.assert_close(out, expected, **tolerance(dtype))
    assert (layer._packing is not None) == (not grad)  # the packed paths ran without autograd only
    if layer._packing is not None:
        kernels = load_cpu_kernel()
        has_kernel = kernels is not None and kernels.pack_linear(layer.weight) is not None
        assert (layer._packing.tiles is not None) == has_kernel
        if has_kernel:  # the small row counts through the kernel, the large ones (at least one of each) not
            assert kernel_rows == [r for r in row_counts if r <= KERNEL_ROWS] and 1 in kernel_rows
            assert 300 not in kernel_rows
        else:
            assert kernel_rows == []
        assert layer._packing.onednn is not None  # past KERNEL_ROWS
    else:
        assert kernel_rows == []


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("n", "k"), [(1, 2), (16, 48), (33, 64), (80, 576), (40, 1536)])
def test_linear_kernel_sums_in_float32_and_rounds_once(dtype: torch.dtype, n: int, k: int) -> None:
    """The kernel's product is the exact one (float64) within the error bound of a float32 sum
    of k + 1 terms (k * 2**-24 times the sum of the terms' magnitudes), plus, in bfloat16, one
    rounding of the result (2**-8 relative). Row counts cross its 12-row blocks, column counts
    its 16- and 32-column tiles (masked stores past n); with and without a bias."""
    kernels = load_cpu_kernel()
    assert kernels is not None
    torch.manual_seed(n * k)
    weight = torch.randn(n, k).to(dtype)
    packed = kernels.pack_linear(weight)
    if packed is None:
        pytest.skip(f"this build has no linear kernel for {dtype}")
    for rows in (1, 5, 12, 13, 25):
        x = torch.randn(rows, k).to(dtype)
        for bias in (None, torch.randn(n).to(dtype)):
            extra = torch.zeros(n, dtype=torch.float64) if bias is None else bias.double()
            exact = x.double() @ weight.double().T + extra
            magnitudes = x.double().abs() @ weight.double().abs().T + extra.abs()
            bound = (k + 1) * 2.0**-24 * magnitudes + (2.0**-8 * exact.abs() if dtype == torch.bfloat16 else 0)
            got = kernels.linear(x, packed, bias, n)
            assert got.shape == (rows, n) and got.dtype == dtype
            assert ((got.double() - exact).abs() <= bound * 1.01).all()


def test_linear_without_a_kernel_for_the_shape_takes_onednn() -> None:
    """bfloat16 with an odd number of inputs has no kernel layout (pairs): oneDNN multiplies."""
    torch.manual_seed(7)
    layer = Linear(47, 20).to(torch.bfloat16)
    x = torch.randn(3, 47).to(torch.bfloat16)
    with torch.inference_mode():
        out = layer(x)
    assert layer._packing is not None and layer._packing.tiles is None
    torch.testing.assert_close(out, torch.nn.functional.linear(x, layer.weight, layer.bias))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_weight_follows_casts_in_place_writes_and_new_weights(dtype: torch.dtype) -> None:
    torch.manual_seed(1)
    layer = Linear(32, 24).to(dtype)
    x = torch.randn(5, 32).to(dtype)

    def check() -> None:
        with torch.inference_mode():
            out = layer(x.to(layer.weight.dtype))
        expected = torch.nn.functional.linear(x.to(layer.weight.dtype), layer.weight, layer.bias)
        torch.testing.assert_close(out, expected, **tolerance(layer.weight.dtype))

    check()
    with torch.no_grad():
        layer.weight.mul_(-2.0)  # in place
    check()
    layer.weight = torch.nn.Parameter(torch.randn(24, 32).to(dtype))  # a new tensor
    check()
    other = torch.float32 if dtype == torch.bfloat16 else torch.bfloat16
    layer.to(other)  # cast: new storage in another dtype
    check()
    with torch.inference_mode():  # batched leading dimensions keep their shape
        assert layer(torch.randn(2, 3, 32).to(other)).shape == (2, 3, 24)


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_kernel_matches_torch_with_and_without_the_residual_add(dtype: torch.dtype) -> None:
    """The C pass equals torch.nn.RMSNorm (float32 to 1e-6; bfloat16 to one rounding step),
    and the fused add equals the add then the norm, its sum landing in the residual."""
    torch.manual_seed(2)
    norm = RMSNorm(576, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(576))
    reference = torch.nn.RMSNorm(576, eps=1e-5).to(dtype)
    reference.load_state_dict(norm.state_dict())
    x, residual = torch.randn(37, 576).to(dtype) * 3, torch.randn(37, 576).to(dtype)
    close: dict[str, Any] = {"rtol": 1e-6, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 8e-3, "atol": 1e-5}
    with torch.inference_mode():
        torch.testing.assert_close(norm(x), reference(x), **close)
        expected_sum = residual + x
        expected = reference(expected_sum)
        got, got_sum = norm.add_and_norm(x, residual.clone())
    torch.testing.assert_close(got_sum, expected_sum, rtol=0, atol=0)
    torch.testing.assert_close(got, expected, **close)
    with torch.no_grad():  # also without the kernel (autograd off but not inference: same path)
        torch.testing.assert_close(norm.add_and_norm(x, residual.clone())[0], expected, **close)
    got_grad, _ = norm.add_and_norm(x, residual)  # autograd on: PyTorch's own, residual untouched
    torch.testing.assert_close(got_grad.detach(), expected, **close)


def test_rms_norm_without_the_kernels_is_torch_s(monkeypatch: pytest.MonkeyPatch) -> None:
    """No C compiler (load_cpu_kernel() is None): the same results from PyTorch's own ops."""
    monkeypatch.setattr("pagedkv.models.cpu_kernel.load_cpu_kernel", lambda: None)
    torch.manual_seed(3)
    norm, reference = RMSNorm(64, eps=1e-5), torch.nn.RMSNorm(64, eps=1e-5)
    x, residual = torch.randn(5, 64), torch.randn(5, 64)
    with torch.inference_mode():
        got, got_sum = norm.add_and_norm(x, residual)
        torch.testing.assert_close(got_sum, residual + x)
        torch.testing.assert_close(got, reference(residual + x))
        torch.testing.assert_close(norm(x), reference(x))


def test_packed_weight_follows_state_dict_loads_and_explicit_repacks_and_inference_weights() -> None:
    torch.manual_seed(4)
    layer, other = Linear(16, 8), Linear(16, 8)
    x = torch.randn(3, 16)
    with torch.inference_mode():
        layer(x)  # packs
        layer.load_state_dict(other.state_dict())
        torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, other.weight, other.bias))
        layer.weight.data.mul_(0)  # bypasses the version counter ...
        layer.repack()  # ... so it needs this
        torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
        built_inside = Linear(16, 8)  # inference tensors: no version counter
        torch.testing.assert_close(built_inside(x), torch.nn.functional.linear(x, built_inside.weight,
                                                                                built_inside.bias))


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 40])  # 40: halves of 20, a tail off the 16-lane vectors
def test_rope_kernel_rotates_q_and_k_in_place_as_rotate_does(dtype: torch.dtype, head_dim: int) -> None:
    """The kernel rotates the first heads of the fused QKV output in place, as ``rotate`` computes
    (float32 bit for bit; bfloat16 as float32 rounded once), leaves the values alone, and refuses a
    position past its tables before writing anything."""
    torch.manual_seed(6)
    heads, kv_heads, tokens = 6, 2, 11
    rope = RotaryEmbedding(head_dim, 300, 10000.0).to(dtype)
    qkv = torch.randn(tokens, heads + 2 * kv_heads, head_dim).to(dtype)
    positions = torch.randint(0, 300, (tokens,))
    before = qkv.clone()
    with torch.inference_mode():
        rotation = rope(positions)
        assert rotation.kernels is not None
        q, k = rotation(qkv, heads, kv_heads)
    assert q.data_ptr() == qkv.data_ptr() and k.data_ptr() == qkv[:, heads].data_ptr()  # views, in place
    cos, sin = (t.float()[positions].unsqueeze(1) for t in (rope.cos, rope.sin))
    expected = rotate(before[:, : heads + kv_heads].float(), cos, sin).to(dtype)
    assert torch.equal(qkv[:, : heads + kv_heads], expected)
    assert torch.equal(qkv[:, heads + kv_heads :], before[:, heads + kv_heads :])
    kernels = load_cpu_kernel()
    assert kernels is not None
    with pytest.raises(ValueError, match=r"position lies outside \[0, 300\)"):
        kernels.rope_(qkv, heads, torch.tensor([0] * (tokens - 1) + [300]), rope.cos, rope.sin)
    assert torch.equal(qkv[:, : heads + kv_heads], expected)
