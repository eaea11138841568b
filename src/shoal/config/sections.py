"""The typed sections of a run's configuration: one frozen dataclass per TOML table.

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
           "RoundConfig", "CompressionConfig", "SecureAggregationConfig", "PrivacyConfig",
           "EvalConfig", "SimConfig", "DeployConfig", "OutputConfig", "DashboardConfig",
           "TracingConfig", "RobustConfig", "AttackConfig", "GossipConfig",
           "HierarchyConfig"]

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


@section("secure_aggregation")
class SecureAggregationConfig(Section):
    """SecAgg+, so the server sees only the sum of the updates."""

    enabled: bool = option(False, "aggregate securely: the server sees only the sum")
    protocol: str = option("secagg", "'secagg': SecAgg+ (pairwise masks from X25519, Shamir "
                           "shares, dropout recovery); 'ckks': homomorphic encryption "
                           "(TenSEAL CKKS; a key holder decrypts only the sum; in "
                           "simulation and over gRPC, there without DP)",
                           choices=("secagg", "ckks"))
    ckks_degree: int = option(4096, "protocol 'ckks': ring degree N, 4096 (128-bit security) "
                              "or 8192 (256-bit, twice the bytes)", min=4096, max=8192)
    clip: float = option(0.5, "per-coordinate range [-clip, clip] of the fixed-point encoding "
                         "(larger values are clipped)", min=0.0, min_exclusive=True)
    value_bits: int = option(20, "quantization bits per coordinate (stochastic rounding)",
                             min=2, max=40)
    max_weight: int = option(4096, "largest per-client weight (example count) that is masked; "
                             "larger counts are capped", min=1, max=1_000_000)
    encoding: str = option("fixed_point", "protocol 'secagg': how updates enter the ring: "
                           "'fixed_point' (clip, value_bits, example weights) or 'rotated' "
                           "(L2 clip to norm_clip, a random rotation shared per round, a "
                           "ring of ring_bits, every client weighing 1: ~5x fewer bytes at 8 "
                           "bits; needed by privacy.placement = 'distributed'; in "
                           "simulation and over gRPC)", choices=("fixed_point", "rotated"))
    ring_bits: int = option(0, "encoding 'rotated': bits per ring element (8: one byte per "
                            "parameter); 0 = 8, or 16 with privacy.placement = 'distributed'",
                            min=0, max=32)
    norm_clip: float = option(1.0, "encoding 'rotated' without distributed DP: the L2 norm "
                              "every client clips its update to (distributed DP clips to "
                              "privacy.clip_norm)", min=0.0, min_exclusive=True)
    neighbours: int = option(0, "SecAgg+ neighbours k; 0 = automatic (complete graph with a "
                             "majority threshold below 100 clients, else the SecAgg+ "
                             "parameter search from dropout and corrupt_rate); -1 = complete "
                             "graph (SecAgg)", min=-1)
    threshold: int = option(0, "Shamir threshold t; 0 = with k", min=0)
    dropout: float = option(0.0, "expected dropout rate (sets k and t for cohorts of 100 or "
                            "more); in simulation also the fraction of each cohort that "
                            "vanishes after sharing keys (their masks are recovered)", min=0.0,
                            max=0.5)
    post_quantum: bool = option(False, "protocol 'secagg': hybrid X25519 + ML-KEM-768 "
                                "pairwise keys, so masks stay secret if either holds "
                                "(in simulation and over gRPC)")
    dropout_stage: str = option("share_keys", "simulation: the last stage the dropouts "
                                "complete ('setup': they never advertise keys; "
                                "'advertise_keys'; 'share_keys'; 'masked_input': their input "
                                "counts but they never help unmask), or 'any' (each at a "
                                "random one)",
                                choices=("setup", "advertise_keys", "share_keys",
                                         "masked_input", "any"))
    corrupt_rate: float = option(0.05, "assumed fraction of clients colluding with the server "
                                 "(sets k and t)", min=0.0, max=0.45)
    roster_wait_s: float = option(15.0, "deployments: longest wait for the selected devices "
                                  "to check in before the round's roster closes", min=0.0,
                                  min_exclusive=True)
    stage_timeout_s: float = option(10.0, "deployments: length of the key-exchange and "
                                    "unmasking stages (devices that miss one are dropouts; "
                                    "input collection runs to deploy.deadline_s)", min=0.0,
                                    min_exclusive=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.ring_bits and self.ring_bits < 4:
            raise ConfigError(f"secure_aggregation.ring_bits = {self.ring_bits} is not "
                              f"allowed: use 0 (automatic) or 4 to 32",
                              key="secure_aggregation.ring_bits")


@section("privacy")
class PrivacyConfig(Section):
    """Differential privacy and its accounting."""

    placement: str = option("none", "differential privacy: 'central' (server clips and adds "
                            "noise), 'local' (each client does), 'distributed' (each client "
                            "adds a discrete Gaussian share inside secure aggregation, so "
                            "the server never sees a noiseless sum; needs "
                            "secure_aggregation.encoding = 'rotated'), or 'none'",
                            choices=("none", "central", "local", "distributed"))
    noise_multiplier: float = option(1.0, "z: noise std = z * clip_norm", min=0.0,
                                     min_exclusive=True)
    clip_norm: float = option(1.0, "C: L2 bound on each client update (the initial value with "
                              "adaptive clipping)", min=0.0, min_exclusive=True)
    adaptive_clipping: bool = option(False, "learn C as a quantile of update norms (central "
                                     "placement; Andrew et al. 2021)")
    target_quantile: float = option(0.5, "adaptive clipping: fraction of updates to leave "
                                    "unclipped", min=0.0, max=1.0, min_exclusive=True,
                                    max_exclusive=True)
    clip_learning_rate: float = option(0.2, "adaptive clipping: geometric step size", min=0.0,
                                       min_exclusive=True)
    count_noise_std: float = option(0.0, "adaptive clipping: noise std on the unclipped "
                                    "count, in clients; 0 = expected clients / 20", min=0.0)
    delta: float = option(1e-05, "delta at which epsilon is reported (keep it well below 1 / "
                          "number of clients)", min=0.0, max=0.1, min_exclusive=True)
    epsilon_budget: float = option(0.0, "largest epsilon the run may spend; 0 = no budget "
                                   "(epsilon is still reported)", min=0.0)
    on_budget: str = option("refuse", "when the planned rounds would exceed the budget: "
                            "'refuse' to start, or 'stop' cleanly before the round that "
                            "would exceed it", choices=("refuse", "stop"))
    accountant: str = option("rdp", "privacy accountant from dp-accounting",
                             choices=("rdp", "pld"))
    honest_clients: int = option(0, "placement 'distributed': h, the fewest honest clients "
                                 "whose noise must be in a released sum; each client adds "
                                 "1/h of the noise variance, and a round with fewer than h + "
                                 "colluding_clients masked inputs releases nothing (dropouts "
                                 "count against h); 0 = sampling.per_round", min=0)
    colluding_clients: int = option(0, "placement 'distributed': f, included clients that "
                                    "may collude with the server (their noise does not "
                                    "count)", min=0)


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


@section("deploy")
class DeployConfig(Section):
    """The gRPC aggregator of a deployment."""

    host: str = option("127.0.0.1", "address the aggregator listens on")
    port: int = option(0, "gRPC port; 0 = any free port (written to the port file)", min=0,
                       max=65_535)
    target: int = option(0, "accepted updates that complete a round; 0 = sampling.per_round",
                         min=0)
    over_selection: float = option(1.3, "devices asked per round = ceil(target x this), so "
                                   "stragglers do not hold a round up", min=1.0, max=10.0)
    deadline_s: float = option(60.0, "reporting deadline of a round, in seconds", min=0.0,
                               min_exclusive=True)
    min_fraction: float = option(0.8, "a round commits with at least this fraction of target; "
                                 "otherwise it is abandoned and retried", min=0.0, max=1.0,
                                 min_exclusive=True)
    max_norm: float = option(0.0, "refuse updates with a larger L2 norm; 0 = no bound",
                             min=0.0)
    max_update_mb: float = option(0.0, "refuse uploads larger than this (at the header, "
                                  "before reading them); 0 = the largest an update of the "
                                  "model can be in compression.upload's codec, which also "
                                  "bounds any value given", min=0.0)
    wait_devices: int = option(0, "enrolled devices to wait for before round 1; 0 = "
                               "data.clients", min=0)
    wait_timeout_s: float = option(300.0, "give up waiting for devices after this", min=0.0)
    checkin_interval_s: float = option(5.0, "devices not needed by the current round come "
                                       "back within 0.5-1.5 x this (pace steering)", min=0.0,
                                       min_exclusive=True)
    max_active_uploads: int = option(64, "uploads the aggregator reads at once (the rest wait "
                                     "under flow control: flat memory)", min=1)
    bdp_probe: bool = option(False, "let gRPC grow each connection's HTTP/2 flow-control "
                             "window to its bandwidth-delay product: uploads no longer wait "
                             "for a window update every 64 KiB (needed on high-latency links, "
                             "where a fixed window caps a stream at 64 KiB per round trip: "
                             "1.3 MB/s at 50 ms), but an upload waiting "
                             "for one of max_active_uploads may then hold megabytes of the "
                             "aggregator's memory instead of 64 KiB: for trusted callers "
                             "(cross-silo, edge aggregators) only")
    idle_timeout_s: float = option(20.0, "a caller's next message (a request, an upload's "
                                   "header or chunk) must arrive within this, else the call "
                                   "is cut; connections that make no call, or do not finish "
                                   "their handshake, are closed after it too", min=0.0,
                                   min_exclusive=True, max=3600.0)
    max_weight: int = option(0, "the largest weight (example count) one device's update "
                             "carries; larger claims count as this. 0 = weight_cap_multiple "
                             "x the median size devices declared or claimed", min=0)
    weight_cap_multiple: float = option(4.0, "with max_weight = 0: the cap as a multiple of "
                                        "the median device size (lower bounds a lying device "
                                        "more tightly, and weighs down more honest large "
                                        "ones)", min=1.0, max=1e6)
    metrics_port: int = option(-1, "Prometheus /metrics port; -1 = off, 0 = any free port",
                               min=-1, max=65_535)
    registry: str = option("sqlite", "the device registry: 'sqlite' (a file in the state "
                           "directory, one aggregator process) or 'redis' (deploy.redis_url, "
                           "shared by several processes: the aggregator cluster)",
                           choices=("sqlite", "redis"))
    redis_url: str = option("redis://127.0.0.1:6379/0", "the Redis of registry = 'redis' "
                            "and of the aggregator cluster's round state (docs/scaling.md)")
    redis_prefix: str = option("shoal", "prefix of every Redis key of this deployment "
                               "(several deployments may share one Redis)")
    ingest_grace_s: float = option(2.0, "aggregator cluster: ingest nodes stop folding this "
                                   "long before a round's deadline, so their partial "
                                   "aggregates reach the committer in time", min=0.0,
                                   max=3600.0)


@section("output")
class OutputConfig(Section):
    """Where a run writes its results."""

    dir: str = option("runs", "parent directory of run directories")
    name: str = option("", "run directory name; empty = timestamp and seed")
    store: str = option("", "model store directory: commit the final model there as a new "
                        "candidate version (see `shoal models`); empty = none")


_LOOPBACK = ("127.0.0.1", "localhost", "::1")


@section("dashboard")
class DashboardConfig(Section):
    """The web dashboard of a deployment (docs/dashboard.md)."""

    address: str = option("", "HOST:PORT where `shoal serve` serves the dashboard (port 0 = "
                          "any free one; [::1]:PORT for IPv6); empty = none. `shoal launch` "
                          "serves it on 127.0.0.1:0 when this is empty (--no-dashboard: never)")
    allow_remote: bool = option(False, "allow an address other than loopback (the dashboard "
                                "speaks plain HTTP: put a TLS proxy in front of it)")
    token_file: str = option("", "file with the operator token that promote and rollback "
                             "need; empty = dashboard-token in the state directory, created "
                             "(mode 0600) with a fresh random token if missing")
    push_interval_s: float = option(1.0, "how often an open page is sent what changed "
                                    "(server-sent events), in seconds", min=0.05, max=60.0)
    history: int = option(100_000, "rounds kept in memory for the charts (the oldest are "
                          "dropped first)", min=10)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.address:
            host, _ = self.host_port
            if host not in _LOOPBACK and not self.allow_remote:
                raise ConfigError(f"dashboard.address = {self.address!r} is not loopback: the "
                                  "dashboard speaks plain HTTP; listen on 127.0.0.1 or set "
                                  "dashboard.allow_remote = true behind a TLS proxy",
                                  key="dashboard.address")

    @property
    def host_port(self) -> tuple[str, int]:
        """``address`` split into host and port (``"[::1]:80"`` -> ``("::1", 80)``).

        Raises:
            ConfigError: not ``HOST:PORT`` with a port in 0..65535.
        """
        host, sep, port = self.address.rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if not sep or not host or not port.isdigit() or int(port) > 65_535:
            raise ConfigError(f"dashboard.address = {self.address!r}: expected HOST:PORT "
                              "(e.g. 127.0.0.1:8080; port 0 = any free one)",
                              key="dashboard.address")
        return host, int(port)


@section("tracing")
class TracingConfig(Section):
    """OpenTelemetry traces of rounds and tasks (docs/dashboard.md#tracing)."""

    exporter: str = option("none", "where spans go: 'none', 'console' (stderr), 'file' (one "
                           "JSON object per span and line, tracing.file) or 'otlp' (a "
                           "collector, tracing.endpoint; needs the dashboard extra)",
                           choices=("none", "console", "file", "otlp"))
    file: str = option("", "exporter 'file': the JSON-lines file spans are appended to; empty "
                       "= traces.jsonl in the state directory")
    endpoint: str = option("http://127.0.0.1:4318/v1/traces", "exporter 'otlp': the "
                           "collector's OTLP/HTTP traces endpoint")
    service_name: str = option("shoal", "the service.name resource attribute of every span")


@section("robust")
class RobustConfig(Section):
    """Byzantine-robust aggregation (docs/robustness.md)."""

    rule: str = option("none", "robust aggregation rule: 'none' (the weighted mean), "
                       "'median' (coordinate-wise), 'trimmed_mean', 'krum', 'multi_krum', "
                       "'bulyan' (these hold the round's updates: memory O(updates x model)), "
                       "'centered_clip' (streams)",
                       choices=("none", "median", "trimmed_mean", "krum", "multi_krum",
                                "bulyan", "centered_clip"))
    byzantine_fraction: float = option(0.2, "at most this fraction of a round's updates is "
                                       "assumed Byzantine: f = ceil(fraction x n); a round "
                                       "that breaks the rule's assumption is refused",
                                       min=0.0, max=0.5, max_exclusive=True)
    trim: float = option(0.0, "trimmed_mean: fraction trimmed at each end of a coordinate; "
                         "0 = byzantine_fraction", min=0.0, max=0.5, max_exclusive=True)
    krum_m: int = option(0, "multi_krum: updates averaged; 0 = n - f", min=0)
    cc_tau: float = option(1.0, "centered_clip: clipping radius around the previous "
                           "aggregate", min=0.0, min_exclusive=True)
    norm_bound: float = option(0.0, "clip every update to this L2 norm before the rule (the "
                               "first round's bound with norm_adaptive); 0 = off", min=0.0)
    norm_adaptive: bool = option(False, "norm bound = norm_factor x the median norm of the "
                                 "previous round's updates")
    norm_factor: float = option(1.0, "norm_adaptive: the multiple of the median norm", min=0.0,
                                min_exclusive=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.norm_adaptive and self.norm_bound <= 0:
            raise ConfigError("robust.norm_adaptive needs robust.norm_bound > 0 (the first "
                              "round's bound)", key="robust.norm_adaptive")
        if self.trim and self.trim < self.byzantine_fraction:
            raise ConfigError(f"robust.trim = {self.trim:g} trims fewer values than the "
                              f"robust.byzantine_fraction = {self.byzantine_fraction:g} "
                              f"attackers send; use at least that (or 0)", key="robust.trim")


@section("attack")
class AttackConfig(Section):
    """Simulated attackers: some clients misbehave (simulation only; docs/robustness.md)."""

    kind: str = option("none", "what the malicious clients do: 'none', 'label_flip', "
                       "'sign_flip', 'gaussian', 'backdoor' (pixel pattern + model "
                       "replacement), 'alie' (a little is enough), 'ipm' (inner-product "
                       "manipulation), 'min_max', 'min_sum', 'sybil'",
                       choices=("none", "label_flip", "sign_flip", "gaussian", "backdoor",
                                "alie", "ipm", "min_max", "min_sum", "sybil"))
    fraction: float = option(0.1, "fraction of the population that is malicious (a fixed "
                             "set drawn from attack.seed)", min=0.0, max=1.0,
                             max_exclusive=True)
    knowledge: str = option("omniscient", "alie, ipm, min_max, min_sum: statistics from every "
                            "honest update of the cohort ('omniscient') or from the attackers' "
                            "own honest updates ('own')", choices=("omniscient", "own"))
    scale: float = option(0.0, "backdoor: boost of the malicious update (model "
                          "replacement); 0 = clients per round / server_lr; sign_flip: "
                          "multiple of the flipped update (0 = 1)", min=0.0)
    noise_std: float = option(1.0, "gaussian: standard deviation of the noise sent", min=0.0,
                              min_exclusive=True)
    ipm_epsilon: float = option(0.5, "ipm: the update sent is -epsilon x the honest mean",
                                min=0.0, min_exclusive=True)
    target_label: int = option(0, "backdoor: the label the pixel pattern maps to", min=0)
    poison_fraction: float = option(0.5, "backdoor: fraction of an attacker's examples that "
                                    "carry the pattern", min=0.0, max=1.0,
                                    min_exclusive=True)
    seed: int = option(0, "which clients are malicious (independent of the run seed)", min=0)


@section("gossip")
class GossipConfig(Section):
    """Peer-to-peer training with no server (`shoal gossip`, `shoal launch --gossip N`):
    data.clients peers, peer i trains on client i's data; rounds = gossip steps."""

    topology: str = option("ring", "who talks to whom: 'ring', 'torus' (2-D, wrap-around), "
                           "'regular' (random, gossip.degree), 'erdos_renyi' "
                           "(gossip.edge_probability), 'complete', 'exponential' (one peer "
                           "per step, time-varying), 'd_cliques' (cliques that each hold "
                           "every label, for label skew)",
                           choices=("ring", "torus", "regular", "erdos_renyi", "complete",
                                    "exponential", "d_cliques"))
    weights: str = option("metropolis", "mixing weights: 'metropolis' (Metropolis-Hastings, "
                          "1/(1 + max degree of the two ends)) or 'max_degree' (1/(1 + the "
                          "largest degree)); 'exponential' always mixes half-half",
                          choices=("metropolis", "max_degree"))
    degree: int = option(4, "topology 'regular': neighbours per peer", min=2)
    edge_probability: float = option(0.1, "topology 'erdos_renyi': probability of each "
                                     "edge (redrawn until connected)", min=0.0, max=1.0,
                                     min_exclusive=True)
    clique_size: int = option(10, "topology 'd_cliques': peers per clique (the paper uses "
                              "the number of classes)", min=2)
    interclique: str = option("full", "topology 'd_cliques': one edge between every pair "
                              "of cliques ('full') or cliques in a ring ('ring')",
                              choices=("full", "ring"))
    topology_seed: int = option(0, "seed of the random topologies and of D-Cliques' swaps",
                                min=0)
    rule: str = option("weighted", "how a peer mixes: 'weighted' (the weights of W) or "
                       "'trimmed_mean' (per coordinate, drop the gossip.trim largest and "
                       "smallest of its own and its neighbours' values: contains up to trim "
                       "Byzantine neighbours)", choices=("weighted", "trimmed_mean"))
    trim: int = option(1, "rule 'trimmed_mean': values dropped at each end", min=1)
    local_training: bool = option(True, "train locally each step; false = pure averaging "
                                  "(a consensus check)")
    init: str = option("same", "starting models: 'same' (every peer from the model of "
                       "`seed`, as D-PSGD) or 'independent' (peer i from its own "
                       "initialisation)", choices=("same", "independent"))
    peer_eval_examples: int = option(1000, "test examples each peer's own model is "
                                     "evaluated on (0 = all; the average model always "
                                     "uses all)", min=0)
    step_timeout_s: float = option(30.0, "deployed: a neighbour whose model has not come "
                                   "this long after a peer offered its own is passed over "
                                   "(down) until it is heard from again", min=0.0,
                                   min_exclusive=True)
    min_step_s: float = option(0.0, "deployed: each peer takes at least this long per step "
                               "(pacing)", min=0.0)


@section("hierarchy")
class HierarchyConfig(Section):
    """Hierarchical federated learning: edge aggregators between the devices and the global
    server, in simulation (docs/hierarchy.md)."""

    edges: int = option(0, "edge aggregators between the devices and the global server; "
                        "0 = flat (no hierarchy)", min=0, max=100_000)
    regions: int = option(0, "region aggregators between the edges and the global server "
                          "(a third tier); 0 = none", min=0, max=10_000)
    edge_rounds: int = option(1, "rounds each edge runs per round of its parent (regions "
                              "only fold): 1 = the edges only fold their groups' updates (the "
                              "same model as a flat run); > 1 = HierFAVG, each edge averaging "
                              "its devices that many times before its upload", min=1,
                              max=1000)
    edge_policy: str = option("sync", "how an edge runs its rounds: 'sync' (each edge round "
                              "awaits its whole group) or 'buffered' (FedBuff at the edge: "
                              "round.concurrency, buffer_size and the staleness settings, "
                              "capped by the group's size; edge_rounds server steps per "
                              "parent round)", choices=("sync", "buffered"))
    assignment: str = option("ring", "which edge serves a device: 'ring' (consistent hashing "
                             "with bounded loads) or 'region' (edge i is in region i mod "
                             "hierarchy.regions and serves only that region's devices; a "
                             "simulated device c is in region c mod hierarchy.regions)",
                             choices=("ring", "region"))
    load_factor: float = option(0.25, "eps of the bounded loads: no edge serves more than "
                                "ceil((1 + eps) x devices / live edges)", min=0.0,
                                min_exclusive=True, max=100.0)
    vnodes: int = option(64, "points per edge on the hashing ring", min=1, max=10_000)
    failures: str = option("", "simulated edge failures, 'EDGE@ROUND,...' (e.g. "
                           "'edge-3@2'): the edge trains its group in that round and dies "
                           "before its upload; its devices move to other edges")
