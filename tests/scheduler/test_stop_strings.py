"""Stop strings (issue 15, point 8): vLLM's semantics, streamed correctly across token
boundaries, and the sequence finished in the scheduler with its blocks freed."""

from __future__ import annotations

import pytest

from pagedkv.errors import InvalidRequestError
from pagedkv.scheduler import EngineConfig, FinishReason, LLMEngine, RequestOutput, SamplingParams
from pagedkv.scheduler.sampling_params import MAX_STOP_STRING_LENGTH, MAX_STOP_STRINGS
from tests.helpers import PieceTokenizer, RecordingExecutor, ScriptedExecutor, assert_drained

PIECES = {
    0: "~", 1: "Hel", 2: "lo", 3: " wor", 4: "ld", 5: "!", 6: "STOP", 7: "x", 8: "",
    9: "S", 10: "TO", 11: "P", 12: "a;b", 13: "abcd", 14: "ST",
}
PROMPT = [3, 4, 5]


def engine_for(*scripts: list[int], num_blocks: int = 64) -> LLMEngine:
    return LLMEngine(ScriptedExecutor(list(scripts)), EngineConfig(block_size=4, num_blocks=num_blocks),
                     tokenizer=PieceTokenizer(PIECES))


def run(engine: LLMEngine, stop, max_tokens: int = 8, n: int = 1) -> list[RequestOutput]:
    """Every output of one request, checked for the streaming invariants."""
    engine.add_request("r", PROMPT, SamplingParams(max_tokens=max_tokens, n=n, stop=stop, ignore_eos=True))
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    assert_streamed_right(outputs, (stop,) if isinstance(stop, str) else stop)
    assert_drained(engine)
    return outputs


def assert_streamed_right(outputs: list[RequestOutput], stop) -> None:
    """Per sequence: the new_text add up to text at every output and to the final text at
    the end; no new_text holds a stop string; nothing streams after the sequence ended."""
    assert outputs[-1].finished and all(not o.finished for o in outputs[:-1])
    for index in range(len(outputs[-1].outputs)):
        streamed, ended = "", False
        for out in outputs:
            if index >= len(out.outputs):
                continue
            seq = out.outputs[index]
            assert not any(s in seq.new_text for s in stop), seq.new_text
            assert not (ended and (seq.new_text or seq.new_token_ids))
            streamed += seq.new_text
            assert seq.text == streamed
            ended = seq.finished
        assert streamed == outputs[-1].outputs[index].text


def test_stop_string_inside_one_token():
    out = run(engine_for([1, 2, 3, 4, 5]), " w")[-1]
    assert out.text == "Hello"
    assert out.output_token_ids == [1, 2, 3]  # the token that completed the stop string is kept
    assert out.finish_reason is FinishReason.STOP


def test_text_after_the_stop_string_in_the_same_token_is_dropped():
    out = run(engine_for([1, 12, 5]), ";")[-1]
    assert (out.text, out.output_token_ids, out.finish_reason) == ("Hela", [1, 12], FinishReason.STOP)


def test_stop_string_spanning_two_tokens():
    outputs = run(engine_for([1, 2, 3, 4, 5]), "lo w")
    assert (outputs[-1].text, outputs[-1].output_token_ids) == ("Hel", [1, 2, 3])
    # "l" could start "lo w", then "lo" (but no longer the first "l"): held back, never streamed.
    assert [o.new_text for o in outputs] == ["He", "l", ""]


def test_stop_string_spanning_three_tokens():
    outputs = run(engine_for([1, 9, 10, 11, 4]), "STOP")
    assert (outputs[-1].text, outputs[-1].output_token_ids) == ("Hel", [1, 9, 10, 11])
    assert [o.new_text for o in outputs] == ["Hel", "", "", ""]
    assert outputs[-1].finish_reason is FinishReason.STOP


def test_an_empty_piece_in_the_middle_of_a_stop_string():
    """A token may decode to nothing (a partial character): the match spans it."""
    out = run(engine_for([9, 8, 10, 8, 11]), "STOP")[-1]
    assert (out.text, out.output_token_ids) == ("", [9, 8, 10, 8, 11])


