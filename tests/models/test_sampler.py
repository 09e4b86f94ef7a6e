"""The sampler draws from the distribution its parameters describe, and seeds pin it down."""

from __future__ import annotations

import pytest
import torch

from pagedkv.models import Sampler
from pagedkv.scheduler import SamplingParams

VOCAB = 8


def logits_rows(n: int) -> torch.Tensor:
    base = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -1.5])
    return base.expand(n, VOCAB).clone()


def draw(params: SamplingParams, n: int = 4000, seed: int = 0) -> torch.Tensor:
    """``n`` independent draws (one batch row each) from the same logits."""
    tokens = Sampler(torch.device("cpu"), seed)(logits_rows(n), [f"r{i}" for i in range(n)], [params] * n)
    return torch.bincount(torch.tensor(tokens), minlength=VOCAB).float() / n


def test_greedy_takes_the_argmax():
    assert draw(SamplingParams(temperature=0.0), n=10)[0] == 1.0


def test_temperature_matches_the_softmax():
    for t in (0.5, 1.0, 1.7):
        freq = draw(SamplingParams(temperature=t))
        expected = (logits_rows(1)[0] / t).softmax(-1)
        assert (freq - expected).abs().max() < 0.03, (t, freq, expected)


def test_top_k_keeps_only_the_k_best_renormalised():
    freq = draw(SamplingParams(temperature=1.0, top_k=3))
    assert freq[3:].sum() == 0
    expected = logits_rows(1)[0, :3].softmax(-1)
    assert (freq[:3] - expected).abs().max() < 0.03


def test_top_p_keeps_the_smallest_nucleus():
    probs = logits_rows(1)[0].softmax(-1)  # 0.38, 0.23, 0.14, 0.08, ...
    top_p = float(probs[:2].sum()) + 0.01  # needs a third token to reach it
    freq = draw(SamplingParams(temperature=1.0, top_p=top_p))
    assert freq[3:].sum() == 0 and freq[2] > 0
    assert (freq[:3] - probs[:3] / probs[:3].sum()).abs().max() < 0.03


def test_tiny_top_p_or_top_k_one_is_greedy():
    assert draw(SamplingParams(temperature=1.0, top_p=1e-6), n=50)[0] == 1.0
    assert draw(SamplingParams(temperature=1.0, top_k=1), n=50)[0] == 1.0


def test_top_k_larger_than_vocab_is_harmless():
    freq = draw(SamplingParams(temperature=1.0, top_k=10_000))
    assert (freq - logits_rows(1)[0].softmax(-1)).abs().max() < 0.03


def test_mixed_rows_each_follow_their_own_params():
    params = [
        SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, top_k=2), SamplingParams(temperature=1.0)
    ]
    sampler = Sampler(torch.device("cpu"), 0)
    seen: list[set[int]] = [set() for _ in params]
    for _ in range(300):
        for row, token in enumerate(sampler(logits_rows(3), ["a", "b", "c"], params)):
            seen[row].add(token)
    assert seen[0] == {0} and seen[1] == {0, 1} and len(seen[2]) > 3


def test_a_seed_fixes_the_draws_whatever_the_batch():
    """A seeded row draws the same tokens alone or among unseeded rows, under any engine seed."""
    seeded = SamplingParams(temperature=1.0, seed=42)
    sampler_a, sampler_b = Sampler(torch.device("cpu"), 0), Sampler(torch.device("cpu"), 7)
    run_a = [sampler_a(logits_rows(1), ["s"], [seeded])[0] for _ in range(30)]
    crowd = [SamplingParams(temperature=1.0)] * 4
    run_b = [
        sampler_b(logits_rows(5), ["x", "y", "s", "z", "w"], crowd[:2] + [seeded] + crowd[2:])[2] for _ in range(30)
    ]
    assert run_a == run_b
    assert len(set(run_a)) > 1
    other = SamplingParams(temperature=1.0, seed=43)
    sampler_c = Sampler(torch.device("cpu"), 0)
    assert [sampler_c(logits_rows(1), ["s"], [other])[0] for _ in range(30)] != run_a


def test_release_forgets_a_seeded_stream():
    seeded = SamplingParams(temperature=1.0, seed=3)
    sampler = Sampler(torch.device("cpu"), 0)
    first = [sampler(logits_rows(1), ["s"], [seeded])[0] for _ in range(20)]
    sampler.release(["s"])
    again = [sampler(logits_rows(1), ["s"], [seeded])[0] for _ in range(20)]
    assert first == again


