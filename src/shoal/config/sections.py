"""The typed sections of a run's training and simulation: one frozen dataclass per TOML table.

Holds ``[data]``, ``[model]``, ``[client]``, ``[strategy]``, ``[sampling]``, ``[round]``,
``[compression]``, ``[eval]`` and ``[sim]``; the protection sections (secure aggregation,
privacy, robust aggregation, attacks) are in :mod:`shoal.config.protection`, the deployment,
operations and topology ones in :mod:`shoal.config.operations`.

Each field is one key: its annotation is the type, :func:`~shoal.config.schema.option` gives
the default, the bounds and the one-line doc that ``shoal config`` and
``docs/configuration.md`` print. Defaults are the reference workload "config S"; key names and
defaults are part of the on-disk format (run directories, resumed runs), so renaming one
breaks old configs.
"""

from __future__ import annotations

from shoal.config.schema import Section, option, section
from shoal.errors import ConfigError

__all__ = ["DataConfig", "ModelConfig", "ClientConfig", "StrategyConfig", "SamplingConfig",
           "RoundConfig", "CompressionConfig", "EvalConfig", "SimConfig"]


@section("data")
class DataConfig(Section):
    """The training data and how it is split among clients."""

    dataset: str = option("fashion-mnist", "training data",
                          choices=("fashion-mnist", "synthetic"))
    path: str = option("", "directory holding the Fashion-MNIST IDX files; empty = "
                       "$SHOAL_FASHION_MNIST or /usr/share/datasets/fashion-mnist")
    clients: int = option(100, "number of clients the training set is split into", min=1,
                          max=10_000_000)
    partition: str = option("dirichlet", "how examples are split among clients (Fashion-MNIST "
                            "only; Synthetic is per-user by construction)",
                            choices=("dirichlet", "iid", "shards"))
    alpha: float = option(0.5, "Dirichlet concentration: smaller = more label skew", min=0.0,
                          min_exclusive=True)
    partition_seed: int = option(0, "seed of the partition, independent of the run seed so "
                                 "runs with different seeds share one split", min=0)
    shards_per_client: int = option(2, "shards per client for partition = 'shards'", min=1)
    synthetic_alpha: float = option(1.0, "Synthetic(alpha, beta): model heterogeneity (a "
                                    "standard deviation)", min=0.0)
    synthetic_beta: float = option(1.0, "Synthetic(alpha, beta): data heterogeneity (a "
                                   "standard deviation)", min=0.0)
    synthetic_iid: bool = option(False, "use the IID variant of Synthetic")
    population: str = option("partition", "'partition': split the dataset among the clients; "
                             "'generated': each client's data made on demand from "
                             "(partition_seed, client id), for populations too large to split "
                             "(Fashion-MNIST: examples drawn with replacement from a "
                             "per-client Dirichlet(alpha) class mix; Synthetic: one FedProx "
                             "user per client)", choices=("partition", "generated"))
    client_examples: int = option(60, "population 'generated': median examples per client",
                                  min=1, max=100_000)
    client_examples_sigma: float = option(0.5, "population 'generated': sigma of the "
                                          "log-normal spread of client sizes (0 = all equal; "
                                          "capped at 20 x the median)", min=0.0, max=5.0)


@section("model")
class ModelConfig(Section):
    """The model every client trains."""

    name: str = option("mlp2nn", "model architecture", choices=("mlp2nn", "logreg", "cnn"))


@section("client")
class ClientConfig(Section):
    """Local training on each client."""

    epochs: int = option(1, "local epochs per round", min=1, max=1000)
    batch_size: int = option(32, "local batch size (the last partial batch is kept)", min=1,
                             max=1_000_000)
    lr: float = option(0.05, "local SGD learning rate (no momentum)", min=0.0, max=100.0,
                       min_exclusive=True)


