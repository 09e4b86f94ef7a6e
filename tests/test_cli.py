"""The ``pagedkv`` command line: demo, generate, chat, and clean errors for bad arguments.

The commands load their model through ``pagedkv.loader.load_engine``; the tests hand them the
session's SmolLM2 instead of loading it again.
"""

from __future__ import annotations

import io

import pytest

from pagedkv import cli
from pagedkv.cli import demo
from pagedkv.models import GPT, ModelRunner
from pagedkv.scheduler import EngineConfig, LLMEngine
from pagedkv.sim.workload import LengthDist, WorkloadConfig


@pytest.fixture
def engines(monkeypatch, smollm2):
    """Make the CLI's engines from the already loaded models; drain-check them afterwards."""
    from tests.helpers import assert_drained

    made: list[LLMEngine] = []

    def load_engine(name, dtype=None, **config):
        if name == "smollm2-135m":
            model, tokenizer = smollm2
        else:
            model, tokenizer = GPT.from_preset(name, seed=config.get("seed", 0)), None
        made.append(LLMEngine(ModelRunner(model), EngineConfig(**config), tokenizer=tokenizer))
        return made[-1]

    monkeypatch.setattr("pagedkv.loader.load_engine", load_engine)
    yield made
    for engine in made:
        assert_drained(engine)


def test_generate_streams_one_prompt(engines, capsys):
    assert cli.main(["generate", "--chat", "--max-tokens", "16", "What is the capital of France?"]) == 0
    out, err = capsys.readouterr()
    assert "Paris" in out
    assert "1 requests" in err and "tok/s" in err and "KV pages used" in err


def test_generate_several_prompts_prints_each_and_a_summary(engines, capsys):
    argv = ["generate", "--max-tokens", "8", "--temperature", "0.7", "--sampling-seed", "3", "One, two,", "Hello"]
    assert cli.main(argv) == 0
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
        (["generate", "--max-tokens", "0", "hi"], "max_tokens: Input should be greater than or equal to 1 (got 0)"),
        (["generate", "--temperature", "5", "hi"], "temperature: Input should be less than or equal to 2 (got 5.0)"),
        (["demo", "--block-size", "0"], "block_size: Input should be greater than or equal to 1 (got 0)"),
        (["demo", "--kv-cache-memory-bytes", "lots"], "kv_cache_memory_bytes: could not parse"),
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

    args = build_parser().parse_args(["sim", "run", "--preemption-mode", "swap", "--swap-space-bytes", "64MiB",
                                      "--no-enable-chunked-prefill", "--no-enable-prefix-caching",
                                      "--max-model-len", "512"])
    config = engine_from(args)
    assert (config.preemption_mode, config.swap_space_bytes, config.max_model_len) == ("swap", 64 * 2**20, 512)
    assert not config.enable_chunked_prefill and not config.enable_prefix_caching


def test_flag_defaults_are_the_models_defaults():
    """No flag given: the configs are exactly the models' own defaults (the simulated
    engine serves the workload's context length)."""
    from pagedkv.cli import build_parser
    from pagedkv.cli.sim import engine_from, workload_from

    args = build_parser().parse_args(["sim", "run"])
    assert workload_from(args) == WorkloadConfig()
    assert engine_from(args) == EngineConfig(max_model_len=WorkloadConfig().max_model_len)
    args = build_parser().parse_args(["sim", "run", "--prompt", "fixed:8", "--output", "uniform:2-9"])
    custom = workload_from(args)
    assert custom.preset is None and custom.prompt == LengthDist(kind="fixed", value=8)


def test_a_preset_and_length_distributions_together_are_refused(capsys):
    argv = ["sim", "run", "--preset", "alpaca", "--prompt", "fixed:10", "--output", "fixed:5", "--num-requests", "5"]
    assert cli.main(argv) == 2
    assert "give a length preset (alpaca) or prompt/output distributions, not both" in capsys.readouterr().err


def test_sim_seed_is_the_workloads_not_the_engines():
    from pagedkv.cli import build_parser
    from pagedkv.cli.sim import engine_from, workload_from

    args = build_parser().parse_args(["sim", "run", "--seed", "7"])
    assert workload_from(args).seed == 7 and engine_from(args).seed == EngineConfig().seed


def test_every_engine_field_has_a_flag_showing_its_default(capsys):
    from pagedkv.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for name in EngineConfig.model_fields:
        flag = "--" + name.replace("_", "-")
        assert flag in help_text, flag
    assert "--block-size BLOCK_SIZE Tokens per K/V page. (default: 16)" in help_text
    assert "--swap-space-bytes SWAP_SPACE_BYTES CPU memory for swapped-out blocks" in help_text
    assert "(default: 256MiB)" in help_text and "e.g. 256MiB or 2GiB" in help_text
    assert "--enable-prefix-caching, --no-enable-prefix-caching" in help_text


def test_version(capsys):
    import pagedkv

    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"pagedkv {pagedkv.__version__}"
