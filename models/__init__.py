"""Models whose attention reads K/V from the paged cache, and what runs them.

``GPT`` (GPT-2 architecture), the attention backends, the sampler, the ``ModelRunner``
that executes a scheduler plan, and the no-cache references used by tests and benchmarks.
"""

from pagedkv.models.attention import ContiguousCacheAttention, DenseAttention, PagedAttention, PagedMetadata
from pagedkv.models.config import GPT_PRESETS, GPTConfig
from pagedkv.models.gpt import GPT
from pagedkv.models.reference import generate_contiguous_cache, generate_no_cache, prefill_logits
from pagedkv.models.runner import ModelRunner, prepare_inputs
from pagedkv.models.sampler import Sampler

__all__ = [
    "GPT",
    "GPT_PRESETS",
    "ContiguousCacheAttention",
    "DenseAttention",
    "GPTConfig",
    "ModelRunner",
    "PagedAttention",
    "PagedMetadata",
    "Sampler",
    "generate_contiguous_cache",
    "generate_no_cache",
    "prefill_logits",
    "prepare_inputs",
]
