"""The core type-checks (STYLE.md habit 9): mypy, run on the files and with the settings of
``[tool.mypy]`` in pyproject.toml, reports nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mypy")

ROOT = Path(__file__).resolve().parents[1]


def test_core_is_mypy_clean(request: pytest.FixtureRequest,
                            tmp_path_factory: pytest.TempPathFactory) -> None:
    # pytest's cache keeps mypy's between runs (a cold check takes ~10 s, a warm one ~1 s)
    # without touching the .mypy_cache of someone running mypy by hand
    # (no cache when pytest runs with -p no:cacheprovider)
    pytest_cache = getattr(request.config, "cache", None)
    cache = (pytest_cache.mkdir("mypy") if pytest_cache is not None
             else tmp_path_factory.mktemp("mypy"))
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"),
         "--cache-dir", str(cache), "--no-color-output", "--no-error-summary"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"mypy found problems in the core:\n{proc.stdout}{proc.stderr}"
