"""The K/V storage itself: one K and one V tensor per layer, cut into blocks.

This is the torch half of ``paged/``; the bookkeeping half (pool, tables, manager)
never imports it.

Bytes per block = 2 (K and V) x num_layers x block_size x num_kv_heads x head_dim x
bytes per element. Grouped-query models store only their K/V heads, so their pages shrink
by num_heads / num_kv_heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pagedkv.errors import InvalidRequestError


@dataclass(frozen=True)
class KVCacheSpec:
    """The shape of one token's K/V across the model, as a model reports it."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    def bytes_per_block(self, block_size: int) -> int:
        element = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * block_size * self.num_kv_heads * self.head_dim * element


def resolve_num_blocks(
    spec: KVCacheSpec,
    block_size: int,
    device: torch.device,
    num_blocks: int | None = None,
    memory_bytes: int | None = None,
    gpu_memory_fraction: float | None = None,
) -> int:
    """How many blocks the cache gets: given directly, from a byte budget, or (CUDA only)
    from a fraction of the GPU memory that is free right now."""
    if num_blocks is not None:
        return num_blocks
    if memory_bytes is None and gpu_memory_fraction is not None:
        if device.type != "cuda":
            raise InvalidRequestError(
                "gpu_memory_fraction needs a CUDA device; give num_blocks or kv_cache_memory_bytes",
                "gpu_memory_fraction",
            )
        free, _total = torch.cuda.mem_get_info(device)
        memory_bytes = int(free * gpu_memory_fraction)
    if memory_bytes is None:
        raise InvalidRequestError("give one of num_blocks, kv_cache_memory_bytes or gpu_memory_fraction")
    blocks = memory_bytes // spec.bytes_per_block(block_size)
    if blocks < 1:
        raise InvalidRequestError(
            f"kv_cache_memory_bytes: a budget of {memory_bytes} bytes holds no block "
            f"(one block is {spec.bytes_per_block(block_size)} bytes)",
            "kv_cache_memory_bytes",
        )
    return int(blocks)


class KVCache:
    """Per layer, K and V tensors shaped ``[num_blocks, block_size, num_kv_heads, head_dim]``,
    and the same in CPU memory for ``num_swap_blocks`` swapped-out blocks (pinned when the
    cache is on CUDA). The copies gather the blocks into a temporary first, so today they
    are synchronous; pinning is what a future asynchronous copy needs.

    Zero-initialised on purpose: attention over a padded block table reads slots that
    hold no token; their weights are zero, but ``0 * NaN`` from uninitialised memory
    would still poison the output.
    """

    def __init__(
        self, spec: KVCacheSpec, num_blocks: int, block_size: int, device: torch.device | str, num_swap_blocks: int = 0
    ) -> None:
        self.spec = spec
        self.num_blocks = num_blocks
        self.block_size = block_size
        shape = (num_blocks, block_size, spec.num_kv_heads, spec.head_dim)
        self.keys = [torch.zeros(shape, dtype=spec.dtype, device=device) for _ in range(spec.num_layers)]
        self.values = [torch.zeros(shape, dtype=spec.dtype, device=device) for _ in range(spec.num_layers)]
        swap_shape = (num_swap_blocks, *shape[1:])
        pin = torch.device(device).type == "cuda"
        self.swap_space = [
            torch.zeros(swap_shape, dtype=spec.dtype, device="cpu", pin_memory=pin) for _ in range(2 * spec.num_layers)
        ]

    @property
    def nbytes(self) -> int:
        return self.num_blocks * self.spec.bytes_per_block(self.block_size)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy whole blocks ``src -> dst`` in every layer (copy-on-write)."""
        caches = [*self.keys, *self.values]
        _copy(caches, caches, pairs)

    def swap_out(self, pairs: list[tuple[int, int]]) -> None:
        """Copy device blocks to CPU blocks, ``(device, cpu)`` pairs, in every layer."""
        _copy([*self.keys, *self.values], self.swap_space, pairs)

    def swap_in(self, pairs: list[tuple[int, int]]) -> None:
        """Copy CPU blocks back to device blocks, ``(cpu, device)`` pairs, in every layer."""
        _copy(self.swap_space, [*self.keys, *self.values], pairs)


def _copy(sources: list[torch.Tensor], targets: list[torch.Tensor], pairs: list[tuple[int, int]]) -> None:
    """``target[dst] = source[src]`` for every ``(src, dst)`` pair, layer by layer."""
    if not pairs:
        return
    src = torch.tensor([s for s, _ in pairs], device=sources[0].device)
    dst = torch.tensor([d for _, d in pairs], device=targets[0].device)
    # A copy to the CPU must be complete before the CPU-side indexing reads it.
    non_blocking = targets[0].device.type != "cpu"
    for source, target in zip(sources, targets, strict=True):
        target[dst] = source[src].to(target.device, non_blocking=non_blocking)
