"""What the installed package looks like from the outside: one import name, torch-free cheap paths.

These tests exist because the package once installed five generic top-level names
(``paged``, ``scheduler``, ``models``, ``sim``, ``server``) next to ``pagedkv``: a user's own
``models.py`` or ``server/`` package in the working directory shadowed ours and broke the
install. Now the folders install as ``pagedkv.paged``, ``pagedkv.scheduler``, ... through
setuptools ``package-dir``, so these tests

- build a real wheel and check it holds exactly one top-level name, ``pagedkv``, with the
  data files and the console script;
- run the tiny model and the simulator from a directory full of a user's look-alike modules,
  against both the editable install and that wheel;
- check that ``import pagedkv``, the simulator and the command line's help stay torch-free.

Everything runs in subprocesses (``sys.executable``), so the test process's own imports and
``sys.path`` prove nothing by accident.
"""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import NamedTuple

import pytest

import pagedkv

REPO = Path(__file__).resolve().parents[1]

# source folder -> where its files land in the wheel
PACKAGE_DIRS = {
    "pagedkv": "pagedkv",
    "paged": "pagedkv/paged",
    "scheduler": "pagedkv/scheduler",
    "models": "pagedkv/models",
    "sim": "pagedkv/sim",
    "server": "pagedkv/server",
}

# what a user might keep in their own working directory: the old top-level names
USER_MODULES = ("models", "scheduler", "sim", "paged", "server")

# not part of a build; copying them would be slow or (build/) leak stale files into the wheel
_NOT_SOURCE = shutil.ignore_patterns(
    ".git",
    ".venv",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    "*.pyc",
    ".pytest_cache",
    ".hypothesis",
    ".mypy_cache",
    ".ruff_cache",
    ".typecheck",
)


