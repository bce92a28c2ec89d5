"""The package's structure, checked as CI checks it: the import layers of
docs/ARCHITECTURE.md (import-linter's `.importlinter`), ruff's rules (pyproject.toml), and no
module longer than a reader can hold (400 lines)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAX_MODULE_LINES = 400


def _run(command: list[str]) -> subprocess.CompletedProcess:
    # this checkout's package first, whichever flexbatch is installed
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _tool(name: str) -> str:
    """A console script installed beside this interpreter (requirements.txt pins both tools)."""
    path = Path(sys.executable).parent / name
    if not path.is_file():
        pytest.fail(f"{name} is not installed beside {sys.executable}; pip install -r requirements.txt")
    return str(path)


def test_imports_follow_the_layers():
    result = _run([_tool("lint-imports"), "--no-cache"])
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_finds_nothing():
    result = _run([_tool("ruff"), "check", "--no-cache", "."])
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_module_is_longer_than_400_lines():
    modules = sorted((ROOT / "flexbatch").rglob("*.py"))
    assert len(modules) > 10, "the package's modules were not found"
    lengths = {str(path.relative_to(ROOT)): len(path.read_text().splitlines()) for path in modules}
    too_long = {path: n for path, n in lengths.items() if n > MAX_MODULE_LINES}
    assert not too_long, f"split these modules (over {MAX_MODULE_LINES} lines): {too_long}"
