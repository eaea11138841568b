"""The layering of docs/architecture.md, checked on the source: no module imports a module of
a higher layer (lazy imports inside functions count too), and ``sim`` and ``transport`` never
import each other."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "shoal"

# top to bottom; a module may import its own layer and the layers below
LAYERS = [
    ("edges", {"cli", "deploy", "key_service", "model_host", "child_process", "telemetry",
               "dashboard"}),
    ("assembling", {"experiment", "run_result", "scenarios"}),
    ("carriers", {"sim", "transport", "gateway", "device_task", "device_weights",
                  "device_absence", "device_secagg", "device_sessions", "device_eval",
                  "device_ckks", "device_secure", "device_commands", "gossip", "hierarchy",
                  "cluster"}),
    ("driving", {"runner", "discrete_event", "build"}),
    ("engine", {"coordinator", "arrivals", "policy", "events", "clock", "sampling",
                "selection", "registry", "store", "observers", "records", "config",
                "lifecycle", "evaluation", "tally"}),
    ("stages", {"pipeline", "strategy", "privacy", "robust", "codec", "summation",
                "uplink", "personalization"}),
    ("foundations", {"params", "data", "models", "frameworks", "training", "seeds",
                     "errors"}),
]
RANK = {unit: rank for rank, (_, units) in enumerate(LAYERS) for unit in units}


def _unit(module: str) -> str | None:
    """``shoal.privacy.stages`` -> ``privacy``; ``shoal`` itself -> None."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "shoal" else None


def _imports(path: Path) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "shoal":  # from shoal import seeds
                out.update(f"shoal.{a.name}" for a in node.names)
            elif node.module.startswith("shoal."):
                out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("shoal."))
    return out


def _modules():
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC.parent).with_suffix("")
        if "proto" in rel.parts:
            continue
        yield ".".join(p for p in rel.parts if p != "__init__"), path


def test_every_module_has_a_layer():
    units = {_unit(m) for m, _ in _modules()} - {None}
    assert units <= set(RANK), f"add to LAYERS: {sorted(units - set(RANK))}"


def test_no_module_imports_a_higher_layer():
    upward = []
    for module, path in _modules():
        unit = _unit(module)
        if unit is None:  # the package's lazy name table imports nothing at import time
            continue
        for target in _imports(path):
            t = _unit(target)
            if t is not None and t != unit and RANK[t] < RANK[unit]:
                upward.append(f"{module} ({LAYERS[RANK[unit]][0]}) imports {target} "
                              f"({LAYERS[RANK[t]][0]})")
    assert not upward, "\n".join(upward)


def test_sim_and_transport_do_not_import_each_other():
    for module, path in _modules():
        unit = _unit(module)
        if unit in ("sim", "transport"):
            other = "transport" if unit == "sim" else "sim"
            assert not any(_unit(t) == other for t in _imports(path)), module
