"""Bad input gets a clear error naming the field and range, and changes nothing: the queues,
the pool, the block tables and the requests already in flight are exactly as before."""

from __future__ import annotations

import pytest

from pagedkv.errors import InvalidRequestError
from pagedkv.models import generate_no_cache
from pagedkv.scheduler import EngineConfig, FinishReason, SamplingParams
from tests.helpers import random_prompts


def engine_state(engine):
    kv = engine.kv_manager
    tables = {rid: (list(t.blocks), t.num_tokens) for rid, t in kv._tables.items()}
    requests = {
        rid: (r.status, r.num_computed_tokens, list(r.token_ids)) for rid, r in engine.scheduler.requests.items()
    }
    return (
        kv.pool.snapshot(),
        tables,
        requests,
        [r.request_id for r in engine.scheduler.waiting],
        [r.request_id for r in engine.scheduler.running],
    )


@pytest.fixture
def busy_engine(make_engine, tiny_model):
    """An engine mid-generation: some requests running, some waiting."""
    engine = make_engine(block_size=4, num_blocks=40, max_num_seqs=2)
    prompts = random_prompts(seed=5, n=4, vocab=tiny_model.vocab_size, min_len=5, max_len=20)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, params)
    for _ in range(3):
        engine.step()
    expected = {f"r{i}": generate_no_cache(tiny_model, p, 12) for i, p in enumerate(prompts)}
    return engine, expected


def finish_and_check(engine, expected):
    """The requests in flight before the refused ones still produce the reference tokens."""
    got: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                got[out.request_id] = out.output_token_ids
    assert {rid: got[rid] for rid in expected} == expected


