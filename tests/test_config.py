from __future__ import annotations

from pathlib import Path

import pytest

from shoal.config import SCHEMA, config_markdown, load_config, parse_config, to_toml
from shoal.errors import ConfigError

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
            assert opt.check(f"{section}.{key}", opt.default) == opt.default


def test_configuration_docs_are_in_sync_with_the_schema():
    assert DOCS.read_text() == config_markdown(), (
        "docs/configuration.md is stale: regenerate it with "
        "`.venv/bin/shoal config --markdown > docs/configuration.md`")