def test_a_temperature_below_the_epsilon_is_greedy():
    """Issue 15: 1e-300 is 0 in float32, and dividing by it gave NaN and token 0 every
    time. It now takes exactly the argmax (not token 0 here), alone or beside sampled rows."""
    logits = torch.randn(6, VOCAB, generator=torch.Generator().manual_seed(3))
    logits[:, 0] = -10.0  # token 0 is never the argmax
    expected = logits.argmax(-1).tolist()
    for t in (1e-300, 1e-6):
        tiny = SamplingParams(temperature=t)
        ids = [f"r{i}" for i in range(6)]
        assert Sampler(torch.device("cpu"), 0)(logits, ids, [tiny] * 6) == expected
        assert tiny.greedy
        mixed = [tiny, SamplingParams(temperature=1.0)] * 3
        got = Sampler(torch.device("cpu"), 0)(logits, ids, mixed)
        assert got[0::2] == expected[0::2]
        assert all(0 <= tok < VOCAB for tok in got)


def test_a_small_temperature_still_samples():
    """Above the epsilon the temperature path stays: at 0.01 two logits 0.01 apart are
    drawn about e:1, not always the argmax, and nothing becomes NaN."""
    params = SamplingParams(temperature=0.01)
    assert not params.greedy
    n = 4000
    logits = torch.full((n, VOCAB), -50.0)
    logits[:, 3], logits[:, 5] = 0.01, 0.0
    tokens = torch.tensor(Sampler(torch.device("cpu"), 0)(logits, [f"r{i}" for i in range(n)], [params] * n))
    share = (tokens == 5).float().mean().item()
    assert set(tokens.tolist()) == {3, 5}
    expected = 1 / (1 + torch.e)  # softmax of [0.01, 0] / 0.01 = [1, 0]
    assert abs(share - expected) < 0.03, share


# logprobs (SamplingParams.logprobs)


def test_logprobs_are_the_raw_log_softmax_and_top_n_sorted(tiny_model) -> None:
    """Float32 tiny-model logits: the sampled token's logprob is ``log_softmax(logits)``
    gathered, whatever the temperature, top-k or top-p; the top N are sorted, most likely
    first, and begin with the greedy token; rows that did not ask get None."""
    from pagedkv.models import prefill_logits

    with torch.inference_mode():
        logits = prefill_logits(tiny_model, list(range(1, 9)))  # [8, V]
    assert logits.dtype == torch.float32
    params = [
        SamplingParams(temperature=0.0, logprobs=5),
        SamplingParams(temperature=0.7, top_k=3, logprobs=0),
        SamplingParams(temperature=1.3, top_p=0.5, seed=3, logprobs=20),
        SamplingParams(temperature=1.0),  # asks for none
        SamplingParams(temperature=0.0, logprobs=1),
        SamplingParams(temperature=1.0, logprobs=2),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.5, logprobs=3),
    ]
    sampler = Sampler(torch.device("cpu"), 0)
    tokens = sampler(logits, [f"s{i}" for i in range(8)], params)
    out = sampler.logprobs(logits, tokens, params)
    expected = torch.log_softmax(logits, dim=-1)
    for row, (p, lp) in enumerate(zip(params, out, strict=True)):
        if p.logprobs is None:
            assert lp is None
            continue
        assert lp is not None
        assert lp.logprob == pytest.approx(float(expected[row, tokens[row]]), abs=1e-6)
        assert len(lp.top) == p.logprobs
        ids = [t for t, _ in lp.top]
        values = [v for _, v in lp.top]
        assert values == sorted(values, reverse=True)
        assert ids == expected[row].topk(p.logprobs).indices.tolist()
        for t, v in lp.top:
            assert v == pytest.approx(float(expected[row, t]), abs=1e-6)
        if lp.top:
            assert ids[0] == int(logits[row].argmax())
        if p.greedy:
            assert tokens[row] == int(logits[row].argmax())
            if lp.top:
                assert lp.logprob == lp.top[0][1]  # greedy: the sampled token is the top-1


def test_no_row_asking_costs_nothing() -> None:
    sampler = Sampler(torch.device("cpu"), 0)
    params = [SamplingParams(temperature=0.0)] * 3
    assert sampler.logprobs(logits_rows(3), [0, 0, 0], params) == [None, None, None]
