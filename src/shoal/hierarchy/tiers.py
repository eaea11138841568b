"""A tier of edge aggregators as one client pool for the tier above, and the tiers of a run.

:class:`Tier` is a :class:`~shoal.runner.ClientPool`: the tier above (the global
coordinator, or a region's) sends it a task for some clients; it splits them by edge (the
:class:`~shoal.hierarchy.ring.Ring`'s assignment), lets each edge answer for its group over
the tier below (:meth:`Edge.answer <shoal.hierarchy.edge.Edge.answer>`) and yields one
:class:`~shoal.events.PartialAggregate` per edge. Stacking tiers gives any depth: device ->
edge -> region -> global is a region tier whose pool is an edge tier whose pool is the
devices.

Failure (simulated): an edge scheduled to fail in a parent round keyed ``r`` trains its group
(its devices upload to it) and dies before its upload: the parent hears nothing for those
clients, its policy decides (commit with the rest, or abandon and retry), and the ring moves
the dead edge's devices to the next live edges, where their next task finds them.

A tier tells its :attr:`Tier.observer` (set by the run: the dashboard, the run directory's
``edges.jsonl``) one :class:`EdgeReport` per edge and task: its devices, its upload, a
failure and where the failed edge's devices went.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from shoal.config import Config
from shoal.errors import ConfigError
from shoal.events import Arrival, PartialAggregate, TrainTask, UpdateBatch
from shoal.hierarchy.edge import Edge
from shoal.hierarchy.ring import Ring
from shoal.observers import Observer
from shoal.pipeline import SumRule
from shoal.policy import BufferedPolicy, RoundPolicy
from shoal.runner import ClientPool

__all__ = ["EdgeReport", "Tier", "Route", "check_edge_downloads", "edge_report",
           "hierarchy_from_config", "observe_tiers", "parse_failures"]


@dataclass(frozen=True)
class EdgeReport:
    """One edge's part in one task of its tier (:meth:`Observer.edge_reported
    <shoal.observers.Observer.edge_reported>`).

    Attributes:
        round: the parent's round key of the task.
        edge: the edge's name.
        assigned: devices the ring gives it now (edges, for a region tier).
        asked: the task's clients in its group.
        accepted: client updates inside its upload (0 without one).
        device_bytes: bytes its devices' accepted updates took to it (and, from tiers
            below, into theirs).
        upload_bytes: its upload's bytes to the parent (0 without one).
        outcome: ``uploaded``, ``failed`` (it died before its upload) or ``no_round`` (no
            edge round committed, or a secure group too small to sum).
        moved_to: a failed edge's devices, by the edge the ring moved them to.
    """

    round: int
    edge: str
    assigned: int
    asked: int
    accepted: int = 0
    device_bytes: float = 0.0
    upload_bytes: float = 0.0
    outcome: str = "uploaded"
    moved_to: Mapping[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self) | {"moved_to": dict(self.moved_to)}


class Route:
    """Which edge of a tier serves a device: its edge on ``ring``, or (a tier above edges)
    the node that the ring above assigns to the device's edge below.

    Args:
        ring: this tier's ring (its edges).
        below: the route of the tier below (``None``: this tier's ring places devices).
        region_of: the region a device (or an edge below) declares, or ``None``.
    """

    def __init__(self, ring: Ring, below: Route | None = None,
                 region_of: Callable[[str], str | None] | None = None) -> None:
        self.ring = ring
        self.below = below
        self.region_of = region_of or (lambda name: None)

    def node_of(self, device: int) -> str:
        """The node serving ``device`` (placing it, or its edge, on first sight)."""
        name = str(device) if self.below is None else self.below.node_of(device)
        return self.ring.assign(name, self.region_of(name))

    def groups(self, client_ids: np.ndarray) -> dict[str, np.ndarray]:
        """``client_ids`` split by node (each group sorted)."""
        out: dict[str, list[int]] = {}
        for c in np.asarray(client_ids, np.int64).tolist():
            out.setdefault(self.node_of(c), []).append(c)
        return {k: np.array(sorted(v), np.int64) for k, v in out.items()}


class Tier:
    """Edges of one tier as a client pool (see the module docstring).

    Args:
        edges: the tier's edges (their names are the ring's).
        route: device -> edge.
        below: the pool the edges' tasks go to (the devices, or the tier below).
        failures: parent round key -> names of edges that fail during that round.

    Raises:
        ConfigError: an edge unknown to the ring, or a failure naming an unknown edge.
    """

    def __init__(self, edges: Sequence[Edge], route: Route, below: ClientPool,
                 failures: Mapping[int, Sequence[str]] | None = None) -> None:
        self.edges = {e.name: e for e in edges}
        if set(self.edges) != set(route.ring.edges):
            raise ConfigError("a tier's edges and its ring's must be the same",
                              key="hierarchy.edges")
        self.route = route
        self.below = below
        self.failures = {int(k): tuple(v) for k, v in (failures or {}).items()}
        for names in self.failures.values():
            unknown = set(names) - set(self.edges)
            if unknown:
                raise ConfigError(f"hierarchy.failures names unknown edges {sorted(unknown)}",
                                  key="hierarchy.failures")
        #: edges that failed, in order (each also taken off the ring)
        self.failed: list[str] = []
        #: told one :class:`EdgeReport` per edge and task (``None``: nobody listens)
        self.observer: Observer | None = None

    @property
    def num_clients(self) -> int:
        return self.below.num_clients

    def train(self, task: TrainTask, client_ids: np.ndarray) -> Iterator[PartialAggregate]:
        """Each live edge's upload for its group of ``client_ids`` (edges in ring order)."""
        groups = self.route.groups(client_ids)
        dying = [e for e in self.failures.get(task.round, ()) if e not in self.failed]
        below: ClientPool = self.below
        if not isinstance(below, Tier) and self.edges:
            # every edge's first round trains the parent's model with one key: train the
            # whole cohort as one batch (what a flat run does) instead of one per edge
            # (only the groups their edges will ask: a secure group too small to sum is not)
            first_key = next(iter(self.edges.values())).first_key(task)
            asked = [ids for name, ids in groups.items() if self.edges[name].sums(ids)]
            below = _FirstRound(below, task, first_key,
                                np.concatenate(asked) if asked else np.zeros(0, np.int64))
        reports: list[EdgeReport] = []
        for name in self.route.ring.edges:
            ids = groups.get(name)
            if ids is None:
                continue
            edge = self.edges[name]
            upload = edge.answer(task, ids, below)
            if name not in dying and upload is not None:
                yield upload
            if self.observer is not None:
                reports.append(edge_report(task.round, name, ids, edge, upload,
                                           name in dying))
        ring = self.route.ring
        for name in dying:  # each trained its group (if any), then died before its upload
            self.failed.append(name)
            moved = ring.fail(name)
            if self.observer is not None:
                to = dict(Counter(ring.edge_of(d) or "" for d in moved))
                reports = [replace(r, moved_to=to) if r.edge == name else r
                           for r in reports]
                if not any(r.edge == name for r in reports):  # it had no group this task
                    reports.append(EdgeReport(task.round, name, 0, 0, outcome="failed",
                                              moved_to=to))
        if self.observer is not None:
            loads = ring.loads()
            for r in reports:
                self.observer.edge_reported(replace(r, assigned=loads.get(r.edge, 0)))

    @property
    def aggregates_securely(self) -> bool:
        """Whether the edges sum their groups securely (the parent then sums plainly)."""
        return any(e.sum_rule is not None for e in self.edges.values())

    def cancel(self, task_id: int) -> None:
        """The parent closed the round: nothing of it is in flight here (edges answer
        within :meth:`train`)."""


def edge_report(round_: int, name: str, ids: np.ndarray, edge: Edge,
                upload: PartialAggregate | None, dying: bool = False) -> EdgeReport:
    """What ``edge`` did for its group ``ids`` of a task keyed ``round_`` (``assigned`` left
    0 for the caller, who knows the ring)."""
    if upload is None:
        return EdgeReport(round_, name, 0, len(ids),
                          device_bytes=float(sum(r.bytes_up for r in edge.records)),
                          outcome="failed" if dying else "no_round")
    return EdgeReport(round_, name, 0, len(ids), accepted=0 if dying else upload.clients,
                      device_bytes=float(upload.metrics.get("edge_ingress_bytes", 0.0)),
                      upload_bytes=0.0 if dying else float(upload.metrics.get("upload_bytes",
                                                                              0.0)),
                      outcome="failed" if dying else "uploaded")


def observe_tiers(pool: object, observer: Observer) -> None:
    """Let ``observer`` hear every tier of ``pool`` (nothing when it has none)."""
    while isinstance(pool, Tier):
        pool.observer = observer
        pool = pool.below


class _FirstRound:
    """The devices, with the updates of one model, settings and round key trained for a
    whole cohort at once and handed out per group; anything else is trained as asked.

    A client's update is a function of (model, settings, round key, client) alone, so this
    changes only the cost: a tier's edges all begin a parent task from its model with the
    same key, and training their groups as one cohort is what a flat round does (config L:
    one batch of 100 instead of ten of 10). Holds the cohort's rows until the task is
    answered (memory O(cohort x model), as a flat round's updates in flight)."""

    def __init__(self, below: ClientPool, parent: TrainTask, key: int,
                 client_ids: np.ndarray) -> None:
        self.below = below
        self.parent, self.key = parent, key
        self.cohort = np.unique(np.asarray(client_ids, np.int64))
        self.rows: dict[int, tuple[np.ndarray, int, dict[str, float]]] | None = None

    @property
    def num_clients(self) -> int:
        return self.below.num_clients

    def _same(self, task: TrainTask) -> bool:
        return (task.round == self.key and dict(task.settings) == dict(self.parent.settings)
                and task.clip_norm == self.parent.clip_norm
                and np.array_equal(task.params, self.parent.params))

    def train(self, task: TrainTask, client_ids: np.ndarray) -> Iterator[Arrival]:
        ids = np.asarray(client_ids, np.int64)
        if not self._same(task) or not np.isin(ids, self.cohort).all():
            yield from self.below.train(task, ids)
            return
        if self.rows is None:
            self.rows = {}
            for batch in self.below.train(task, self.cohort):
                if not isinstance(batch, UpdateBatch):  # only simulated devices train here
                    raise TypeError(f"a tier's devices answered with a "
                                    f"{type(batch).__name__}, not an UpdateBatch")
                keys = list(batch.metrics)
                for i, c in enumerate(np.asarray(batch.client_ids).tolist()):
                    self.rows[c] = (np.array(batch.deltas[i], copy=True),
                                    int(batch.num_examples[i]),
                                    {k: float(np.asarray(batch.metrics[k])[i]) for k in keys})
        got = [c for c in ids.tolist() if c in self.rows]  # a client may yield nothing
        if not got:
            return
        first = self.rows[got[0]]
        yield UpdateBatch(np.array(got, np.int64),
                          np.stack([self.rows[c][0] for c in got]),
                          np.array([self.rows[c][1] for c in got], np.int64),
                          {k: np.array([self.rows[c][2][k] for c in got]) for k in first[2]},
                          task.version)

    def cancel(self, task_id: int) -> None:
        cancel = getattr(self.below, "cancel", None)
        if cancel is not None:
            cancel(task_id)


def parse_failures(text: str) -> dict[int, list[str]]:
    """``'edge-3@2,edge-5@4'`` -> ``{2: ['edge-3'], 4: ['edge-5']}``.

    Raises:
        ConfigError: an entry that is not ``NAME@ROUND`` with a round >= 1.
    """
    out: dict[int, list[str]] = {}
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        name, sep, round_ = entry.rpartition("@")
        if not sep or not name or not round_.isdigit() or int(round_) < 1:
            raise ConfigError(f"hierarchy.failures: {entry!r} is not EDGE@ROUND (round >= 1)",
                              key="hierarchy.failures")
        out.setdefault(int(round_), []).append(name)
    return out


def check_edge_downloads(cfg: Config) -> None:
    """Refuse delta downloads with edges that make their own steps (simulated or deployed).

    A delta names the model a device holds by its version. An edge with one synchronous
    edge round numbers its model as its parent does, so every edge's version ``v`` is the
    same model; an edge that steps on its own numbers its models with its own counter, so a
    device that moves from edge A to edge B holding A's ``v`` would get B's delta against
    B's ``v`` and rebuild a model nobody sent.

    Raises:
        ConfigError: ``compression.download = "delta"`` with ``hierarchy.edge_rounds > 1``
            or ``hierarchy.edge_policy = "buffered"``.
    """
    h = cfg["hierarchy"]
    if cfg["compression"]["download"] == "delta" and (h["edge_rounds"] > 1
                                                       or h["edge_policy"] == "buffered"):
        raise ConfigError("delta downloads name the model a client holds by its version; "
                          "edges that make their own steps number their models on their "
                          "own, so edges would name different models alike: use "
                          "compression.download = 'full' with hierarchy.edge_rounds > 1 "
                          "or a buffered edge policy", key="compression.download")


def hierarchy_from_config(cfg: Config, devices: ClientPool,
                          sum_rule: SumRule | None = None) -> Tier:
    """The tiers of ``cfg["hierarchy"]`` over ``devices``: an edge tier (and a region tier
    above it with ``regions > 0``), the top tier being the pool the global coordinator
    drives. ``sum_rule`` is the edges' (SecAgg+ per edge group); regions sum plainly.

    Raises:
        ConfigError: a combination hierarchy cannot run: simulated device time (its
            timeline carries per-client arrivals), a robust rule (it needs every update,
            the global sees groups), distributed DP (its noise shares are per client),
            central DP with several edge rounds, delta downloads with edges that step on
            their own, an assignment by region without regions, a failure naming an unknown
            edge.
    """
    h = cfg["hierarchy"]
    if cfg["sim"]["time_model"] != "none":
        raise ConfigError("hierarchy runs without simulated device time for now (the "
                          "device timeline carries per-client arrivals, not an edge's "
                          "upload): set sim.time_model = 'none'", key="hierarchy.edges")
    if cfg["robust"]["rule"] != "none" or cfg["robust"]["norm_bound"]:
        raise ConfigError("robust aggregation needs every update; with hierarchy the global "
                          "server sees the edges' sums", key="robust.rule")
    if cfg["privacy"]["placement"] == "distributed":
        raise ConfigError("distributed DP needs every client's noise share in one secure "
                          "sum; with hierarchy use privacy.placement = 'central' (noise at "
                          "the global tier) and SecAgg+ per edge group",
                          key="privacy.placement")
    if cfg["privacy"]["placement"] == "central" and h["edge_rounds"] > 1:
        raise ConfigError("central DP bounds each client's contribution to one clipped "
                          "update; with hierarchy.edge_rounds > 1 a client moves its edge's "
                          "model several times: use edge_rounds = 1", key="hierarchy.edge_rounds")
    check_edge_downloads(cfg)
    edge_policy = None
    if h["edge_policy"] == "buffered":
        if cfg["privacy"]["placement"] != "none" or cfg["secure_aggregation"]["enabled"]:
            raise ConfigError("hierarchy.edge_policy = 'buffered' does not compose with "
                              "privacy or secure aggregation yet (their accounting and "
                              "protocol are per synchronous round)", key="hierarchy.edge_policy")
        r = cfg["round"]

        def edge_policy(n: int) -> RoundPolicy:
            return BufferedPolicy(concurrency=min(r["concurrency"], n),
                                  buffer_size=min(r["buffer_size"], n),
                                  staleness_exponent=r["staleness_exponent"],
                                  staleness_reference=r["staleness_reference"],
                                  max_staleness=r["max_staleness"])
    regions = h["regions"]
    if h["assignment"] == "region" and regions < 1:
        raise ConfigError("hierarchy.assignment = 'region' needs hierarchy.regions >= 1",
                          key="hierarchy.assignment")
    by_region = h["assignment"] == "region"
    region_names = [f"region-{r}" for r in range(regions)]
    names = [f"edge-{i}" for i in range(h["edges"])]
    failures = parse_failures(h["failures"])
    unknown = {e for v in failures.values() for e in v} - {*names, *region_names}
    if unknown:
        raise ConfigError(f"hierarchy.failures names unknown edges {sorted(unknown)} (edges "
                          f"are edge-0..edge-{len(names) - 1}, regions region-0..)",
                          key="hierarchy.failures")
    edge_region = {e: region_names[i % regions] for i, e in enumerate(names)} \
        if by_region else {}
    ring = Ring(names, vnodes=h["vnodes"], load_factor=h["load_factor"],
                edge_regions=edge_region)
    device_region = (lambda name: region_names[int(name) % regions]) if by_region else None
    route = Route(ring, region_of=device_region)
    n = len(names)
    edges = [Edge(e, cfg.seed, h["edge_rounds"], sum_rule, i, n, edge_policy)
             for i, e in enumerate(names)]
    tier = Tier(edges, route, devices, failures if not regions else
                {r: [e for e in v if e in ring.edges] for r, v in failures.items()})
    if not regions:
        return tier
    upper = Ring(region_names, vnodes=h["vnodes"], load_factor=h["load_factor"],
                 edge_regions={r: r for r in region_names} if by_region else None)
    region_route = Route(upper, route, region_of=edge_region.get if by_region else None)
    # a region only folds its edges' uploads: edge_rounds is the edges' (HierFAVG's kappa2);
    # regions stepping too would have every device train edge_rounds^2 times a global round
    tops = [Edge(r, cfg.seed, 1, None, i, regions) for i, r in enumerate(region_names)]
    return Tier(tops, region_route, tier,
                {r: [e for e in v if e in upper.edges] for r, v in failures.items()})
