"""Our GPT loads a transformers ``GPT2LMHeadModel`` state dict and computes its logits."""

from __future__ import annotations

import pytest
import torch

from pagedkv.models import GPT, GPTConfig, prefill_logits
from pagedkv.scheduler import SamplingParams

transformers = pytest.importorskip("transformers")

CONFIG = GPTConfig(vocab_size=300, n_positions=128, n_embd=48, n_layer=3, n_head=4, eos_token_id=None)


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    hf_config = transformers.GPT2Config(
        vocab_size=CONFIG.vocab_size, n_positions=CONFIG.n_positions, n_embd=CONFIG.n_embd,
        n_layer=CONFIG.n_layer, n_head=CONFIG.n_head, attn_implementation="eager",
    )
    model = transformers.GPT2LMHeadModel(hf_config).eval()
    with torch.no_grad():  # GPT-2 starts with zero biases and unit LayerNorms; make every parameter count
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def test_state_dict_loads_and_prefill_logits_match(hf_model, tmp_path):
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in hf_model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, tmp_path / "model.safetensors")
    ours = GPT.from_checkpoint(tmp_path / "model.safetensors", CONFIG)
    ids = torch.randint(0, CONFIG.vocab_size, (40,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf_model(ids[None]).logits[0]
    torch.testing.assert_close(prefill_logits(ours, ids.tolist()), expected, atol=1e-4, rtol=1e-4)


def test_engine_greedy_matches_transformers_generate(hf_model, make_engine):
    ours = GPT.from_state_dict(hf_model.state_dict(), CONFIG)
    engine = make_engine(ours, block_size=4, num_blocks=64)
    prompts = [[5, 17, 42], list(range(100, 130)), [299]]
    outputs = engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    for prompt, out in zip(prompts, outputs, strict=True):
        with torch.no_grad():
            ref = hf_model.generate(
                torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0
            )[0, len(prompt) :]
        assert out.output_token_ids == ref.tolist()