BAD_SAMPLING = [
    ({"temperature": -0.1}, "temperature", "greater than or equal to 0"),
    ({"temperature": 2.5}, "temperature", "less than or equal to 2"),
    ({"temperature": float("nan")}, "temperature", "finite number"),
    ({"temperature": float("inf")}, "temperature", "finite number"),
    ({"top_p": 0.0}, "top_p", "greater than 0"),
    ({"top_p": 1.5}, "top_p", "less than or equal to 1"),
    ({"top_k": -2}, "top_k", "greater than or equal to -1"),
    ({"max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
    ({"seed": -1}, "seed", "greater than or equal to 0"),
    ({"seed": 2**63}, "seed", "less than 9223372036854775808"),
    ({"max_tokens": True}, "max_tokens", "integer"),
    ({"top_k": "3"}, "top_k", "integer"),
    ({"stop_token_ids": [-4]}, "stop_token_ids", "greater than or equal to 0"),
    ({"temperature": 0.5, "best_of": 2}, "best_of", "not permitted"),
]


@pytest.mark.parametrize("bad, field, allowed", BAD_SAMPLING)
def test_bad_sampling_params_name_field_and_range(busy_engine, bad, field, allowed):
    engine, expected = busy_engine
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams(**bad)
    assert err.value.param == field
    assert field in str(err.value) and allowed in str(err.value)
    before = engine_state(engine)
    with pytest.raises(InvalidRequestError) as err:
        engine.add_request("new", [1, 2, 3], bad)
    assert err.value.param == field
    assert engine_state(engine) == before
    finish_and_check(engine, expected)


@pytest.mark.parametrize(
    "request_id, prompt, params, message, param",
    [
        ("new", [], None, "empty", "prompt"),
        ("new", [1, -1, 2], None, "-1 is outside the vocabulary [0, 256)", "prompt"),
        ("new", [1, 256], None, "256 is outside the vocabulary [0, 256)", "prompt"),
        ("new", [1, 2.5], None, "integer token ids", "prompt"),
        ("new", "hello", None, "no tokenizer", "prompt"),
        ("new", b"abc", None, "list of integer token ids", "prompt"),
        ("new", {1: 2}, None, "list of integer token ids", "prompt"),
        ("new", [1, True], None, "non-integers", "prompt"),
        ("", [1, 2], None, "non-empty string", "request_id"),
        ("new", [1, 2], SamplingParams(stop_token_ids=[999]), "stop_token_ids: 999", "stop_token_ids"),
        ("r0", [1, 2], None, "already in use", "request_id"),
        (7, [1, 2], None, "request_id must be a non-empty string", "request_id"),
        ("new", [1] * 500, SamplingParams(max_tokens=13), "exceeds max_model_len (512)", "max_tokens"),
        ("new", [1] * 512, SamplingParams(max_tokens=1), "exceeds max_model_len (512)", "prompt"),
        ("new", [1] * 150, SamplingParams(max_tokens=20), "the pool has only 40", "max_tokens"),
        ("new", [1, 2], "greedy", "sampling_params must be SamplingParams", "sampling_params"),
    ],
)
def test_bad_request_is_refused_and_changes_nothing(busy_engine, request_id, prompt, params, message, param):
    engine, expected = busy_engine
    before = engine_state(engine)
    with pytest.raises(InvalidRequestError) as err:
        engine.add_request(request_id, prompt, params)
    assert message in str(err.value)
    assert err.value.param == param
    assert engine_state(engine) == before
    finish_and_check(engine, expected)


def test_request_exactly_at_the_limits_is_accepted(make_engine):
    """The checks are tight, not off by one: prompt + max_tokens == max_model_len fits, and
    the last sampled token needs no slot."""
    engine = make_engine(block_size=4, num_blocks=5, max_model_len=21)
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    out = engine.generate([[3] * 16], params)[0]  # 16 + 5 - 1 = 20 slots = 5 blocks
    assert len(out.output_token_ids) == 5
    with pytest.raises(InvalidRequestError, match="max_model_len"):
        engine.add_request("long", [3] * 17, params)


@pytest.mark.parametrize(
    "config, field",
    [
        ({"block_size": 0}, "block_size"),
        ({"num_blocks": 0}, "num_blocks"),
        ({"max_num_seqs": 0}, "max_num_seqs"),
        ({"max_num_batched_tokens": 0}, "max_num_batched_tokens"),
        ({"gpu_memory_fraction": 1.5}, "gpu_memory_fraction"),
        ({"num_blocks": 8, "kv_cache_memory_bytes": 4096}, "at most one of"),
        ({"block_size": 4.0}, "block_size"),
        ({"seed": 2**64}, "seed"),
        ({"blocksize": 4}, "blocksize"),
    ],
)
def test_bad_engine_config_names_the_field(config, field):
    with pytest.raises(InvalidRequestError, match=field.replace("(", r"\(")):
        EngineConfig(**config)


def test_max_model_len_beyond_the_model_is_refused(make_engine):
    with pytest.raises(ValueError, match="exceeds the model's context length"):
        make_engine(num_blocks=8, max_model_len=10_000)


def test_memory_budget_too_small_for_one_block(make_engine):
    with pytest.raises(ValueError, match="holds no block"):
        make_engine(kv_cache_memory_bytes=100)


def test_generate_refuses_bad_prompt_and_leaves_nothing_behind(make_engine):
    engine = make_engine(num_blocks=16)
    with pytest.raises(InvalidRequestError):
        engine.generate([[1, 2, 3], []], SamplingParams(max_tokens=2))
    assert not engine.has_unfinished_requests()


def test_prompt_as_array_or_tuple_is_accepted(make_engine):
    import numpy as np
    import torch

    engine = make_engine(num_blocks=16)
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    expected = engine.generate([[4, 5, 6]], params)[0].output_token_ids
    for prompt in ((4, 5, 6), np.array([4, 5, 6]), torch.tensor([4, 5, 6])):
        assert engine.generate([prompt], params)[0].output_token_ids == expected


@pytest.mark.parametrize(
    "text, size", [("256MiB", 256 * 2**20), ("2GiB", 2 * 2**30), ("1.5GB", 1_500_000_000), ("4096", 4096)]
)
def test_memory_sizes_take_units(text, size):
    config = EngineConfig(kv_cache_memory_bytes=text, swap_space_bytes=text)
    assert config.kv_cache_memory_bytes == size and config.swap_space_bytes == size


@pytest.mark.parametrize("bad", ["lots", "12 parsecs", True, 1.5, "-1MiB"])
def test_bad_memory_size_names_the_field(bad):
    with pytest.raises(InvalidRequestError, match="kv_cache_memory_bytes"):
        EngineConfig(kv_cache_memory_bytes=bad)


def test_stop_token_ids_are_bounded_and_the_longest_list_allowed_works(engine_with):
    """Issue 15: a request's stop ids are checked for every token it generates, so their
    number is bounded; a list at the bound is served, one id more is refused by name."""
    from pagedkv.scheduler.sampling_params import MAX_STOP_TOKEN_IDS

    engine, executor = engine_with(num_blocks=64)
    executor.vocab_size = 2 * MAX_STOP_TOKEN_IDS  # room for that many distinct ids
    never = list(range(2, MAX_STOP_TOKEN_IDS + 2))  # the executor samples only token 1
    ending = never[:-1] + [1]
    outs = engine.generate(
        [[5, 6], [5, 6]],
        [SamplingParams(max_tokens=4, stop_token_ids=never), SamplingParams(max_tokens=4, stop_token_ids=ending)],
    )
    assert [(o.output_token_ids, o.outputs[0].finish_reason) for o in outs] == [
        ([1, 1, 1, 1], FinishReason.LENGTH),
        ([1], FinishReason.STOP),
    ]
    too_many = list(range(MAX_STOP_TOKEN_IDS + 1))
    with pytest.raises(InvalidRequestError) as err:
        engine.add_request("long", [5, 6], {"stop_token_ids": too_many})
    assert err.value.param == "stop_token_ids"
    assert str(MAX_STOP_TOKEN_IDS) in str(err.value)
    assert len(str(err.value)) < 500  # the refused list is not echoed whole


class _CountingTuple(tuple):
    """Stop ids that count how often they are scanned."""

    scans = 0

    def __contains__(self, item: object) -> bool:
        type(self).scans += 1
        return super().__contains__(item)

    def __iter__(self):
        type(self).scans += 1
        return super().__iter__()


def test_the_per_token_stop_check_does_not_scan_the_stop_ids(engine_with):
    """Issue 15: the stop ids become a set once per request; generating tokens never
    scans the list again, so a token costs the same however many ids were given."""
    from pagedkv.scheduler.request import Request

    engine, _ = engine_with(num_blocks=64)
    ids = _CountingTuple(range(2, 50))
    params = SamplingParams(max_tokens=30).model_copy(update={"stop_token_ids": ids})
    # Straight to the scheduler: add_request would revalidate the ids into a plain tuple.
    engine.scheduler.add_request(Request("r", [5, 6], params, arrival_time=0.0))
    scans_at_admission = _CountingTuple.scans
    assert scans_at_admission <= 1
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    assert outputs[-1].output_token_ids == [1] * 30
    assert _CountingTuple.scans == scans_at_admission


class _StrictTokenizer:
    """Encodes like ``tokenizers`` does: text with no UTF-8 form is a TypeError."""

    chat_template = None

    def encode(self, text: str) -> list[int]:
        try:
            return [b % 100 for b in text.encode("utf-8")]
        except UnicodeEncodeError:
            raise TypeError("TextEncodeInput must be Union[TextInputSequence, ...]") from None

    def detokenizer(self) -> _StrictTokenizer:
        return self

    def step(self, token_id: int) -> str:
        return chr(token_id)


@pytest.mark.parametrize("text", ["a\ud800b", "\udfff", "ok \ud83d"])
def test_a_lone_surrogate_in_a_text_prompt_is_refused_by_name(engine_with, text):
    """Issue 15: the tokenizer's TypeError came out of add_request; it is now an
    InvalidRequestError naming the prompt, and nothing was queued."""
    engine, _ = engine_with(num_blocks=16)
    engine.tokenizer = _StrictTokenizer()
    with pytest.raises(InvalidRequestError, match="lone surrogate") as err:
        engine.add_request("s", text, {"max_tokens": 2})
    assert err.value.param == "prompt"
    assert not engine.has_unfinished_requests()
    [out] = engine.generate(["a\U0001f389b"], {"max_tokens": 2})  # a whole emoji (a pair in UTF-16) is fine
    assert out.output_token_ids == [1, 1]
