"""``pagedkv check``: the built-in machines pass on small budgets, with and without a config
file; the policy example of docs/invariants.md passes through ``--machine``; the same policy
with a seeded bug fails with exit status 1 and a reproduction that, pasted, fails the same way."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pagedkv import cli

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "invariants.md"
BUGGY = '''
from my_policy import LongPromptsAlone, LongPromptsAloneMachine


class Forgetful(LongPromptsAlone):
    def check_fits(self, num_prompt_tokens, max_tokens):
        pass  # the seeded bug: a request the policy never starts is accepted


class ForgetfulMachine(LongPromptsAloneMachine):
    def admission(self):
        return Forgetful()
'''


@pytest.fixture
def user_modules(tmp_path, monkeypatch):
    """The docs' example as my_policy.py, and a buggy variant as buggy.py, importable."""
    (example,) = [b for b in re.findall(r"```python\n(.*?)```", DOC.read_text(), re.DOTALL) if "my_policy.py" in b]
    (tmp_path / "my_policy.py").write_text(example)
    (tmp_path / "buggy.py").write_text(BUGGY)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in ("my_policy", "buggy"):
        sys.modules.pop(name, None)


def test_the_built_in_machines_pass(capsys):
    assert cli.main(["check", "--examples", "10", "--steps", "10", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    for machine in ("KVManagerMachine", "PrefixCacheMachine", "SchedulerMachine"):
        assert re.search(rf"^{machine} +\d+ +\d+ +\d+ +\d+ +[\d.]+ s +ok$", out, re.MULTILINE), out


def test_a_config_file_pins_the_machines(tmp_path, capsys):
    config = tmp_path / "engine.json"
    config.write_text(json.dumps({"block_size": 4, "preemption_mode": "swap", "enable_prefix_caching": False}))
    assert cli.main(["check", "--examples", "10", "--steps", "10", "--config", str(config)]) == 0
    assert capsys.readouterr().out.count(" ok") == 3
    config.write_text(json.dumps({"block_size": 2, "num_blocks": 30}))  # the pool too
    assert cli.main(["check", "--examples", "5", "--steps", "5", "--config", str(config)]) == 0


def test_a_bad_config_names_the_field(tmp_path, capsys):
    config = tmp_path / "engine.json"
    config.write_text(json.dumps({"block_size": 0}))
    assert cli.main(["check", "--config", str(config)]) == 2
    assert "block_size" in capsys.readouterr().err


def test_the_docs_policy_passes_and_its_seeded_bug_fails_with_a_reproduction(user_modules, capsys):
    assert cli.main(["check", "--machine", "my_policy:LongPromptsAloneMachine", "--examples", "60"]) == 0
    assert re.search(r"^LongPromptsAloneMachine .* ok$", capsys.readouterr().out, re.MULTILINE)

    assert cli.main(["check", "--machine", "buggy:ForgetfulMachine", "--examples", "100"]) == 1
    out = capsys.readouterr().out
    assert "ForgetfulMachine FAILED: InvariantViolated: every_step_makes_progress" in out
    reproduction = out[out.index("from pagedkv.scheduler import"):]
    assert "state = ForgetfulMachine()" in reproduction and "state.teardown()" in reproduction
    (user_modules / "repro.py").write_text(reproduction)
    pasted = subprocess.run([sys.executable, "repro.py"], cwd=user_modules, capture_output=True, text=True)
    assert pasted.returncode == 1 and "InvariantViolated: every_step_makes_progress" in pasted.stderr


def test_a_machine_that_is_not_one_is_refused(capsys):
    assert cli.main(["check", "--machine", "no_such_module:Machine"]) == 2
    assert cli.main(["check", "--machine", "pagedkv.testing:run_machine"]) == 2
    assert capsys.readouterr().err.count("--machine") == 2
