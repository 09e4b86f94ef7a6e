"""Continuous batching: requests, the scheduling policy, and the engine loop.

Torch-free: the engine reaches the model only through the :class:`Executor` protocol.
"""

from pagedkv.scheduler.engine import ConcurrentStepError, Executor, LLMEngine
from pagedkv.scheduler.outputs import (
    EngineStats,
    RequestMetrics,
    RequestOutput,
    SampledTokens,
    ScheduledRequest,
    SchedulerOutput,
    SequenceOutput,
    TokenLogprobs,
)
from pagedkv.scheduler.params import EngineConfig, SamplingParams
from pagedkv.scheduler.request import FinishReason, Request, RequestStatus
from pagedkv.scheduler.scheduler import Scheduler

__all__ = [
    "ConcurrentStepError",
    "EngineConfig",
    "EngineStats",
    "Executor",
    "FinishReason",
    "LLMEngine",
    "Request",
    "RequestMetrics",
    "RequestOutput",
    "RequestStatus",
    "SampledTokens",
    "SamplingParams",
    "ScheduledRequest",
    "Scheduler",
    "SchedulerOutput",
    "SequenceOutput",
    "TokenLogprobs",
]
