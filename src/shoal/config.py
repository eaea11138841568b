"""Run configuration: one TOML file, validated against a schema that also writes the docs.

Every option lives in :data:`SCHEMA` with its type, default, allowed range and a one-line
help text. Loading rejects unknown keys and out-of-range values with a message naming the key
and what is allowed; ``docs/configuration.md`` is generated from the same table (a test keeps
it in sync), so the documentation lists exactly the options that exist.

With no file, the defaults are the reference workload "config S": Fashion-MNIST,
100 clients, Dirichlet(0.5) partition with seed 0, 10 clients per round, 30 rounds, the 2NN,
1 local epoch, batch 32, SGD lr 0.05, FedAvg.
"""

from __future__ import annotations

import copy
import math
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shoal.errors import ConfigError

__all__ = ["Option", "SCHEMA", "Config", "load_config", "config_markdown", "to_toml"]


@dataclass(frozen=True)
class Option:
    """One configuration key.

    Attributes:
        type: ``int``, ``float``, ``bool`` or ``str``.
        default: the value used when the key is absent.
        help: one line for the docs.
        choices: allowed values for a string option.
        min, max: inclusive bounds for numbers (``None`` = unbounded).
        min_exclusive: the lower bound itself is not allowed.
        max_exclusive: the upper bound itself is not allowed.
    """

    type: type
    default: Any
    help: str
    choices: tuple[str, ...] | None = None
    min: float | None = None
    max: float | None = None
    min_exclusive: bool = False
    max_exclusive: bool = False

    def allowed(self) -> str:
        if self.choices:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        if self.type is bool:
            return "true or false"
        if self.type is str:
            return "a string"
        kind = "an integer" if self.type is int else "a number"
        lo = "" if self.min is None else (f"> {self.min}" if self.min_exclusive
                                          else f">= {self.min}")
        hi = "" if self.max is None else (f"< {self.max}" if self.max_exclusive
                                          else f"<= {self.max}")
        bounds = " and ".join(b for b in (lo, hi) if b)
        return f"{kind} {bounds}".strip()

    def check(self, key: str, value: Any) -> Any:
        if self.type is bool:
            ok = isinstance(value, bool)
        elif self.type is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif self.type is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            if ok:
                value = float(value)
                ok = math.isfinite(value)
        else:
            ok = isinstance(value, str)
        if ok and self.choices is not None:
            ok = value in self.choices
        if ok and self.min is not None:
            ok = value > self.min if self.min_exclusive else value >= self.min
        if ok and self.max is not None:
            ok = value < self.max if self.max_exclusive else value <= self.max
        if not ok:
            raise ConfigError(f"{key} = {value!r} is not allowed: it must be {self.allowed()}",
                              key=key)
        return value