def _env(pythonpath: Path | None = None, **extra: str) -> dict[str, str]:
    """The current environment, minus anything that would change which ``pagedkv`` is imported."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH", "PYTHONSTARTUP")}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return {**env, **extra}


def _python(
    args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run ``sys.executable *args`` in ``cwd``; fail the test, showing its output, if it fails."""
    proc = subprocess.run(
        [sys.executable, *args],
        check=False,
        cwd=cwd,
        env=env or _env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, (
        f"{args} exited {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    )
    return proc


class Build(NamedTuple):
    wheel: Path
    source: Path
    """The copy of the working tree it was built from: what the wheel is checked against, so
    that files others add to the checkout meanwhile do not count."""


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory) -> Build:
    """A wheel of the working tree, built once per module.

    Built from a copy of the tree, so that the build neither writes build/ and egg-info into
    the shared checkout nor picks up stale files a previous build left in build/lib."""
    root = tmp_path_factory.mktemp("wheel")
    source, out = root / "src", root / "dist"
    shutil.copytree(REPO, source, ignore=_NOT_SOURCE)
    _python(
        ["-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(out), str(source)],
        cwd=root,
        timeout=300,
    )
    (built,) = out.glob("pagedkv-*.whl")
    return Build(built, source)


@pytest.fixture(scope="module")
def wheel(build: Build) -> Path:
    return build.wheel


@pytest.fixture(scope="module")
def wheel_site(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel installed into a folder of its own, to be put first on ``PYTHONPATH``."""
    site = tmp_path_factory.mktemp("wheel-site") / "site"
    _python(
        ["-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(site), str(wheel)],
        cwd=site.parent,
        timeout=300,
    )
    return site


@pytest.fixture
def user_dir(tmp_path: Path) -> Iterator[Path]:
    """A working directory holding a user's own models.py, scheduler.py, sim.py, paged.py and server/."""
    for name in ("models", "scheduler", "sim", "paged"):
        (tmp_path / f"{name}.py").write_text(f"USER_JUNK = {name!r}\nGPT = LLMEngine = simulate = None\n")
    (tmp_path / "server").mkdir()
    (tmp_path / "server" / "__init__.py").write_text("USER_JUNK = 'server'\nbuild_app = None\n")
    yield tmp_path


def _wheel_names(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as zf:
        return zf.namelist()


# --- 1. the wheel --------------------------------------------------------------------------


def test_wheel_has_one_top_level_name(wheel: Path) -> None:
    tops = {name.split("/", 1)[0] for name in _wheel_names(wheel)}
    assert {t for t in tops if not t.endswith((".dist-info", ".data"))} == {"pagedkv"}


def test_wheel_holds_modules_data_and_marker(build: Build) -> None:
    names, source = set(_wheel_names(build.wheel)), build.source
    assert "pagedkv/paged/block_pool.py" in names
    assert "pagedkv/py.typed" in names
    assert {"pagedkv/models/csrc/paged_attention.c", "pagedkv/models/csrc/bf16.h"} <= names  # kernels build from it
    profiles = {n for n in names if n.startswith("pagedkv/sim/profiles/") and n.endswith(".json")}
    assert profiles == {f"pagedkv/sim/profiles/{p.name}" for p in (source / "sim" / "profiles").glob("*.json")}
    assert profiles
    traces = {n for n in names if n.startswith("pagedkv/sim/traces/") and n.endswith(".jsonl")}
    assert traces == {f"pagedkv/sim/traces/{p.name}" for p in (source / "sim" / "traces").glob("*.jsonl")}
    # every module of every source folder, subpackages included, made it into the wheel
    missing = [
        f"{folder}/{src.relative_to(source / folder).as_posix()}"
        for folder, dest in PACKAGE_DIRS.items()
        for src in (source / folder).rglob("*.py")
        if f"{dest}/{src.relative_to(source / folder).as_posix()}" not in names
    ]
    assert not missing, f"source modules missing from the wheel: {missing}"


def test_wheel_console_script(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        (entry_points,) = [n for n in zf.namelist() if n.endswith(".dist-info/entry_points.txt")]
        parser = configparser.ConfigParser()
        parser.read_string(zf.read(entry_points).decode())
    assert dict(parser["console_scripts"]) == {"pagedkv": "pagedkv.cli:main"}


# --- 2. a user's own modules do not shadow ours ----------------------------------------------

SHADOW_SCRIPT = """
import importlib, os, sys
from pathlib import Path

import pagedkv

where = Path(pagedkv.__file__).resolve()
expected = Path(os.environ["EXPECT_PAGEDKV_UNDER"]).resolve()
assert where.is_relative_to(expected), f"pagedkv imported from {where}, not under {expected}"

from pagedkv import LLM, EngineConfig, SamplingParams, WorkloadConfig, simulate

llm = LLM(model="tiny", num_blocks=64)
out = llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
assert len(out) == 1 and len(out[0].outputs[0].output_token_ids) == 4, out

result, summary = simulate(WorkloadConfig(num_requests=20), EngineConfig(max_model_len=2048))
assert summary.completed == 20, summary

# pagedkv put none of the old names into sys.modules: the user's own modules still import
for name in USER_MODULES:
    module = importlib.import_module(name)
    assert getattr(module, "USER_JUNK", None) == name, (name, module)
    assert Path(module.__file__).resolve().is_relative_to(Path.cwd().resolve()), module
print("ok")
"""


def _run_shadowed(cwd: Path, env: dict[str, str]) -> None:
    proc = _python(["-c", SHADOW_SCRIPT.replace("USER_MODULES", repr(USER_MODULES))], cwd=cwd, env=env)
    assert proc.stdout.strip().endswith("ok")


def test_user_modules_do_not_shadow_editable_install(user_dir: Path) -> None:
    _run_shadowed(user_dir, _env(EXPECT_PAGEDKV_UNDER=str(REPO)))


def test_user_modules_do_not_shadow_wheel(user_dir: Path, wheel_site: Path) -> None:
    _run_shadowed(user_dir, _env(wheel_site, EXPECT_PAGEDKV_UNDER=str(wheel_site)))


# --- 3. cheap imports, version, python -m ---------------------------------------------------


def test_import_is_torch_free(tmp_path: Path) -> None:
    _python(
        ["-c", "import pagedkv, sys; assert 'torch' not in sys.modules, 'import pagedkv loaded torch'"], cwd=tmp_path
    )


def test_simulator_is_torch_free(tmp_path: Path) -> None:
    script = (
        "import sys\n"
        "from pagedkv import simulate, WorkloadConfig, SamplingParams, EngineConfig\n"
        "result, summary = simulate(WorkloadConfig(num_requests=20), EngineConfig(max_model_len=2048))\n"
        "assert summary.completed == 20, summary\n"
        "assert 'torch' not in sys.modules, 'the simulator loaded torch'\n"
    )
    _python(["-c", script], cwd=tmp_path)


def test_version_matches_metadata() -> None:
    assert pagedkv.__version__ == version("pagedkv")


def test_python_dash_m_help(tmp_path: Path) -> None:
    proc = _python(["-m", "pagedkv", "--help"], cwd=tmp_path)
    assert "usage: pagedkv" in proc.stdout


# --- 4. the command line's simulator help is torch-free ---------------------------------------


def test_sim_run_help_is_torch_free(tmp_path: Path) -> None:
    proc = _python(["-X", "importtime", "-m", "pagedkv", "sim", "run", "--help"], cwd=tmp_path)
    assert "--num-requests" in proc.stdout
    assert "pagedkv.cli" in proc.stderr, "no import timings recorded"
    torch_lines = [line for line in proc.stderr.splitlines() if "torch" in line]
    assert not torch_lines, "pagedkv sim run --help imported torch:\n" + "\n".join(torch_lines[:5])
