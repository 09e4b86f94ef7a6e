"""Continuous batching: requests, the scheduling policy, and the engine loop.

Torch-free: the engine reaches the model only through the :class:`Executor` protocol.
"""

from scheduler.engine import Executor, LLMEngine
from scheduler.outputs import (
    EngineStats,
    RequestMetrics,
    RequestOutput,
    ScheduledRequest,
    SchedulerOutput,
    SequenceOutput,
)
from scheduler.params import EngineConfig, SamplingParams
from scheduler.request import FinishReason, InvalidRequestError, Request, RequestStatus
from scheduler.scheduler import Scheduler

__all__ = [
    "EngineConfig",
    "EngineStats",
    "Executor",
    "FinishReason",
    "InvalidRequestError",
    "LLMEngine",
    "Request",
    "RequestMetrics",
    "RequestOutput",
    "RequestStatus",
    "SamplingParams",
    "ScheduledRequest",
    "Scheduler",
    "SchedulerOutput",
    "SequenceOutput",
]