#: section -> key -> Option. The top-level section is "".
SCHEMA: dict[str, dict[str, Option]] = {
    "": {
        "seed": Option(int, 0, "run seed: model initialisation, client sampling and local "
                       "batch order all derive from it", min=0),
        "rounds": Option(int, 30, "number of federated rounds", min=1, max=1_000_000),
    },
    "data": {
        "dataset": Option(str, "fashion-mnist", "training data",
                          choices=("fashion-mnist", "synthetic")),
        "path": Option(str, "", "directory holding the Fashion-MNIST IDX files; empty = "
                       "$SHOAL_FASHION_MNIST or /usr/share/datasets/fashion-mnist"),
        "clients": Option(int, 100, "number of clients the training set is split into",
                          min=1, max=10_000_000),
        "partition": Option(str, "dirichlet", "how examples are split among clients "
                            "(Fashion-MNIST only; Synthetic is per-user by construction)",
                            choices=("dirichlet", "iid", "shards")),
        "alpha": Option(float, 0.5, "Dirichlet concentration: smaller = more label skew",
                        min=0.0, min_exclusive=True),
        "partition_seed": Option(int, 0, "seed of the partition, independent of the run "
                                 "seed so runs with different seeds share one split", min=0),
        "shards_per_client": Option(int, 2, "shards per client for partition = 'shards'",
                                    min=1),
        "synthetic_alpha": Option(float, 1.0, "Synthetic(alpha, beta): model heterogeneity "
                                  "(a standard deviation)", min=0.0),
        "synthetic_beta": Option(float, 1.0, "Synthetic(alpha, beta): data heterogeneity "
                                 "(a standard deviation)", min=0.0),
        "synthetic_iid": Option(bool, False, "use the IID variant of Synthetic"),
    },
    "model": {
        "name": Option(str, "mlp2nn", "model architecture",
                       choices=("mlp2nn", "logreg", "cnn")),
    },
    "client": {
        "epochs": Option(int, 1, "local epochs per round", min=1, max=1000),
        "batch_size": Option(int, 32, "local batch size (the last partial batch is kept)",
                             min=1, max=1_000_000),
        "lr": Option(float, 0.05, "local SGD learning rate (no momentum)",
                     min=0.0, min_exclusive=True, max=100.0),
    },
    "strategy": {
        "name": Option(str, "fedavg", "server aggregation strategy",
                       choices=("fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad")),
        "server_lr": Option(float, 1.0, "server learning rate (eta); FedAvg uses 1.0, the "
                            "adaptive optimizers typically 0.01-0.1", min=0.0,
                            min_exclusive=True, max=100.0),
        "mu": Option(float, 0.01, "FedProx proximal coefficient (strategy = 'fedprox')",
                     min=0.0),
        "beta1": Option(float, 0.9, "first-moment decay of FedAdam/FedYogi/FedAdagrad",
                        min=0.0, max=0.999999),
        "beta2": Option(float, 0.99, "second-moment decay of FedAdam/FedYogi", min=0.0,
                        max=0.999999),
        "tau": Option(float, 1e-3, "adaptivity (epsilon) of the adaptive optimizers",
                      min=0.0, min_exclusive=True),
    },
    "sampling": {
        "method": Option(str, "uniform", "'uniform': exactly per_round clients without "
                         "replacement; 'poisson': each client joins with probability q "
                         "(what DP accounting assumes)", choices=("uniform", "poisson")),
        "per_round": Option(int, 10, "clients sampled per round (method 'uniform'); must "
                            "not exceed data.clients", min=1),
        "q": Option(float, 0.1, "per-client sampling probability (method 'poisson')",
                    min=0.0, min_exclusive=True, max=1.0),
    },
    "round": {
        "policy": Option(str, "sync", "'sync': synchronous rounds (every sampled client, or "
                         "deploy.target of them in a deployment); 'buffered': FedBuff "
                         "asynchronous aggregation (simulation)", choices=("sync", "buffered")),
        "concurrency": Option(int, 20, "buffered: clients training at any time", min=1),
        "buffer_size": Option(int, 10, "buffered: updates per server step (rounds counts "
                              "server steps)", min=1),
        "staleness_exponent": Option(float, 0.5, "buffered: an update s versions old is "
                                     "scaled by 1 / (1 + s)^a (0.5: the FedBuff paper's "
                                     "1 / sqrt(1 + s))", min=0.0, max=10.0),
        "max_staleness": Option(int, 10, "buffered: refuse updates more versions old than "
                                "this", min=0),
    },
    "compression": {
        "upload": Option(str, "none", "codec chain for client updates, stages joined by "
                         "'+': none, fp16, bf16, q8, q4, q2, sign, topk(F), randk(F), zstd; "
                         "e.g. 'topk(0.01)+q8+zstd'"),
        "error_feedback": Option(bool, False, "keep what compression dropped on the client "
                                 "and add it to the next update"),
        "download": Option(str, "full", "model downloads: 'full' or 'delta' against the "
                           "client's last synced version", choices=("full", "delta")),
        "download_codec": Option(str, "none", "lossless chain for downloads: 'none' or "
                                 "'zstd'", choices=("none", "zstd")),
        "max_staleness": Option(int, 5, "a client more versions behind than this gets the "
                                "full model", min=0, max=1000),
    },
    "secure_aggregation": {
        "enabled": Option(bool, False, "aggregate with SecAgg+ (pairwise masks from X25519, "
                          "Shamir shares, dropout recovery): the server sees only the sum"),
        "clip": Option(float, 0.5, "per-coordinate range [-clip, clip] of the fixed-point "
                       "encoding (larger values are clipped)", min=0.0, min_exclusive=True),
        "value_bits": Option(int, 20, "quantization bits per coordinate (stochastic "
                             "rounding)", min=2, max=40),
        "max_weight": Option(int, 4096, "largest per-client weight (example count) that is "
                             "masked; larger counts are capped", min=1, max=1_000_000),
        "neighbours": Option(int, 0, "SecAgg+ neighbours k; 0 = automatic (complete graph "
                             "with a majority threshold below 100 clients, else the SecAgg+ "
                             "parameter search from dropout and corrupt_rate); -1 = complete "
                             "graph (SecAgg)", min=-1),
        "threshold": Option(int, 0, "Shamir threshold t; 0 = with k", min=0),
        "dropout": Option(float, 0.0, "expected dropout rate (sets k and t for cohorts of "
                          "100 or more); in simulation also the fraction of each cohort that "
                          "vanishes after sharing keys (their masks are recovered)", min=0.0,
                          max=0.5),
        "corrupt_rate": Option(float, 0.05, "assumed fraction of clients colluding with "
                               "the server (sets k and t)", min=0.0, max=0.45),
        "roster_wait_s": Option(float, 15.0, "deployments: longest wait for the selected "
                                "devices to check in before the round's roster closes",
                                min=0.0, min_exclusive=True),
        "stage_timeout_s": Option(float, 10.0, "deployments: length of the key-exchange and "
                                  "unmasking stages (devices that miss one are dropouts; "
                                  "input collection runs to deploy.deadline_s)", min=0.0,
                                  min_exclusive=True),
    },
    "privacy": {
        "placement": Option(str, "none", "differential privacy: 'central' (server clips "
                            "and adds noise), 'local' (each client does), or 'none'",
                            choices=("none", "central", "local")),
        "noise_multiplier": Option(float, 1.0, "z: noise std = z * clip_norm", min=0.0,
                                   min_exclusive=True),
        "clip_norm": Option(float, 1.0, "C: L2 bound on each client update (the initial "
                            "value with adaptive clipping)", min=0.0, min_exclusive=True),
        "adaptive_clipping": Option(bool, False, "learn C as a quantile of update norms "
                                    "(central placement; Andrew et al. 2021)"),
        "target_quantile": Option(float, 0.5, "adaptive clipping: fraction of updates to "
                                  "leave unclipped", min=0.0, min_exclusive=True, max=1.0,
                                  max_exclusive=True),
        "clip_learning_rate": Option(float, 0.2, "adaptive clipping: geometric step size",
                                     min=0.0, min_exclusive=True),
        "count_noise_std": Option(float, 0.0, "adaptive clipping: noise std on the "
                                  "unclipped count, in clients; 0 = expected clients / 20",
                                  min=0.0),
        "delta": Option(float, 1e-5, "delta at which epsilon is reported (keep it well below "
                        "1 / number of clients)", min=0.0, min_exclusive=True, max=0.1),
        "epsilon_budget": Option(float, 0.0, "largest epsilon the run may spend; 0 = no "
                                 "budget (epsilon is still reported)", min=0.0),
        "on_budget": Option(str, "refuse", "when the planned rounds would exceed the "
                            "budget: 'refuse' to start, or 'stop' cleanly before the round "
                            "that would exceed it", choices=("refuse", "stop")),
        "accountant": Option(str, "rdp", "privacy accountant from dp-accounting",
                             choices=("rdp", "pld")),
    },
    "eval": {
        "every": Option(int, 1, "evaluate the global model on the test set every N rounds "
                        "(and always after the last round)", min=1),
    },
    "sim": {
        "engine": Option(str, "auto", "how cohorts train: 'fused' (batched matmuls, MLPs), "
                         "'vmap' (torch.func), 'sequential', or 'auto' = fastest exact one",
                         choices=("auto", "fused", "vmap", "sequential")),
        "threads": Option(int, 0, "PyTorch threads for training; 0 = automatic (1 for "
                          "cohorts under 32 clients, whose small matmuls do not scale, while "
                          "another core evaluates the previous round's model; all cores "
                          "otherwise, and evaluation then runs between rounds)",
                          min=0, max=1024),
        "time_model": Option(str, "none", "simulated device time: 'none' (updates arrive "
                             "as a cohort finishes training) or 'lognormal' (each client "
                             "takes examples x ms_per_example x a log-normal speed factor, "
                             "on a simulated clock)", choices=("none", "lognormal")),
        "ms_per_example": Option(float, 2.0, "time_model 'lognormal': median milliseconds "
                                 "per training example and epoch", min=0.0,
                                 min_exclusive=True),
        "speed_sigma": Option(float, 0.5, "time_model 'lognormal': sigma of the per-client "
                              "log-normal speed factor (0 = all alike)", min=0.0),
    },
    "deploy": {
        "host": Option(str, "127.0.0.1", "address the aggregator listens on"),
        "port": Option(int, 0, "gRPC port; 0 = any free port (written to the port file)",
                       min=0, max=65535),
        "target": Option(int, 0, "accepted updates that complete a round; 0 = "
                         "sampling.per_round", min=0),
        "over_selection": Option(float, 1.3, "devices asked per round = ceil(target x this), "
                                 "so stragglers do not hold a round up", min=1.0, max=10.0),
        "deadline_s": Option(float, 60.0, "reporting deadline of a round, in seconds",
                             min=0.0, min_exclusive=True),
        "min_fraction": Option(float, 0.8, "a round commits with at least this fraction of "
                               "target; otherwise it is abandoned and retried", min=0.0,
                               min_exclusive=True, max=1.0),
        "max_norm": Option(float, 0.0, "refuse updates with a larger L2 norm; 0 = no bound",
                           min=0.0),
        "max_update_mb": Option(float, 64.0, "refuse uploads larger than this", min=0.0,
                                min_exclusive=True),
        "wait_devices": Option(int, 0, "enrolled devices to wait for before round 1; 0 = "
                               "data.clients", min=0),
        "wait_timeout_s": Option(float, 300.0, "give up waiting for devices after this",
                                 min=0.0),
        "checkin_interval_s": Option(float, 5.0, "devices not needed by the current round "
                                     "come back within 0.5-1.5 x this (pace steering)",
                                     min=0.0, min_exclusive=True),
        "selection": Option(str, "uniform", "who is asked each round: 'uniform' (the same "
                            "cohorts as the simulator), 'stratified' (proportional to "
                            "deploy.stratify_by), 'availability' (devices whose declared "
                            "window covers now), 'fairness' (least-participated first)",
                            choices=("uniform", "stratified", "availability", "fairness")),
        "stratify_by": Option(str, "", "device attribute for selection = 'stratified'"),
        "max_active_uploads": Option(int, 64, "uploads the aggregator reads at once (the "
                                     "rest wait under flow control: flat memory)", min=1),
        "metrics_port": Option(int, -1, "Prometheus /metrics port; -1 = off, 0 = any free "
                               "port", min=-1, max=65535),
    },
    "output": {
        "dir": Option(str, "runs", "parent directory of run directories"),
        "name": Option(str, "", "run directory name; empty = timestamp and seed"),
        "store": Option(str, "", "model store directory: commit the final model there as a "
                        "new candidate version (see `shoal models`); empty = none"),
    },
}


