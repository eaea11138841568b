"""The typed sections of deployment, operations and topology: how a run is served, written,
watched and traced, and the serverless (gossip) and hierarchical shapes it can take.

Holds ``[deploy]``, ``[output]``, ``[dashboard]``, ``[tracing]``, ``[canary]``, ``[gossip]``
and ``[hierarchy]``, declared like the training sections in :mod:`shoal.config.sections` (one
frozen dataclass per TOML table, each field one key with its type, default, bounds and
one-line doc). Key names and defaults are part of the on-disk format, so renaming one breaks
old configs.
"""

from __future__ import annotations

from shoal.config.schema import Section, option, section
from shoal.errors import ConfigError

__all__ = ["CanaryConfig", "DeployConfig", "OutputConfig", "DashboardConfig", "TracingConfig",
           "GossipConfig", "HierarchyConfig"]


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
    absent_after_s: float = option(30.0, "a device selected for a round that has missed its "
                                   "last appointment with the aggregator (the come-back time "
                                   "it was given, or its previous task's deadline) by this "
                                   "much is counted failed ('absent') at once, so the round "
                                   "closes with the devices that are there instead of at its "
                                   "deadline; 0 = never", min=0.0)
    heartbeat_s: float = option(0.0, "with absent_after_s, ask devices (runtime "
                                "shoal-client/5 or later) to call Heartbeat this often while "
                                "they train, so a device that dies holding a task is counted "
                                "absent too instead of holding its round to the deadline; 0 = "
                                "not asked (each call costs the aggregator a check-in's work)",
                                min=0.0)
    max_active_uploads: int = option(64, "uploads the aggregator reads at once (the rest wait "
                                     "under flow control: flat memory)", min=1)
    model_process: bool = option(False, "build the model and run central evaluation in a "
                                 "process of its own (shoal-model): the process serving "
                                 "devices then imports no PyTorch and no evaluation shares "
                                 "its GIL, at the price of a second interpreter (~80 MB more "
                                 "in all); off: one process")
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
                                   "is cut (after 1-1.25 x this: one timer checks all calls "
                                   "every quarter of it); connections that make no call, or "
                                   "do not finish their handshake, are closed after it too",
                                   min=0.0,
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


@section("canary")
class CanaryConfig(Section):
    """A canary rollout (``shoal launch --canary VERSION``): the candidate served to a share
    of the devices, compared with production by federated evaluation until the rule decides
    to promote or roll back (docs/lifecycle.md). Each key has a ``shoal launch`` flag that
    overrides it."""

    fraction: float = option(0.1, "share of the devices served the candidate (a device's arm "
                             "is a salted hash of its id)", min=0.0, min_exclusive=True,
                             max=1.0, max_exclusive=True)
    cohort: int = option(30, "devices per arm asked in each evaluation round", min=1)
    min_clients: int = option(30, "reports per arm before the rule may decide", min=2)
    alpha: float = option(0.05, "level of each one-sided test (candidate worse; candidate "
                          "not worse)", min=0.0, min_exclusive=True, max=0.5,
                          max_exclusive=True)
    margin: float = option(0.0, "how much higher the candidate's loss may be and still count "
                           "as not worse", min=0.0)
    cap: float = option(10.0, "each reported loss is bounded to [0, cap] before the test (a "
                        "device cannot pull an arm's mean by more than cap / n)", min=0.0,
                        min_exclusive=True)
    trim: float = option(0.1, "share of each arm cut from either end before comparing "
                         "(Yuen's trimmed test; 0 = Welch's test on plain means)", min=0.0,
                         max=0.5, max_exclusive=True)
    max_rounds: int = option(10, "evaluation rounds before an undecided canary is rolled back",
                             min=1)
    evaluation_timeout_s: float = option(60.0, "how long each evaluation round waits for "
                                         "reports", min=0.0, min_exclusive=True)
    holdout: float = option(0.2, "share of each device's examples kept out of training and "
                            "evaluated on (the devices of shoal launch are started with it)",
                            min=0.0, min_exclusive=True, max=1.0, max_exclusive=True)
    segment_by: str = option("", "break the evaluations down by this device attribute (the "
                             "value each device declared at Hello); '' = no breakdown")


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