def test_stop_string_at_the_very_first_token():
    outputs = run(engine_for([6, 1, 2]), ["nope", "STOP"])
    assert len(outputs) == 1
    assert (outputs[0].text, outputs[0].new_text, outputs[0].output_token_ids) == ("", "", [6])
    assert outputs[0].finish_reason is FinishReason.STOP


def test_stop_string_never_appears_runs_to_max_tokens():
    outputs = run(engine_for([1, 2, 3, 4, 5, 9]), ["zz", "Hello!", "STOP"], max_tokens=6)
    assert outputs[-1].text == "Hello world!S"
    assert outputs[-1].output_token_ids == [1, 2, 3, 4, 5, 9]
    assert outputs[-1].finish_reason is FinishReason.LENGTH
    assert outputs[-1].new_text == "S"  # held back while it could start "STOP", released at the end


def test_held_text_is_released_once_it_cannot_match():
    outputs = run(engine_for([9, 10, 7, 5]), "STOP", max_tokens=4)
    assert [o.new_text for o in outputs] == ["", "", "STOx", "!"]
    assert outputs[-1].text == "STOx!"


def test_a_partial_match_followed_by_a_real_one():
    """"ST" is held; "STOP" then starts inside the held text's successor, not at its start."""
    out = run(engine_for([14, 9, 10, 11]), "STOP")[-1]
    assert (out.text, out.finish_reason) == ("ST", FinishReason.STOP)


def test_stop_string_completed_by_the_last_allowed_token_is_a_stop():
    out = run(engine_for([9, 10, 11]), "STOP", max_tokens=3)[-1]
    assert (out.text, out.output_token_ids, out.finish_reason) == ("", [9, 10, 11], FinishReason.STOP)


def test_the_earliest_stop_string_wins():
    assert run(engine_for([1, 13]), ["cd", "b"])[-1].text == "Hela"
    assert run(engine_for([1, 2, 3, 4]), ["ld", "wor"])[-1].text == "Hello "


def test_without_stop_strings_text_streams_as_before():
    outputs = run(engine_for([1, 2, 3, 4, 5]), (), max_tokens=5)
    assert [o.new_text for o in outputs] == ["Hel", "lo", " wor", "ld", "!"]
    assert outputs[-1].finish_reason is FinishReason.LENGTH


def test_n2_sequences_stop_independently():
    engine = engine_for([1, 9, 10, 11, 4, 4, 4, 4], [1, 2, 3, 4, 5, 7, 7, 7])
    outputs = run(engine, ["STOP", "!"], n=2, max_tokens=8)
    first, second = outputs[-1].outputs
    assert (first.text, first.output_token_ids, first.finish_reason) == ("Hel", [1, 9, 10, 11], FinishReason.STOP)
    assert (second.text, second.output_token_ids, second.finish_reason) == (
        "Hello world", [1, 2, 3, 4, 5], FinishReason.STOP
    )
    # The first sequence ended a step before the second: its siblings' outputs go on.
    ended = [next(i for i, o in enumerate(outputs) if o.outputs[k].finished) for k in range(2)]
    assert ended == [3, 4]


def test_n2_one_sequence_stops_and_the_other_runs_to_length():
    engine = engine_for([6], [1, 2, 3])
    first, second = run(engine, "STOP", n=2, max_tokens=3)[-1].outputs
    assert (first.text, first.finish_reason) == ("", FinishReason.STOP)
    assert (second.text, second.finish_reason) == ("Hello wor", FinishReason.LENGTH)


def test_abort_releases_held_text():
    engine = engine_for([1, 9, 10, 4])
    engine.add_request("r", PROMPT, SamplingParams(max_tokens=8, stop="STOP"))
    outputs = engine.step() + engine.step()
    assert [o.new_text for o in outputs] == ["Hel", ""]
    engine.abort("r")
    outputs += engine.step()
    assert_streamed_right(outputs, ("STOP",))
    assert (outputs[-1].text, outputs[-1].finish_reason) == ("HelS", FinishReason.ABORT)
    assert_drained(engine)


def test_generate_returns_the_trimmed_text_and_the_engine_keeps_serving():
    engine = engine_for([1, 2, 3, 4, 5], num_blocks=8)
    for _ in range(3):  # the stopped requests' blocks come back each time
        [out] = engine.generate([PROMPT * 4], SamplingParams(max_tokens=5, stop=["wor"], ignore_eos=True))
        assert (out.text, out.finish_reason) == ("Hello ", FinishReason.STOP)
        assert_drained(engine)
    assert engine.executor.plans[-1].finished_seq_ids == []  # type: ignore[attr-defined]


