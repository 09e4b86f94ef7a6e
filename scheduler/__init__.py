"""Continuous batching: requests, the scheduling policy, and the engine loop.

Torch-free: the engine reaches the model only through the :class:`Executor` protocol.
"""

from pagedkv.scheduler.admission import AdmissionPolicy, PagedAdmission
from pagedkv.scheduler.config import EngineConfig
from pagedkv.scheduler.engine import ConcurrentStepError, LLMEngine
from pagedkv.scheduler.executor import BulkDecodeExecutor, CacheLayout, Executor, SampledTokens, StepResult
from pagedkv.scheduler.logprobs import TokenLogprobs
from pagedkv.scheduler.outputs import EngineStats, RequestMetrics, RequestOutput, SequenceOutput
from pagedkv.scheduler.plan import ScheduledRequest, SchedulerOutput
from pagedkv.scheduler.request import FinishReason, Request, RequestStatus
from pagedkv.scheduler.sampling_params import SamplingParams
from pagedkv.scheduler.scheduler import Scheduler

__all__ = [
    "AdmissionPolicy",
    "BulkDecodeExecutor",
    "CacheLayout",
    "ConcurrentStepError",
    "EngineConfig",
    "EngineStats",
    "Executor",
    "FinishReason",
    "LLMEngine",
    "PagedAdmission",
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
    "StepResult",
    "TokenLogprobs",
]