class Config:
    """A validated configuration: ``cfg["client"]["lr"]`` or ``cfg.get("client.lr")``."""

    def __init__(self, values: Mapping[str, Mapping[str, Any]]) -> None:
        self._values = {s: dict(v) for s, v in values.items()}

    def __getitem__(self, section: str) -> dict[str, Any]:
        return self._values[section]

    def get(self, dotted: str) -> Any:
        section, key = _split(dotted)
        return self._values[section][key]

    @property
    def seed(self) -> int:
        return self._values[""]["seed"]

    @property
    def rounds(self) -> int:
        return self._values[""]["rounds"]

    def to_dict(self) -> dict[str, Any]:
        """Nested dict as in the TOML file (top-level keys at the top)."""
        out: dict[str, Any] = dict(self._values[""])
        for section, values in self._values.items():
            if section:
                out[section] = dict(values)
        return out

    def with_overrides(self, overrides: Mapping[str, Any]) -> Config:
        """A new config with dotted-key overrides applied and re-validated."""
        nested = copy.deepcopy(self.to_dict())
        for dotted, value in overrides.items():
            section, key = _split(dotted)
            target = nested if not section else nested.setdefault(section, {})
            target[key] = value
        return parse_config(nested)


def _split(dotted: str) -> tuple[str, str]:
    section, _, key = dotted.rpartition(".")
    if section not in SCHEMA or key not in SCHEMA[section]:
        raise ConfigError(f"unknown config key {dotted!r}; known keys: "
                          f"{', '.join(_all_keys())}", key=dotted)
    return section, key


