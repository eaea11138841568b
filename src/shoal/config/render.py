"""A config written out: as TOML (``shoal config``, run directories) and as the reference page.

Both walk the typed sections, so the printed defaults and ``docs/configuration.md`` list
exactly the keys that exist, with the docs written beside each field.
"""

from __future__ import annotations

import inspect
import textwrap
from collections.abc import Sequence
from typing import Any

from shoal.config.root import SCHEMA, Config
from shoal.config.schema import Option, Section, options_of, sections_of

__all__ = ["to_toml", "config_markdown"]

_WIDTH = 92


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(v)


def _summary(cls: type[Section]) -> str:
    return (inspect.getdoc(cls) or "").split("\n\n")[0].replace("\n", " ")


def _comment(text: str) -> list[str]:
    return textwrap.wrap(text, _WIDTH, initial_indent="# ", subsequent_indent="# ")


def _lines(values: Section, options: dict[str, Option], docs: bool) -> list[str]:
    lines: list[str] = []
    for key, opt in options.items():
        value = values[key]
        if docs:
            notes = [] if opt.type is str and not opt.choices else [opt.allowed()]
            if value != opt.default:
                notes.append(f"default {_toml_value(opt.default)}")
            lines += _comment(opt.help + (f" ({'; '.join(notes)})" if notes else ""))
        lines.append(f"{key} = {_toml_value(value)}")
    return lines


def to_toml(cfg: Config, *, docs: bool = False) -> str:
    """The resolved config as TOML, every key written out (it reloads to an equal config).

    Args:
        docs: precede each key with a comment: its doc, what it allows, and its default
            where the value differs (what ``shoal config`` prints).
    """
    lines: list[str] = []
    if docs:
        lines += _comment("shoal run configuration: every key is optional and defaults to "
                          "the reference workload \"config S\".") + [""]
    lines += _lines(cfg, options_of(Config), docs)
    for name, cls in sections_of(Config).items():
        lines += ["", f"[{name}]" + (f"  # {_summary(cls)}" if docs else "")]
        lines += _lines(cfg[name], options_of(cls), docs)
    return "\n".join(lines) + "\n"


def config_markdown(sections: Sequence[str] | None = None) -> str:
    """The configuration reference (``docs/configuration.md``) generated from the sections."""
    out = ["# Configuration reference", "",
           "Generated from the typed sections in `shoal.config` (`.venv/bin/shoal config "
           "--markdown`; a test keeps this page in sync). A run is configured by one TOML "
           "file; every key is optional and defaults to the reference workload \"config S\". "
           "Unknown keys and out-of-range values are refused with a message naming the key "
           "and the bound (or the closest existing key). On the command line, "
           "`--set section.key=value` overrides any key, and `--rounds`, `--clients`, "
           "`--per-round` and `--seed` are shortcuts; `shoal config` prints every key with "
           "its value and these notes as comments.", ""]
    classes: dict[str, type[Section]] = {"": Config, **sections_of(Config)}
    for name in sections or SCHEMA:
        out += [f"## `[{name}]`" if name else "## top level", ""]
        if name:
            out += [_summary(classes[name]), ""]
        out += ["| key | default | allowed | meaning |", "| --- | --- | --- | --- |"]
        for key, opt in SCHEMA[name].items():
            out.append(f"| `{key}` | `{_toml_value(opt.default)}` | {opt.allowed()} | "
                       f"{opt.help} |")
        out.append("")
    return "\n".join(out)
