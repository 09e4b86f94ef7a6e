"""SmolLM2-135M-Instruct from its GGUF file, against transformers loading the same file:
prefill logits, greedy tokens through the paged engine (small blocks, a pool that forces
preemption, a budget that forces chunking), the tokenizer and the chat template."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pagedkv.errors import InvalidRequestError
from pagedkv.loader import load_model
from pagedkv.models import prefill_logits
from pagedkv.models.gguf import SMOLLM2_INSTALL, smollm2_path, unpermute_rows
from pagedkv.scheduler import SamplingParams

transformers = pytest.importorskip("transformers")

QUESTIONS = [
    "Hi",
    "What is 2+2?",
    "Write a short poem about autumn leaves falling.",
    "Translate 'good morning' to French.",
    "Explain the difference between a list and a tuple in Python, with an example.",
    "def fibonacci(n):",
    "Once upon a time",
    "Name three colors.",
    "Summarise the plot of Romeo and Juliet in two sentences, please, for a child.",
]
STRINGS = [
    "Hello, world!",
    "  leading spaces,\ttabs\n\nand newlines  ",
    "café naïve résumé Ångström façade",
    "emoji 🎉🚀 and a family 👨\u200d👩\u200d👧",
    "def f(x):\n    return x ** 2  # square\n",
    "The year 2024 had 366 days; pi is 3.14159.",
    "<|im_start|>user\nhi<|im_end|>",
    "中文 日本語 한국어 Ελληνικά",
]
NEW_TOKENS = 32


@pytest.fixture(scope="session")
def hf_smollm2(smollm2):
    path = smollm2_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    model.generation_config.eos_token_id = None  # fixed-length runs (a None passed in a GenerationConfig is ignored)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model.eval(), tokenizer


@pytest.fixture(scope="session")
def prompts(smollm2):
    """Chat-formatted and raw prompts of varied length, as token ids."""
    _, tok = smollm2
    texts = [
        tok.apply_chat_template([{"role": "user", "content": q}]) if i % 2 == 0 else q for i, q in enumerate(QUESTIONS)
    ]
    return [tok.encode(t) for t in texts]


def test_prefill_logits_match_transformers(smollm2, hf_smollm2, prompts):
    model, _ = smollm2
    hf, _ = hf_smollm2
    for ids in prompts:
        with torch.no_grad():
            expected = hf(torch.tensor([ids])).logits[0]
        assert (prefill_logits(model, ids) - expected).abs().max() <= 1e-3


def test_greedy_tokens_match_transformers_through_the_paged_engine(smollm2, hf_smollm2, prompts, make_engine):
    """All prompts at once, 4-token blocks, a pool that forces preemption and a token budget
    that chunks the prompts: still transformers' greedy tokens, every one of them."""
    model, _ = smollm2
    hf, _ = hf_smollm2
    expected = []
    for ids in prompts:
        with torch.no_grad():
            out = hf.generate(
                torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0
            )
        expected.append(out[0, len(ids):].tolist())
    assert all(len(e) == NEW_TOKENS for e in expected)
    engine = make_engine(model, block_size=4, num_blocks=64, max_num_batched_tokens=48)
    outputs = engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True))
    assert [o.output_token_ids for o in outputs] == expected
    assert engine.stats().num_preemptions > 0


def test_token_ids_equal_transformers_tokenizer(smollm2, hf_smollm2):
    _, tok = smollm2
    _, hf_tok = hf_smollm2
    for s in STRINGS:
        ids = tok.encode(s)
        assert ids == hf_tok.encode(s, add_special_tokens=False), s
        assert tok.decode(ids, skip_special_tokens=False) == s


def test_digits_are_split_one_by_one(smollm2):
    """llama.cpp's 'smollm' pre-tokenizer: every digit is its own token."""
    _, tok = smollm2
    pieces = tok.tokenizer.encode("in 2024", add_special_tokens=False).tokens
    assert pieces[-4:] == ["2", "0", "2", "4"]


