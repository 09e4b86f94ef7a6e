"""``pagedkv.LLM``, the offline API vLLM users write: batches, one bare prompt, per-prompt
parameters, chat through the template, the progress bar and refusals."""

from __future__ import annotations

import pytest

from pagedkv import LLM, InvalidRequestError, SamplingParams
from pagedkv.models.reference import generate_no_cache

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny_llm() -> LLM:
    return LLM(model="tiny", block_size=4, num_blocks=128)


def test_generate_matches_the_full_recompute_reference(tiny_llm):
    prompts = [[1, 2, 3], [7] * 13, list(range(40, 61))]
    outputs = tiny_llm.generate(prompts, GREEDY, use_tqdm=False)
    model = tiny_llm.engine.executor.model
    assert [o.outputs[0].output_token_ids for o in outputs] == [generate_no_cache(model, p, 6) for p in prompts]


def test_a_bare_prompt_and_per_prompt_params(tiny_llm):
    [one] = tiny_llm.generate([5, 6, 7], GREEDY, use_tqdm=False)
    assert one.outputs[0].output_token_ids == tiny_llm.generate([[5, 6, 7]], GREEDY, use_tqdm=False)[0].output_token_ids
    short, long = tiny_llm.generate([[1, 2], [1, 2]], [GREEDY.model_copy(update={"max_tokens": 2}), GREEDY],
                                    use_tqdm=False)
    assert len(short.output_token_ids) == 2 and len(long.output_token_ids) == 6
    assert long.output_token_ids[:2] == short.output_token_ids


def test_a_bare_array_or_tensor_is_one_prompt(tiny_llm):
    import numpy as np
    import torch

    want = tiny_llm.generate([[5, 6, 7]], GREEDY, use_tqdm=False)[0].output_token_ids
    for bare in (np.array([5, 6, 7]), torch.tensor([5, 6, 7]), (5, 6, 7)):
        [out] = tiny_llm.generate(bare, GREEDY, use_tqdm=False)
        assert out.output_token_ids == want
    two = tiny_llm.generate(np.array([[5, 6, 7], [5, 6, 7]]), GREEDY, use_tqdm=False)
    assert [o.output_token_ids for o in two] == [want, want]


def test_progress_bar_for_a_batch_and_off_on_request(tiny_llm, capsys):
    tiny_llm.generate([[i + 1] * 3 for i in range(6)], GREEDY)
    err = capsys.readouterr().err
    assert "Processed prompts" in err and "6/6" in err and "output tok/s" in err
    tiny_llm.generate([[i + 1] * 3 for i in range(6)], GREEDY, use_tqdm=False)
    assert "Processed prompts" not in capsys.readouterr().err


def test_bad_input_names_the_field_and_leaves_the_engine_idle(tiny_llm):
    with pytest.raises(InvalidRequestError) as err:
        tiny_llm.generate([[1, 2], [10**9]], GREEDY, use_tqdm=False)
    assert err.value.param == "prompt"
    assert not tiny_llm.engine.has_unfinished_requests()
    with pytest.raises(InvalidRequestError, match="no chat template") as err:
        tiny_llm.chat([{"role": "user", "content": "hi"}])
    assert err.value.param == "messages"
    with pytest.raises(InvalidRequestError) as err:
        LLM(model="no-such-model")
    assert err.value.param == "model"


def test_chat_applies_the_template():
    from pagedkv.models.gguf import smollm2_path

    try:
        smollm2_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    llm = LLM(model="smollm2-135m", dtype="float32", device="cpu")
    params = SamplingParams(temperature=0.0, max_tokens=24)
    question = {"role": "user", "content": "What is the capital of France?"}
    [one] = llm.chat([question], params, use_tqdm=False)
    assert "Paris" in one.outputs[0].text
    answer = {"role": "assistant", "content": one.outputs[0].text}
    follow_up = [question, answer, {"role": "user", "content": "And of Italy?"}]
    again, italy = llm.chat([[question], follow_up], params, use_tqdm=False)
    assert again.outputs[0].text == one.outputs[0].text and "Rome" in italy.outputs[0].text
