"""The Python examples in the docs run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


@pytest.mark.parametrize("index", range(len(_python_blocks(DOCS / "simulation.md"))))
def test_simulation_doc_examples_run(index, capsys):
    code = _python_blocks(DOCS / "simulation.md")[index]
    exec(compile(code, f"docs/simulation.md[{index}]", "exec"), {})
    out = capsys.readouterr().out
    assert out.strip(), "the example prints its result"