def _all_keys() -> list[str]:
    return [f"{s}.{k}" if s else k for s, opts in SCHEMA.items() for k in opts]


def parse_config(raw: Mapping[str, Any]) -> Config:
    """Validate a nested mapping (as read from TOML) and fill in defaults.

    Raises:
        ConfigError: an unknown section or key, a wrong type, a value out of range, or an
            inconsistent combination; the message names the key and what is allowed.
    """
    values: dict[str, dict[str, Any]] = {s: {} for s in SCHEMA}
    for name, value in raw.items():
        if isinstance(value, Mapping):
            if name not in SCHEMA or name == "":
                raise ConfigError(f"unknown config section [{name}]; known sections: "
                                  f"{', '.join(s for s in SCHEMA if s)}", key=name)
            for key, v in value.items():
                if key not in SCHEMA[name]:
                    raise ConfigError(f"unknown config key {name}.{key}; [{name}] has: "
                                      f"{', '.join(SCHEMA[name])}", key=f"{name}.{key}")
                values[name][key] = SCHEMA[name][key].check(f"{name}.{key}", v)
        else:
            if name not in SCHEMA[""]:
                raise ConfigError(f"unknown config key {name!r}; known top-level keys: "
                                  f"{', '.join(SCHEMA[''])} (others belong in a [section])",
                                  key=name)
            values[""][name] = SCHEMA[""][name].check(name, value)
    for section, opts in SCHEMA.items():
        for key, opt in opts.items():
            values[section].setdefault(key, opt.default)
    _check_consistency(values)
    return Config(values)


