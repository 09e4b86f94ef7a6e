"""Token logprobs (``SamplingParams.logprobs``, issue 15 point 8): asking for them changes no
token; they are the model's raw log-probabilities (those of the no-cache reference), whether
the prompt was prefilled whole or in chunks; forks (n > 1) get their own; the streamed
``new_logprobs`` add up to ``logprobs``; bad values are refused; executors that compute none
(fakes, the simulator) still serve requests that ask."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from pagedkv.errors import InvalidRequestError
from pagedkv.models import prefill_logits
from pagedkv.scheduler import EngineConfig, LLMEngine, RequestOutput, SamplingParams
from tests.helpers import ScriptedExecutor, random_prompts


def reference_logprobs(model, prompt: list[int], output: list[int]) -> torch.Tensor:
    """``log_softmax`` of the dense no-cache logits predicting each output token ([len(output), V])."""
    with torch.inference_mode():
        logits = prefill_logits(model, prompt + output[:-1])
    return torch.log_softmax(logits[len(prompt) - 1 :].float(), dim=-1)


def check_against_reference(model, prompt: list[int], out, k: int) -> None:
    ref = reference_logprobs(model, prompt, out.output_token_ids)
    assert out.logprobs is not None and len(out.logprobs) == len(out.output_token_ids)
    for i, (token, lp) in enumerate(zip(out.output_token_ids, out.logprobs, strict=True)):
        assert lp.logprob == pytest.approx(float(ref[i, token]), abs=1e-4)
        assert len(lp.top) == k
        assert [t for t, _ in lp.top] == ref[i].topk(k).indices.tolist()
        for t, v in lp.top:
            assert v == pytest.approx(float(ref[i, t]), abs=1e-4)


@pytest.mark.parametrize("chunked", [False, True])
def test_logprobs_change_no_token_and_match_the_reference(make_engine, tiny_model, chunked: bool) -> None:
    prompts = random_prompts(7, 5, tiny_model.vocab_size, min_len=3, max_len=30)
    config = {"block_size": 4, "num_blocks": 200}
    if chunked:  # prompts prefilled in chunks of at most 6 tokens beside running decodes
        config |= {"max_num_batched_tokens": 6}
    engine = make_engine(**config)
    plain = [SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True),
             SamplingParams(temperature=0.9, top_k=20, seed=11, max_tokens=6, ignore_eos=True)]
    for base in plain:
        without = engine.generate(prompts, base)
        streamed: dict[str, list] = {}

        def collect(out: RequestOutput, streamed: dict[str, list] = streamed) -> None:
            assert out.sole.new_logprobs is not None
            assert len(out.sole.new_logprobs) == len(out.sole.new_token_ids)
            streamed.setdefault(out.request_id, []).extend(out.sole.new_logprobs)

        with_lp = engine.generate(prompts, base.model_copy(update={"logprobs": 3}), on_output=collect)
        for prompt, a, b in zip(prompts, without, with_lp, strict=True):
            assert a.output_token_ids == b.output_token_ids
            assert a.sole.logprobs is None and a.sole.new_logprobs is None
            check_against_reference(tiny_model, prompt, b.sole, 3)
            assert streamed[b.request_id] == b.sole.logprobs
            if base.greedy:
                assert all(lp.logprob == lp.top[0][1] for lp in b.sole.logprobs or [])


def test_logprobs_zero_gives_the_sampled_tokens_only(make_engine, tiny_model) -> None:
    engine = make_engine(block_size=4, num_blocks=50)
    (out,) = engine.generate([[5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, logprobs=0))
    check_against_reference(tiny_model, [5, 6, 7], out.sole, 0)


def test_forks_get_their_own_logprobs(make_engine, tiny_model) -> None:
    prompt = random_prompts(3, 1, tiny_model.vocab_size, min_len=9, max_len=9)[0]
    engine = make_engine(block_size=4, num_blocks=100, max_num_batched_tokens=5)  # chunked prompt, then fork
    params = SamplingParams(temperature=1.0, n=2, seed=5, max_tokens=5, ignore_eos=True, logprobs=2)
    (forked,) = engine.generate([prompt], params)
    for i, seq in enumerate(forked.outputs):
        (alone,) = engine.generate([prompt], params.for_sequence(i))
        assert seq.output_token_ids == alone.output_token_ids
        assert seq.logprobs is not None and alone.sole.logprobs is not None
        for a, b in zip(seq.logprobs, alone.sole.logprobs, strict=True):
            assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
            assert [t for t, _ in a.top] == [t for t, _ in b.top]
        check_against_reference(tiny_model, prompt, seq, 2)


@pytest.mark.parametrize("value", [21, -1, True, "3", 2.0])
def test_bad_logprobs_are_refused(value: Any) -> None:
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(logprobs=value)
    assert e.value.param == "logprobs"


def test_executors_without_logprobs_still_serve_requests_that_ask() -> None:
    """Fakes and the simulator return plain token tuples: the request runs, with no logprobs."""
    engine = LLMEngine(ScriptedExecutor([[4, 5, 6], [7, 8, 9]]), EngineConfig(block_size=4, num_blocks=20))
    (out,) = engine.generate([[1, 2]], SamplingParams(max_tokens=3, n=2, ignore_eos=True, logprobs=2))
    assert [s.output_token_ids for s in out.outputs] == [[4, 5, 6], [7, 8, 9]]
    assert all(s.logprobs is None and s.new_logprobs is None for s in out.outputs)