def test_chat_template_matches_transformers(smollm2, hf_smollm2):
    _, tok = smollm2
    _, hf_tok = hf_smollm2
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye?"},
    ]
    for conversation in (messages, messages[1:2]):
        expected = hf_tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        assert tok.apply_chat_template(conversation) == expected


def test_streaming_detokenization_keeps_characters_whole(smollm2):
    _, tok = smollm2
    for s in STRINGS:
        detok = tok.detokenizer()
        pieces = [detok.step(t) for t in tok.encode(s)]
        assert "".join(pieces) == tok.decode(tok.encode(s))
        assert not any("\ufffd" in p for p in pieces)
    detok = tok.detokenizer()
    assert [detok.step(t) for t in tok.encode(" 🎉")] == ["", "", " 🎉"], "the emoji's bytes span three tokens"


def test_engine_takes_text_and_returns_text(smollm2, make_engine):
    model, tok = smollm2
    engine = make_engine(model, block_size=16, num_blocks=64)
    engine.tokenizer = tok
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    streamed = []
    params = SamplingParams(temperature=0.0, max_tokens=24)
    out = engine.generate([prompt], params, on_output=lambda o: streamed.append(o.new_text))[0]
    assert out.text == tok.decode(out.output_token_ids) == "".join(streamed)
    assert "Paris" in out.text
    assert out.finish_reason.value == "stop" and out.output_token_ids[-1] == tok.eos_token_id


def test_parallel_samples_have_their_own_text_and_match_single_requests(smollm2, make_engine):
    """n = 3 with a seed: three different texts, each what a request seeded seed + i says."""
    model, tok = smollm2
    engine = make_engine(model, block_size=16, num_blocks=64)
    engine.tokenizer = tok
    prompt = tok.apply_chat_template([{"role": "user", "content": "Name a colour."}])
    params = SamplingParams(temperature=1.0, n=3, seed=42, max_tokens=10)
    streamed = ["", "", ""]

    def collect(out):
        for s in out.outputs:
            streamed[s.index] += s.new_text

    [out] = engine.generate([prompt], params, on_output=collect)
    texts = [s.text for s in out.outputs]
    assert len(set(texts)) == 3 and texts == streamed
    assert texts == [tok.decode(s.output_token_ids) for s in out.outputs]
    singles = engine.generate([prompt] * 3, [params.for_sequence(i) for i in range(3)])
    assert [o.text for o in singles] == texts


def test_gqa_pages_hold_only_the_kv_heads(smollm2):
    model, _ = smollm2
    spec = model.kv_cache_spec()
    assert (spec.num_layers, spec.num_kv_heads, spec.head_dim) == (30, 3, 64)
    assert spec.bytes_per_block(16) == 2 * 30 * 16 * 3 * 64 * 4  # 3 of 9 heads: a third of an MHA page


def test_unpermute_inverts_llama_cpp_permutation():
    """llama.cpp interleaves each head's two rotary halves; unpermute_rows restores them."""
    heads, head_dim, cols = 3, 8, 5
    hf = np.arange(heads * head_dim * cols, dtype=np.float32).reshape(heads * head_dim, cols)
    gguf = hf.reshape(heads, 2, head_dim // 2, cols).swapaxes(1, 2).reshape(hf.shape)
    assert np.array_equal(unpermute_rows(gguf, heads), hf)


def test_missing_weights_name_the_install_command(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=SMOLLM2_INSTALL):
        smollm2_path()
    with pytest.raises(FileNotFoundError, match=SMOLLM2_INSTALL):
        load_model("smollm2-135m")


def test_a_lone_surrogate_is_refused_before_the_real_tokenizer(smollm2, make_engine):
    """Issue 15: ``tokenizers`` raises TypeError on "a\\ud800b"; the engine refuses it first."""
    model, tok = smollm2
    engine = make_engine(model, block_size=16, num_blocks=8)
    engine.tokenizer = tok
    with pytest.raises(TypeError):
        tok.encode("a\ud800b")
    with pytest.raises(InvalidRequestError) as err:
        engine.add_request("s", "a\ud800b", SamplingParams(max_tokens=2))
    assert err.value.param == "prompt"
    assert not engine.has_unfinished_requests()