def _check_consistency(v: dict[str, dict[str, Any]]) -> None:
    clients = v["data"]["clients"]
    if v["sampling"]["method"] == "uniform" and v["sampling"]["per_round"] > clients:
        raise ConfigError(f"sampling.per_round = {v['sampling']['per_round']} is not allowed: "
                          f"it must be <= data.clients ({clients})", key="sampling.per_round")
    if v["model"]["name"] == "cnn" and v["data"]["dataset"] != "fashion-mnist":
        raise ConfigError("model.name = 'cnn' needs 28x28 images: use it with "
                          "data.dataset = 'fashion-mnist'", key="model.name")
    p = v["privacy"]
    if p["placement"] != "none" and v["sampling"]["method"] == "uniform" \
            and p["accountant"] == "pld":
        raise ConfigError("privacy.accountant = 'pld' cannot account for fixed-size "
                          "(sampling.method = 'uniform') sampling; use sampling.method = "
                          "'poisson' or privacy.accountant = 'rdp'", key="privacy.accountant")
    if p["adaptive_clipping"] and p["placement"] != "central":
        raise ConfigError("privacy.adaptive_clipping needs privacy.placement = 'central'",
                          key="privacy.adaptive_clipping")
    if v["secure_aggregation"]["enabled"]:
        if p["placement"] == "local":
            raise ConfigError("secure_aggregation.enabled cannot be combined with "
                              "privacy.placement = 'local': use 'central' (clip before the "
                              "secure sum, noise after it)", key="secure_aggregation.enabled")
        if v["compression"]["upload"].strip() not in ("", "none"):
            raise ConfigError("secure_aggregation.enabled cannot be combined with "
                              "compression.upload: masked vectors are uniformly random and "
                              "do not compress; set secure_aggregation.value_bits instead",
                              key="compression.upload")
    from shoal.codec import Chain

    Chain.parse(v["compression"]["upload"], key="compression.upload")


def load_config(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None
                ) -> Config:
    """Read a TOML config (or the defaults when ``path`` is None) and apply overrides.

    Raises:
        ConfigError: the file is missing, is not valid TOML, or fails validation.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            raw = tomllib.loads(p.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {p} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {p} is not valid TOML: {exc}") from None
    cfg = parse_config(raw)
    return cfg.with_overrides(overrides) if overrides else cfg


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(v)


def to_toml(cfg: Config) -> str:
    """The resolved config as TOML, every key written out (reloads to an equal config)."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in cfg[""].items()]
    for section in SCHEMA:
        if section:
            lines += ["", f"[{section}]"]
            lines += [f"{k} = {_toml_value(v)}" for k, v in cfg[section].items()]
    return "\n".join(lines) + "\n"


def config_markdown(sections: Sequence[str] | None = None) -> str:
    """The configuration reference (``docs/configuration.md``) generated from :data:`SCHEMA`."""
    out = ["# Configuration reference", "",
           "Generated from `shoal.config.SCHEMA` (a test keeps this page in sync). A run is "
           "configured by one TOML file; every key is optional and defaults to the reference "
           "workload \"config S\". Unknown keys and out-of-range values are refused with a "
           "message naming the key. On the command line, `--set section.key=value` overrides "
           "any key, and `--rounds`, `--clients`, `--per-round` and `--seed` are shortcuts.",
           ""]
    for section in sections or SCHEMA:
        out += [f"## `[{section}]`" if section else "## top level", "",
                "| key | default | allowed | meaning |", "| --- | --- | --- | --- |"]
        for key, opt in SCHEMA[section].items():
            out.append(f"| `{key}` | `{_toml_value(opt.default)}` | {opt.allowed()} | "
                       f"{opt.help} |")
        out.append("")
    return "\n".join(out)
