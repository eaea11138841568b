from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path

import numpy as np
import pytest

from shoal.cli import main
from shoal.config import (
    SCHEMA,
    Config,
    RoundConfig,
    SamplingConfig,
    config_markdown,
    load_config,
    parse_config,
    to_toml,
)
from shoal.errors import ConfigError, int_at_least

DOCS = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


def test_defaults_are_config_s():
    cfg = load_config()
    assert cfg.rounds == 30 and cfg.seed == 0
    assert (cfg.get("data.dataset"), cfg.get("data.clients"), cfg.get("data.partition"),
            cfg.get("data.alpha"), cfg.get("data.partition_seed")) == \
        ("fashion-mnist", 100, "dirichlet", 0.5, 0)
    assert (cfg.get("sampling.per_round"), cfg.get("model.name"), cfg.get("client.epochs"),
            cfg.get("client.batch_size"), cfg.get("client.lr"), cfg.get("strategy.name")) == \
        (10, "mlp2nn", 1, 32, 0.05, "fedavg")


def test_file_and_overrides(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('rounds = 5\n[client]\nlr = 0.1\n[strategy]\nname = "fedadam"\n')
    cfg = load_config(p, {"seed": 3, "client.epochs": 2})
    assert (cfg.rounds, cfg.seed, cfg.get("client.lr"), cfg.get("client.epochs"),
            cfg.get("strategy.name")) == (5, 3, 0.1, 2, "fedadam")


@pytest.mark.parametrize("text, key, phrase", [
    ("[client]\nlr = -1.0\n", "client.lr", "> 0.0"),
    ("[client]\nbatchsize = 3\n", "client.batchsize", "[client] has: epochs, batch_size"),
    ("[clinet]\nlr = 0.1\n", "clinet", "unknown config section"),
    ("rounds = 0\n", "rounds", ">= 1"),
    ("rounds = 2.5\n", "rounds", "an integer"),
    ("[model]\nname = \"resnet\"\n", "model.name", "one of 'mlp2nn'"),
    ("[sampling]\nper_round = 500\n", "sampling.per_round", "<= data.clients (100)"),
    ("[data]\nalpha = 0\n", "data.alpha", "> 0.0"),
    ("[data]\nsynthetic_iid = 1\n", "data.synthetic_iid", "true or false"),
    ("learning_rate = 0.1\n", "learning_rate", "unknown config key"),
    ("[sampling]\nselection = \"stratified\"\n", "sampling.stratify_by",
     "needs sampling.stratify_by"),
    ("[sampling]\nmethod = \"poisson\"\nselection = \"fairness\"\n", "sampling.selection",
     "use it with sampling.method = 'uniform'"),
    # selection is a setting of both modes now: the [deploy] keys are gone
    ("[deploy]\nselection = \"fairness\"\n", "deploy.selection", "unknown config key"),
    ("[deploy]\nstratify_by = \"os\"\n", "deploy.stratify_by", "unknown config key"),
])
def test_bad_configs_name_the_key_and_the_allowed_range(tmp_path, text, key, phrase):
    p = tmp_path / "bad.toml"
    p.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(p)
    assert info.value.key == key
    assert key in str(info.value) and phrase in str(info.value)


def test_invalid_toml_and_missing_file(tmp_path):
    p = tmp_path / "x.toml"
    p.write_text("rounds = = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(p)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="unknown config key 'client.rate'"):
        load_config(None, {"client.rate": 1.0})


def test_resolved_toml_reloads_to_the_same_config(tmp_path):
    cfg = load_config(None, {"strategy.name": "fedyogi", "output.name": 'we"ird'})
    p = tmp_path / "r.toml"
    p.write_text(to_toml(cfg))
    assert load_config(p).to_dict() == cfg.to_dict()
    assert parse_config(cfg.to_dict()).to_dict() == cfg.to_dict()


def test_every_default_is_valid():
    for section, opts in SCHEMA.items():
        for key, opt in opts.items():
            assert type(opt.default) is opt.type, f"{section}.{key}"
            assert opt.check(f"{section}.{key}", opt.default) == opt.default


def _dotted(section: str, key: str) -> str:
    return f"{section}.{key}" if section else key


def _out_of_bounds():
    """(dotted key, a value just outside one of its bounds, the bound as printed)."""
    for section, opts in SCHEMA.items():
        for key, opt in opts.items():
            step = 1 if opt.type is int else 0.5
            if opt.min is not None:
                bad = opt.min if opt.min_exclusive else opt.min - step
                yield _dotted(section, key), bad, (">" if opt.min_exclusive else ">=") + \
                    f" {opt.min}"
            if opt.max is not None:
                bad = opt.max if opt.max_exclusive else opt.max + step
                yield _dotted(section, key), bad, ("<" if opt.max_exclusive else "<=") + \
                    f" {opt.max}"
            if opt.choices:
                yield _dotted(section, key), "no-such-choice", f"one of {opt.choices[0]!r}"


@pytest.mark.parametrize("key, bad, bound", list(_out_of_bounds()))
def test_every_bound_is_enforced_and_named_with_the_field(key, bad, bound):
    with pytest.raises(ConfigError) as info:
        load_config(None, {key: bad})
    assert info.value.key == key
    assert str(info.value).startswith(f"{key} = {bad!r} is not allowed: it must be ")
    assert bound in str(info.value)


def test_sections_are_typed_frozen_and_validated_when_built_in_code():
    cfg = load_config(None, {"round.buffer_size": 4, "client.lr": 1})
    assert cfg.round.buffer_size == cfg["round"]["buffer_size"] == cfg.get("round.buffer_size")
    assert isinstance(cfg.round, RoundConfig) and cfg.client.lr == 1.0
    assert type(cfg.client.lr) is float  # an integer given for a float is stored as a float
    assert dict(cfg["round"]) == cfg.to_dict()["round"] and "buffer_size" in cfg["round"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.round.buffer_size = 5  # type: ignore[misc]
    with pytest.raises(ConfigError, match=r"round\.buffer_size = 0 is not allowed") as info:
        RoundConfig(buffer_size=0)
    assert info.value.key == "round.buffer_size"
    # the checks across sections run however a Config is made
    with pytest.raises(ConfigError, match="<= data.clients"):
        Config(sampling=SamplingConfig(per_round=500))
    with pytest.raises(ConfigError, match="<= data.clients"):
        dataclasses.replace(cfg, sampling=SamplingConfig(per_round=500))
    assert Config() == load_config() and Config(seed=1) != load_config()


def test_overrides_apply_before_the_checks_across_sections(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[sampling]\nper_round = 500\n")
    cfg = load_config(p, {"data.clients": 1000})
    assert (cfg.sampling.per_round, cfg.data.clients) == (500, 1000)


@pytest.mark.parametrize("text, override, key, suggestion", [
    ("[round]\nbufer_size = 3\n", "round.bufer_size=3", "round.bufer_size",
     "did you mean 'round.buffer_size'?"),
    ("[client]\nper_round = 3\n", "client.per_round=3", "client.per_round",
     "did you mean 'sampling.per_round'?"),
    ("[rond]\nbuffer_size = 3\n", "rond.buffer_size=3", "rond", "did you mean [round]?"),
    ("sead = 3\n", "sead=3", "sead", "did you mean 'seed'?"),
    # a key several sections have: all of them, in alphabetical order (not whichever
    # section happened to be declared first)
    ("[client]\nrule = \"median\"\n", "client.rule=\"median\"", "client.rule",
     "did you mean 'gossip.rule' or 'robust.rule'?"),
    ("[client]\nmax_staleness = 3\n", "client.max_staleness=3", "client.max_staleness",
     "did you mean 'compression.max_staleness' or 'round.max_staleness'?"),
    # a key that moved says where to (not the closest spelling, deploy.over_selection)
    ("[deploy]\nselection = \"fairness\"\n", "deploy.selection=\"fairness\"",
     "deploy.selection", "it moved to 'sampling.selection'"),
])
def test_a_misspelt_key_is_refused_with_the_closest_one(tmp_path, capsys, text, override, key,
                                                        suggestion):
    p = tmp_path / "typo.toml"
    p.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(p)
    assert info.value.key == key and suggestion in str(info.value)
    assert main(["config", "--set", override]) == 2
    assert suggestion in capsys.readouterr().err


def test_a_key_where_a_section_belongs_and_back_is_refused():
    with pytest.raises(ConfigError, match=r"\[round\] is a section"):
        load_config(None, {"round": 3})
    with pytest.raises(ConfigError, match="seed is a key, not a section"):
        parse_config({"seed": {"x": 1}})


def test_shoal_config_prints_documented_toml_that_parses_back_to_the_defaults(capsys):
    assert main(["config"]) == 0
    text = capsys.readouterr().out
    assert parse_config(tomllib.loads(text)) == Config()
    lines = text.splitlines()
    keys = [i for i, line in enumerate(lines) if re.match(r"^[a-z_0-9]+ = ", line)]
    assert len(keys) == sum(len(opts) for opts in SCHEMA.values())
    for i in keys:  # every key sits under its doc
        assert lines[i - 1].startswith("# "), lines[i]
    assert _comment_above(lines, "buffer_size = 10") == \
        "buffered: updates per server step (rounds counts server steps) (an integer >= 1)"
    assert main(["config", "--set", "round.buffer_size=7", "--seed", "2"]) == 0
    text = capsys.readouterr().out
    assert parse_config(tomllib.loads(text)) == load_config(
        None, {"round.buffer_size": 7, "seed": 2})
    assert _comment_above(text.splitlines(), "buffer_size = 7").endswith(
        "(an integer >= 1; default 10)")  # a changed value shows its default


def _comment_above(lines: list[str], line: str) -> str:
    """The comment block right above ``line``, joined into one line."""
    i = lines.index(line)
    start = i
    while lines[start - 1].startswith("# "):
        start -= 1
    return " ".join(c[2:] for c in lines[start:i])


def _documented_keys(page: str) -> set[str]:
    section, keys = "", set()
    for line in page.splitlines():
        if heading := re.match(r"^## `\[(\w+)\]`", line):
            section = heading.group(1)
        elif row := re.match(r"^\| `(\w+)` \|", line):
            keys.add(_dotted(section, row.group(1)))
    return keys


def test_configuration_docs_are_in_sync_with_the_schema():
    page = DOCS.read_text()
    in_code = {_dotted(s, k) for s, opts in SCHEMA.items() for k in opts}
    assert _documented_keys(config_markdown()) == in_code
    documented = _documented_keys(page)
    assert documented == in_code, (
        f"docs/configuration.md lacks {sorted(in_code - documented)} and lists unknown "
        f"{sorted(documented - in_code)}")
    assert page == config_markdown(), (
        "docs/configuration.md is stale: regenerate it with "
        "`.venv/bin/shoal config --markdown > docs/configuration.md`")


@pytest.mark.parametrize("value, ok", [
    (0, True), (7, True), (np.int64(3), True), (np.uint8(0), True),
    (-1, False), (True, False), (np.bool_(True), False), (1.0, False), (np.float64(2), False),
    ("3", False), (None, False)])
def test_int_at_least_is_the_one_integer_rule(value, ok):
    # device tasks, the model store and the transport's limits all check integer arguments
    # with it: numpy ints are ints, bools and floats are not
    if ok:
        out = int_at_least(value, "rounds[0]", 0)
        assert out == value and type(out) is int
    else:
        with pytest.raises(ConfigError, match=r"rounds\[0\] must be an int >= 0") as info:
            int_at_least(value, "rounds[0]", 0)
        assert info.value.key == "rounds[0]"
