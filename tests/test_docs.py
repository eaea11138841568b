"""The Python examples in the docs run as written and print what the docs say they print."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def _rows(out: str) -> list[list[str]]:
    return [line.split() for line in out.strip().splitlines()]


def _round_lines(rows: list[list[str]]) -> tuple[list[int], list[float]]:
    """``round accuracy`` lines, as the examples' per-round callbacks print them."""
    assert all(len(row) == 2 for row in rows), rows
    rounds = [int(r) for r, _ in rows]
    accuracy = [float(a) for _, a in rows]
    assert all(0.0 <= a <= 1.0 for a in accuracy), accuracy
    return rounds, accuracy


def _check_experiment(out: str) -> None:
    # Experiment with rounds = 5: the initial model (round 0) and every round are evaluated,
    # then the summary's final_accuracy, which is the last round's accuracy
    *per_round, final = _rows(out)
    rounds, accuracy = _round_lines(per_round)
    assert rounds == [0, 1, 2, 3, 4, 5]
    assert len(final) == 1 and float(final[0]) == accuracy[-1]
    assert accuracy[-1] > accuracy[0] + 0.1, "five rounds of FedProx learn something"


def _check_own_model(out: str) -> None:
    # the hand-built coordinator: five rounds, each evaluated by the given callback
    rounds, accuracy = _round_lines(_rows(out))
    assert rounds == [1, 2, 3, 4, 5]
    assert accuracy[-1] > accuracy[0], "the model learns"


#: What each example of docs/simulation.md prints, in the order they appear.
SIMULATION_CHECKS = [_check_experiment, _check_own_model]


def test_every_simulation_example_has_its_output_checked():
    assert len(_python_blocks(DOCS / "simulation.md")) == len(SIMULATION_CHECKS)


@pytest.mark.parametrize("index", range(len(SIMULATION_CHECKS)))
def test_simulation_doc_examples_print_what_they_show(index, capsys):
    code = _python_blocks(DOCS / "simulation.md")[index]
    exec(compile(code, f"docs/simulation.md[{index}]", "exec"), {})
    SIMULATION_CHECKS[index](capsys.readouterr().out)
