"""The ``pagedkv`` command line: demo, generate, chat, and clean errors for bad arguments.

The commands load their model through ``pagedkv.cli.demo.load_engine``; the tests hand them the
session's SmolLM2 instead of loading it again.
"""

from __future__ import annotations

import io

import pytest

from pagedkv.models import GPT, ModelRunner
from pagedkv.scheduler import EngineConfig, LLMEngine
from pagedkv import cli
from pagedkv.cli import demo


@pytest.fixture
def engines(monkeypatch, smollm2):
    """Make the CLI's engines from the already loaded models; drain-check them afterwards."""
    from tests.helpers import assert_drained

    made: list[LLMEngine] = []

    def load_engine(name, **config):
        if name == "smollm2-135m":
            model, tokenizer = smollm2
        else:
            model, tokenizer = GPT.from_preset(name, seed=config.get("seed", 0)), None
        made.append(LLMEngine(ModelRunner(model), EngineConfig(**config), tokenizer=tokenizer))
        return made[-1]

    monkeypatch.setattr(demo, "load_engine", load_engine)
    yield made
    for engine in made:
        assert_drained(engine)


def test_generate_streams_one_prompt(engines, capsys):
    assert cli.main(["generate", "--chat", "--max-tokens", "16", "What is the capital of France?"]) == 0
    out, err = capsys.readouterr()
    assert "Paris" in out
    assert "1 requests" in err and "tok/s" in err and "KV pages used" in err


def test_generate_several_prompts_prints_each_and_a_summary(engines, capsys):
    assert cli.main(["generate", "--max-tokens", "8", "--temperature", "0.7", "--seed", "3", "One, two,", "Hello"]) == 0
    out, _ = capsys.readouterr()
    assert "[0]" in out and "[1]" in out
    assert "2 requests" in out and "tok/s" in out


def test_demo_runs_real_prompts_together(engines, capsys):
    assert cli.main(["demo", "--max-tokens", "12"]) == 0
    out, _ = capsys.readouterr()
    assert out.count("Q: ") == len(demo.DEMO_QUESTIONS)
    assert f"{len(demo.DEMO_QUESTIONS)} requests" in out and "KV pages used: peak" in out


def test_demo_on_a_random_weight_model(engines, capsys):
    assert cli.main(["demo", "--model", "tiny", "--max-tokens", "6"]) == 0
    assert "6 requests" in capsys.readouterr().out


def test_chat_keeps_the_conversation(engines, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("What is the capital of France?\nAnd of Italy?\n\n"))
    assert cli.main(["chat", "--max-tokens", "24"]) == 0
    out, _ = capsys.readouterr()
    assert out.count("bot> ") == 2
    assert "Paris" in out and "Rome" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "--max-tokens", "0", "hi"], "max_tokens must be >= 1"),
        (["generate", "--temperature", "5", "hi"], "temperature must be a finite number in [0, 2]"),
        (["demo", "--block-size", "0"], "block_size"),
        (["generate", "--model", "tiny", "hi"], "has no tokenizer"),
    ],
)
def test_bad_arguments_exit_2_with_a_message(engines, capsys, argv, message):
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


def test_unknown_model_is_named(capsys):
    assert cli.main(["generate", "--model", "nope", "hi"]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err


def test_sim_engine_flags_reach_the_engine_config():
    from pagedkv.cli import build_parser
    from pagedkv.cli.sim import engine_from

    args = build_parser().parse_args(["sim", "run", "--preemption-mode", "swap", "--swap-space", "64MiB",
                                      "--no-chunked-prefill", "--no-prefix-caching"])
    config = engine_from(args)
    assert (config.preemption_mode, config.swap_space_bytes) == ("swap", 64 * 2**20)
    assert not config.enable_chunked_prefill and not config.enable_prefix_caching