@section("strategy")
class StrategyConfig(Section):
    """The server optimizer that turns the mean update into a new model."""

    name: str = option("fedavg", "server aggregation strategy",
                       choices=("fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad"))
    server_lr: float = option(1.0, "server learning rate (eta); FedAvg uses 1.0, the adaptive "
                              "optimizers typically 0.01-0.1", min=0.0, max=100.0,
                              min_exclusive=True)
    mu: float = option(0.01, "FedProx proximal coefficient (strategy = 'fedprox')", min=0.0)
    beta1: float = option(0.9, "first-moment decay of FedAdam/FedYogi/FedAdagrad", min=0.0,
                          max=0.999999)
    beta2: float = option(0.99, "second-moment decay of FedAdam/FedYogi", min=0.0,
                          max=0.999999)
    tau: float = option(0.001, "adaptivity (epsilon) of the adaptive optimizers", min=0.0,
                        min_exclusive=True)


@section("sampling")
class SamplingConfig(Section):
    """Which clients are asked to train each round."""

    method: str = option("uniform", "'uniform': exactly per_round clients without "
                         "replacement; 'poisson': each client joins with probability q (what "
                         "DP accounting assumes)", choices=("uniform", "poisson"))
    per_round: int = option(10, "clients sampled per round (method 'uniform'); must not "
                            "exceed data.clients", min=1)
    q: float = option(0.1, "per-client sampling probability (method 'poisson')", min=0.0,
                      max=1.0, min_exclusive=True)
    selection: str = option("uniform", "which clients (method 'uniform'), in simulation and "
                            "deployment alike: 'uniform' (the wave-1 cohorts), 'stratified' "
                            "(proportional to the strata of sampling.stratify_by), "
                            "'availability' (clients whose declared window covers now), "
                            "'fairness' (least-participated first)",
                            choices=("uniform", "stratified", "availability", "fairness"))
    stratify_by: str = option("", "client attribute for selection = 'stratified': a device "
                              "attribute (shoal client --attr, e.g. 'os'); in simulation only "
                              "'label' (a client's most frequent training label)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.method == "poisson" and self.selection != "uniform":
            raise ConfigError(f"sampling.selection = {self.selection!r} needs a fixed cohort "
                              f"size: use it with sampling.method = 'uniform' (Poisson "
                              f"sampling picks each client independently)",
                              key="sampling.selection")
        if self.selection == "stratified" and not self.stratify_by:
            raise ConfigError("sampling.selection = 'stratified' needs sampling.stratify_by "
                              "(an attribute such as 'os', or 'label' in simulation)",
                              key="sampling.stratify_by")


@section("round")
class RoundConfig(Section):
    """When a round (or a buffered server step) closes and commits."""

    policy: str = option("sync", "'sync': synchronous rounds (every sampled client, or "
                         "deploy.target of them in a deployment); 'buffered': FedBuff "
                         "asynchronous aggregation (simulation)", choices=("sync", "buffered"))
    concurrency: int = option(10, "buffered: clients training at any time (more than "
                              "buffer_size makes updates staler: on config S, 20 ends 8 "
                              "points below 10)", min=1)
    buffer_size: int = option(10, "buffered: updates per server step (rounds counts server "
                              "steps)", min=1)
    staleness_exponent: float = option(0.5, "buffered: an update s versions old is scaled by "
                                       "1 / (1 + s)^a (0.5: the FedBuff paper's 1 / sqrt(1 + "
                                       "s))", min=0.0, max=10.0)
    staleness_reference: float = option(1.0, "buffered: the staleness whose weight is 1: "
                                        "weights are ((1 + r) / (1 + s))^a (0: the paper's "
                                        "raw weights; 1: FLSim's normalisation, so an update "
                                        "as stale as usual keeps its full size)", min=0.0,
                                        max=1000.0)
    max_staleness: int = option(10, "buffered: refuse updates more versions old than this",
                                min=0)


@section("compression")
class CompressionConfig(Section):
    """How updates and model downloads are encoded."""

    upload: str = option("none", "codec chain for client updates, stages joined by '+': none, "
                         "fp16, bf16, q8, q4, q2, sign, topk(F), randk(F), zstd; e.g. "
                         "'topk(0.01)+q8+zstd'")
    error_feedback: bool = option(False, "keep what compression dropped on the client and add "
                                  "it to the next update")
    download: str = option("full", "model downloads: 'full' or 'delta' against the client's "
                           "last synced version", choices=("full", "delta"))
    download_codec: str = option("none", "lossless chain for downloads: 'none' or 'zstd'",
                                 choices=("none", "zstd"))
    max_staleness: int = option(5, "a client more versions behind than this gets the full "
                                "model", min=0, max=1000)


@section("eval")
class EvalConfig(Section):
    """Central evaluation of the global model on the test set."""

    every: int = option(1, "evaluate the global model on the test set every N rounds (and "
                        "always after the last round)", min=1)


@section("sim")
class SimConfig(Section):
    """How the simulator trains cohorts and models device time."""

    engine: str = option("auto", "how cohorts train: 'fused' (batched matmuls, MLPs), 'vmap' "
                         "(torch.func), 'sequential', or 'auto' = fastest exact one",
                         choices=("auto", "fused", "vmap", "sequential"))
    backend: str = option("local", "who trains the cohorts: 'local' (this process) or 'ray' "
                          "(Ray actors, each training a slice of the cohort with the same "
                          "engine; pip install 'shoal[ray]'; see docs/scaling.md)",
                          choices=("local", "ray"))
    ray_address: str = option("", "backend 'ray': the cluster to join: '' = start a Ray on "
                              "this machine, 'auto' = the cluster this machine belongs to "
                              "(`ray start`), 'ray://host:10001' = a remote cluster's client "
                              "server")
    ray_actors: int = option(0, "backend 'ray': actors that train (one CPU and one PyTorch "
                             "thread each); 0 = one per CPU of the cluster", min=0,
                             max=100_000)
    threads: int = option(0, "PyTorch threads for training; 0 = automatic (1 for cohorts "
                          "under 32 clients, whose small matmuls do not scale, while another "
                          "core evaluates the previous round's model; all cores otherwise, "
                          "and evaluation then runs between rounds)", min=0, max=1024)
    time_model: str = option("none", "simulated device time: 'none' (updates arrive as a "
                             "cohort finishes training), 'lognormal' (each client takes "
                             "examples x ms_per_example x a log-normal speed factor, on a "
                             "simulated clock) or 'trace' (download, compute and upload "
                             "times and online windows from sim.trace; devices that go "
                             "offline mid-task drop out)",
                             choices=("none", "lognormal", "trace"))
    ms_per_example: float = option(2.0, "time_model 'lognormal' and the built-in traces: "
                                   "median milliseconds per training example and epoch",
                                   min=0.0, min_exclusive=True)
    speed_sigma: float = option(0.5, "time_model 'lognormal' and trace 'mobile': sigma of the "
                                "per-client log-normal speed factor (0 = all alike)", min=0.0)
    trace: str = option("mobile", "time_model 'trace': a built-in trace ('mobile': log-normal "
                        "compute, 3G/4G/Wi-Fi bandwidth classes, one night-time session a day "
                        "by time zone; 'uniform': always online, equal speed, instant "
                        "transfers) or a trace file (shoal's .npz, or FedScale's "
                        "client_device_capacity pickle)")
    trace_availability: str = option("", "FedScale's client_behave_trace pickle (online "
                                     "windows) to go with a FedScale capacity file in "
                                     "sim.trace; empty = always online")
    trace_seed: int = option(0, "seed of a built-in trace, independent of the run seed so "
                             "runs with different seeds share the same devices", min=0)
    online_hours: float = option(8.0, "trace 'mobile': mean length of a device's daily "
                                 "session, in hours", min=1.0, max=20.0)
    idle_wait_s: float = option(60.0, "simulated device time: when no device can be asked "
                                "(none online), wait this many simulated seconds and ask "
                                "again", min=0.0, min_exclusive=True)
    round_rules: str = option("all", "synchronous rounds in simulation: 'all' (await every "
                              "sampled client, as in wave 1) or 'deploy' (deploy.target, "
                              "over_selection, deadline_s and min_fraction, in simulated time)",
                              choices=("all", "deploy"))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.backend != "ray" and (self.ray_address or self.ray_actors):
            raise ConfigError("sim.ray_address and sim.ray_actors apply to sim.backend = "
                              "'ray' (this config trains in this process)",
                              key="sim.backend")
