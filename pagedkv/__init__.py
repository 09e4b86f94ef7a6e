"""pagedkv: an LLM inference engine built around a paged K/V cache and a continuous-batching
scheduler.

    from pagedkv import LLM, SamplingParams
    llm = LLM(model="smollm2-135m")
    outputs = llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=16))

Every public name resolves lazily, on first use, so ``import pagedkv`` stays cheap and
torch-free: the simulator and the command line's help never load torch.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("pagedkv")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"

# public name -> the module that defines it
_EXPORTS = {
    "LLM": "pagedkv.llm",
    "load_engine": "pagedkv.loader",
    "load_model": "pagedkv.loader",
    "MODEL_NAMES": "pagedkv.loader",
    "LLMEngine": "pagedkv.scheduler.engine",
    "EngineConfig": "pagedkv.scheduler.config",
    "SamplingParams": "pagedkv.scheduler.sampling_params",
    "RequestOutput": "pagedkv.scheduler.outputs",
    "SequenceOutput": "pagedkv.scheduler.outputs",
    "EngineStats": "pagedkv.scheduler.outputs",
    "FinishReason": "pagedkv.scheduler.request",
    "AsyncLLMEngine": "pagedkv.server.async_engine",
    "simulate": "pagedkv.sim.api",
    "sweep": "pagedkv.sim.api",
    "run_real": "pagedkv.sim.api",
    "WorkloadConfig": "pagedkv.sim.workload",
    "SLO": "pagedkv.sim.metrics",
    "PagedKVError": "pagedkv.errors",
    "InvalidRequestError": "pagedkv.errors",
    "EngineBusyError": "pagedkv.errors",
    "EngineDeadError": "pagedkv.errors",
    "RequestFailedError": "pagedkv.errors",
}

__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ imports on demand
    # `name as name` marks each one as re-exported (``__all__`` is built from _EXPORTS, which linters can't read)
    from pagedkv.errors import (
        EngineBusyError as EngineBusyError,
        EngineDeadError as EngineDeadError,
        InvalidRequestError as InvalidRequestError,
        PagedKVError as PagedKVError,
        RequestFailedError as RequestFailedError,
    )
    from pagedkv.llm import LLM as LLM
    from pagedkv.loader import MODEL_NAMES as MODEL_NAMES, load_engine as load_engine, load_model as load_model
    from pagedkv.scheduler.config import EngineConfig as EngineConfig
    from pagedkv.scheduler.engine import LLMEngine as LLMEngine
    from pagedkv.scheduler.outputs import (
        EngineStats as EngineStats,
        RequestOutput as RequestOutput,
        SequenceOutput as SequenceOutput,
    )
    from pagedkv.scheduler.request import FinishReason as FinishReason
    from pagedkv.scheduler.sampling_params import SamplingParams as SamplingParams
    from pagedkv.server.async_engine import AsyncLLMEngine as AsyncLLMEngine
    from pagedkv.sim.api import run_real as run_real, simulate as simulate, sweep as sweep
    from pagedkv.sim.metrics import SLO as SLO
    from pagedkv.sim.workload import WorkloadConfig as WorkloadConfig


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pagedkv' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # resolve once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