def test_stopped_sequence_ids_reach_the_executor():
    """The executor is told to drop the stopped sequence's state, as for any finish."""
    engine = engine_for([6, 1])
    run(engine, "STOP")
    engine.add_request("next", PROMPT, SamplingParams(max_tokens=1))
    engine.step()
    assert engine.executor.plans[-1].finished_seq_ids == ["r"]  # type: ignore[attr-defined]
    assert_drained(engine)


def test_tiny_model_greedy_matches_the_unstopped_run(make_engine):
    """The real model, greedy: with a stop string taken from the unstopped text, the
    output is that run cut before the first occurrence, and the tokens up to the one
    that completed it."""
    pieces = {t: ["ab", "c", "", "abc", "b", "ca", "x"][t % 7] for t in range(256)}
    params = {"temperature": 0.0, "max_tokens": 40, "ignore_eos": True}
    engine = make_engine(block_size=4, num_blocks=64)
    engine.tokenizer = PieceTokenizer(pieces)
    [full] = engine.generate([[5, 6, 7]], params)
    text, tokens = full.text, full.output_token_ids
    assert full.finish_reason is FinishReason.LENGTH and len(tokens) == 40
    for stop in {text[10:13], text[20:22], text[30:34], "zz"}:
        outputs: list[RequestOutput] = []
        [out] = engine.generate([[5, 6, 7]], {**params, "stop": [stop]}, on_output=outputs.append)
        assert_streamed_right(outputs, (stop,))
        cut = text.find(stop)
        if cut < 0:
            assert (out.text, out.output_token_ids, out.finish_reason) == (text, tokens, FinishReason.LENGTH)
            continue
        assert out.text == text[:cut] and out.finish_reason is FinishReason.STOP
        # The tokens are a prefix of the full run's, ending with the one whose text completed the stop string.
        k = len(out.output_token_ids)
        assert out.output_token_ids == tokens[:k]
        decoded = "".join(pieces[t] for t in tokens[:k])
        assert stop in decoded and stop not in decoded[: len(decoded) - len(pieces[tokens[k - 1]])]


# ---- validation ----------------------------------------------------------------------


def test_stop_is_kept_as_a_tuple():
    assert SamplingParams(stop="ab").stop == ("ab",)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    assert SamplingParams(stop=("a",)).stop == ("a",)
    assert SamplingParams().stop == ()
    hash(SamplingParams(stop=["a"]))
    assert SamplingParams(stop="x", n=2).for_sequence(1).stop == ("x",)
    SamplingParams(stop=["a" * MAX_STOP_STRING_LENGTH] * MAX_STOP_STRINGS)  # the bounds themselves are fine


@pytest.mark.parametrize(
    "stop",
    ["", [""], ["ok", ""], ["a" * (MAX_STOP_STRING_LENGTH + 1)], ["a"] * (MAX_STOP_STRINGS + 1), [1], 5, None,
     {"a"}, b"ab", [b"a"], [["a"]]],
)
def test_bad_stop_values_are_refused_by_name(stop):
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams(stop=stop)
    assert err.value.param == "stop"
    engine = LLMEngine(RecordingExecutor(), EngineConfig(num_blocks=16), tokenizer=PieceTokenizer(PIECES))
    with pytest.raises(InvalidRequestError) as err:
        engine.add_request("r", PROMPT, {"stop": stop})
    assert err.value.param == "stop"
    assert not engine.has_unfinished_requests()


def test_an_engine_without_a_tokenizer_refuses_stop_strings():
    engine = LLMEngine(RecordingExecutor(), EngineConfig(num_blocks=16))
    with pytest.raises(InvalidRequestError, match="tokenizer") as err:
        engine.add_request("r", PROMPT, SamplingParams(stop=["x"]))
    assert err.value.param == "stop"
    assert not engine.has_unfinished_requests()
    [out] = engine.generate([PROMPT], SamplingParams(max_tokens=2))  # still serves requests without them
    assert out.output_token_ids == [1, 1]
    assert_drained(engine)
