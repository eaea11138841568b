"""Factories: the run's parts built from a :class:`~shoal.config.Config`.

One place turns configuration into objects -- data, strategy, sampler, round policy, the
aggregation pipeline (validation, privacy stages, secure sum) and the simulated time model --
for every carrier: :class:`~shoal.experiment.Experiment` (simulation) and the deployed
aggregator (:mod:`shoal.deploy`) both build themselves here, so neither reaches into the
other.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

import numpy as np

from shoal import seeds
from shoal.config import Config
from shoal.data import (FederatedData, GeneratedClients, ResampledClients, SyntheticClients,
                        load_fashion_mnist)
from shoal.data.partition import partition
from shoal.data.synthetic import make_synthetic
from shoal.errors import ConfigError
from shoal.events import TrainTask
from shoal.pipeline import Pipeline, PlainSum, SumRule, Validation
from shoal.policy import BufferedPolicy, RoundPolicy, SyncPolicy
from shoal.registry import MemoryRegistry, sequential_ids
from shoal.sampling import PoissonSampler, RegistrySampler, Sampler, UniformSampler
from shoal.selection import AvailabilityAware, FairnessAware, Selector, Stratified, Uniform
from shoal.strategy import Strategy, make_strategy

if TYPE_CHECKING:  # privacy loads only when a run asks for it
    from shoal.privacy import LocalDP
    from shoal.privacy.ddg import DistributedDiscreteGaussian
    from shoal.privacy.secagg_rounds import SecAggAggregation
    from shoal.privacy.stages import CentralDPStage, DistributedDPStage, LocalDPStage
    from shoal.robust import CenteredClipping, HeldRule, NormBound

__all__ = ["load_data", "load_partition", "strategy_from_config", "selector_from_config", "sampler_from_config",
           "simulated_registry", "majority_labels", "expected_cohort",
           "policy_from_config", "pipeline_from_config", "robust_from_config",
           "local_dp_from_config", "distributed_dp_from_config", "secagg_from_config",
           "secure_sum_from_config",
           "unpredictable", "LogNormalTime", "time_model_from_config"]


def unpredictable(*_: int) -> np.random.Generator:
    """A fresh cryptographically secure generator keyed with 32 bytes of ``os.urandom``,
    whatever the round: deployed cohorts under DP, which nobody holding the config -- or
    earlier cohorts -- may recompute (amplification by sampling assumes who was sampled is
    secret; a PCG64 stream can be recovered from its outputs).

    Returns:
        A :class:`~shoal.privacy.csprng.CryptoRandom` (AES-256-CTR); it answers the
        ``Generator`` methods the samplers draw with (``choice`` without ``p``,
        ``integers``, ``random``), which is what the annotation promises the coordinator.
    """
    from shoal.privacy.dp import secure_generator

    return cast(np.random.Generator, secure_generator())


def load_data(cfg: Config) -> FederatedData | GeneratedClients:
    """The training set split into clients, and the central test set, per ``cfg["data"]``;
    with ``data.population = "generated"``, a population whose clients' data is made on
    demand (:mod:`shoal.data.population`)."""
    d = cfg["data"]
    if d["population"] == "generated":
        size_law = {"median": d["client_examples"], "sigma": d["client_examples_sigma"],
                    "seed": d["partition_seed"]}
        if d["dataset"] == "synthetic":
            return SyntheticClients(d["synthetic_alpha"], d["synthetic_beta"], d["clients"],
                                    iid=d["synthetic_iid"], **size_law)
        pool, test = load_fashion_mnist(d["path"] or None, flatten=True)
        return ResampledClients(pool, test, d["clients"], alpha=d["alpha"], **size_law)
    if d["dataset"] == "synthetic":
        return make_synthetic(d["synthetic_alpha"], d["synthetic_beta"],
                              num_clients=d["clients"],
                              rng=seeds.generator(d["partition_seed"], "synthetic"),
                              iid=d["synthetic_iid"])
    train, test = load_fashion_mnist(d["path"] or None, flatten=True)
    parts = partition(train.y, d["clients"], d["partition"], alpha=d["alpha"],
                      shards_per_client=d["shards_per_client"], seed=d["partition_seed"])
    return FederatedData(train=train, test=test, client_indices=tuple(parts))


def load_partition(cfg: Config, who: str) -> FederatedData:
    """:func:`load_data` for processes that each train clients of a fixed partition (a
    deployed device, a gossip peer); ``who`` names them in the error.

    Raises:
        ConfigError: ``data.population = "generated"``: its clients are made on demand in
            simulation, there is no fixed partition to train a client of.
    """
    data = load_data(cfg)
    if not isinstance(data, FederatedData):
        raise ConfigError(f"{who} trains a client of the config's partition; "
                          "data.population = 'generated' (clients made on demand) is for "
                          "simulation only", key="data.population")
    return data


def strategy_from_config(cfg: Config) -> Strategy:
    s = cfg["strategy"]
    name = s["name"]
    if name == "fedavg":
        return make_strategy(name, server_lr=s["server_lr"])
    if name == "fedprox":
        return make_strategy(name, mu=s["mu"], server_lr=s["server_lr"])
    return make_strategy(name, server_lr=s["server_lr"], beta1=s["beta1"], beta2=s["beta2"],
                         tau=s["tau"])


def selector_from_config(cfg: Config) -> Selector:
    """The selector named by ``sampling.selection`` (both modes).

    Raises:
        ConfigError: a selection other than uniform with buffered rounds, whose coordinator
            gives each task an idle client drawn uniformly (no sampler is asked).
    """
    s = cfg["sampling"]
    name = s["selection"]
    if name != "uniform" and cfg["round"]["policy"] == "buffered":
        raise ConfigError(f"sampling.selection = {name!r} does not apply to round.policy = "
                          f"'buffered', which gives each task an idle client drawn uniformly; "
                          f"use sampling.selection = 'uniform' or round.policy = 'sync'",
                          key="sampling.selection")
    if name == "stratified":
        return Stratified(s["stratify_by"])
    if name == "availability":
        return AvailabilityAware()
    if name == "fairness":
        return FairnessAware()
    return Uniform()


def sampler_from_config(cfg: Config, data: FederatedData | GeneratedClients | None = None
                        ) -> Sampler:
    """The simulation's sampler: Poisson, the uniform sampler of wave 1, or a
    :class:`~shoal.sampling.RegistrySampler` over :func:`simulated_registry` (whose cohorts
    the run records, see :func:`~shoal.sampling.recording`) for any other selection.

    Raises:
        ConfigError: stratification by an attribute simulated clients do not carry.
    """
    s = cfg["sampling"]
    if s["method"] == "poisson":
        return PoissonSampler(s["q"])
    if s["selection"] == "uniform":
        return UniformSampler(s["per_round"])
    if isinstance(data, GeneratedClients):
        raise ConfigError(f"sampling.selection = {s['selection']!r} reads a registry of the "
                          f"clients, which a generated population (data.population = "
                          f"'generated') does not build; use 'uniform'",
                          key="sampling.selection")
    registry = simulated_registry(cfg, data)
    # simulated clients declare no availability window: the time does not matter
    return RegistrySampler(selector_from_config(cfg), s["per_round"],
                           registry=lambda: registry, clock=lambda: 0.0)


def simulated_registry(cfg: Config, data: FederatedData | None = None) -> MemoryRegistry:
    """The simulated population as a registry: ``data.clients`` clients named
    ``client-0..`` in client order (row ``i`` is client ``i``), enrolled at time 0, no
    availability windows, and -- when ``sampling.stratify_by = 'label'`` -- the attribute
    ``label``: each client's most frequent training label (ties to the smaller label; a
    client without examples lacks it). It keeps one outcome per client (participation is
    counted in full regardless).

    Raises:
        ConfigError: ``sampling.stratify_by`` names another attribute, or ``label`` without
            ``data``.
    """
    s = cfg["sampling"]
    n = cfg["data"]["clients"]
    attributes: dict[str, np.ndarray] = {}
    if s["selection"] == "stratified":
        if s["stratify_by"] != "label":
            raise ConfigError(f"sampling.stratify_by = {s['stratify_by']!r}: simulated "
                              f"clients carry one attribute, 'label' (their most frequent "
                              f"training label); device attributes exist in a deployment",
                              key="sampling.stratify_by")
        if data is None:
            raise ConfigError("stratifying simulated clients by 'label' needs their data",
                              key="sampling.stratify_by")
        attributes["label"] = majority_labels(data)
    registry = MemoryRegistry(history=1)
    registry.enroll_many(sequential_ids(n), now=0.0, attributes=attributes)
    return registry


def majority_labels(data: FederatedData) -> np.ma.MaskedArray:
    """Each client's most frequent training label (ties to the smaller one), masked for
    clients without examples: one sort of the (client, label) pairs, no loop per client."""
    sizes = np.fromiter((len(i) for i in data.client_indices), np.int64,
                        len(data.client_indices))
    owner = np.repeat(np.arange(sizes.size, dtype=np.int64), sizes)
    labels = np.asarray(data.train.y, dtype=np.int64)[np.concatenate(
        [np.zeros(0, np.int64), *data.client_indices])]
    pairs, counts = np.unique(np.stack([owner, labels], axis=1), axis=0, return_counts=True)
    # per client: the largest count, then the smallest label; its first row wins
    order = np.lexsort((pairs[:, 1], -counts, pairs[:, 0]))
    first = order[np.flatnonzero(np.diff(pairs[order, 0], prepend=-1) != 0)]
    out = np.ma.masked_all(sizes.size, dtype=np.int64)
    out[pairs[first, 0]] = pairs[first, 1]
    return out


def expected_cohort(cfg: Config) -> float:
    s = cfg["sampling"]
    return s["q"] * cfg["data"]["clients"] if s["method"] == "poisson" else s["per_round"]


def policy_from_config(cfg: Config, *, deployed: bool = False) -> RoundPolicy:
    """The round policy of ``cfg["round"]``. Synchronous rounds in simulation await every
    sampled client (the wave-1 semantics) unless ``sim.round_rules = "deploy"``; a
    deployment's rules (target, over-selection, deadline, minimum fraction) come from
    ``cfg["deploy"]``."""
    r = cfg["round"]
    rules = deployed or cfg["sim"]["round_rules"] == "deploy"
    # in simulated time, nobody online now means: ask again later
    idle = cfg["sim"]["idle_wait_s"] if not deployed and cfg["sim"]["time_model"] != "none" \
        else 0.0
    if r["policy"] == "buffered":
        if cfg["privacy"]["placement"] != "none" or cfg["secure_aggregation"]["enabled"]:
            raise ConfigError("round.policy = 'buffered' does not compose with privacy or "
                              "secure aggregation yet (their accounting and protocol are "
                              "per synchronous round)", key="round.policy")
        return BufferedPolicy(concurrency=r["concurrency"], buffer_size=r["buffer_size"],
                              staleness_exponent=r["staleness_exponent"],
                              staleness_reference=r["staleness_reference"],
                              max_staleness=r["max_staleness"],
                              # a device that never reports frees its slot at the deadline
                              deadline_s=cfg["deploy"]["deadline_s"] if rules else math.inf,
                              idle_wait_s=idle)
    if rules:
        d = cfg["deploy"]
        return SyncPolicy(target=d["target"] or cfg["sampling"]["per_round"],
                          over_selection=d["over_selection"], deadline_s=d["deadline_s"],
                          min_fraction=d["min_fraction"], idle_wait_s=idle)
    return SyncPolicy(idle_wait_s=idle)


def local_dp_from_config(cfg: Config) -> LocalDP | None:
    """The clients' local-DP mechanism, or ``None`` unless ``privacy.placement = 'local'``."""
    p = cfg["privacy"]
    if p["placement"] != "local":
        return None
    from shoal.privacy import LocalDP

    return LocalDP(noise_multiplier=p["noise_multiplier"], clip_norm=p["clip_norm"])


def distributed_dp_from_config(cfg: Config) -> DistributedDiscreteGaussian | None:
    """The distributed discrete Gaussian of ``privacy.placement = 'distributed'``, or None.

    Raises:
        ConfigError: a combination it cannot run with: no secure aggregation, CKKS or the
            fixed-point encoding (the noise lives in SecAgg+'s rotated ring), Poisson
            sampling (a cohort that is too small would be aborted and redrawn, which the
            fixed-size accountant does not describe), or a cohort smaller than h + f.
    """
    p, s = cfg["privacy"], cfg["secure_aggregation"]
    if p["placement"] != "distributed":
        return None
    if not s["enabled"] or s["protocol"] != "secagg" or s["encoding"] != "rotated":
        raise ConfigError("privacy.placement = 'distributed' adds each client's noise inside "
                          "SecAgg+'s ring: set secure_aggregation.enabled = true, "
                          "secure_aggregation.protocol = 'secagg' and "
                          "secure_aggregation.encoding = 'rotated'", key="privacy.placement")
    if cfg["sampling"]["method"] != "uniform":
        raise ConfigError("privacy.placement = 'distributed' is accounted for a fixed cohort: "
                          "use sampling.method = 'uniform' (with Poisson sampling a cohort "
                          "below h + f clients would be aborted and redrawn, which the "
                          "accountant does not describe)", key="sampling.method")
    from shoal.privacy.ddg import DistributedDiscreteGaussian

    cohort = cfg["sampling"]["per_round"]
    honest = p["honest_clients"] or cohort
    if honest + p["colluding_clients"] > cohort:
        raise ConfigError(f"privacy.honest_clients + privacy.colluding_clients = "
                          f"{honest + p['colluding_clients']} exceeds the cohort of {cohort} "
                          f"(sampling.per_round): no round could release",
                          key="privacy.honest_clients")
    return DistributedDiscreteGaussian(p["noise_multiplier"], p["clip_norm"], honest,
                                       p["colluding_clients"])


def _dp_stage(cfg: Config, deployed: bool, secure_in_transport: bool = False
              ) -> CentralDPStage | LocalDPStage | DistributedDPStage | None:
    p = cfg["privacy"]
    if p["placement"] == "none":
        return None
    if p["placement"] == "distributed":
        if deployed and not secure_in_transport:
            raise ConfigError("privacy.placement = 'distributed' in a deployment needs the "
                              "devices to run secure aggregation (the gRPC carrier)",
                              key="privacy.placement")
        from shoal.privacy.stages import BudgetPolicy, DistributedDPStage

        mechanism = distributed_dp_from_config(cfg)
        assert mechanism is not None
        cohort, population = cfg["sampling"]["per_round"], cfg["data"]["clients"]
        return DistributedDPStage(mechanism, float(cohort),
                                  mechanism.event(cohort, population),
                                  BudgetPolicy(p["epsilon_budget"], p["delta"]), p["accountant"],
                                  noised_groups=secure_in_transport)
    from shoal.privacy import AdaptiveClipping, CentralDP, RoundEvent
    from shoal.privacy.csprng import RandomSource
    from shoal.privacy.dp import secure_generator
    from shoal.privacy.stages import BudgetPolicy, CentralDPStage, LocalDPStage

    s = cfg["sampling"]
    z = p["noise_multiplier"]
    budget = BudgetPolicy(p["epsilon_budget"], p["delta"])
    if p["placement"] == "local":
        return LocalDPStage(RoundEvent.local(z), budget, p["accountant"])
    if s["method"] == "poisson":
        event = RoundEvent.poisson(s["q"], z)
    else:
        event = RoundEvent.fixed_size(s["per_round"], cfg["data"]["clients"], z)
    adaptive = None
    if p["adaptive_clipping"]:
        if cfg["secure_aggregation"]["enabled"]:
            raise ConfigError("adaptive clipping counts clipped updates, which secure "
                              "aggregation hides from the server; use a fixed clip_norm "
                              "with secure aggregation", key="privacy.adaptive_clipping")
        adaptive = AdaptiveClipping(target_quantile=p["target_quantile"],
                                    learning_rate=p["clip_learning_rate"],
                                    count_noise_std=p["count_noise_std"] or None)
    # deployed: CSPRNG noise on an exact grid (discrete Gaussian); simulated: seeded floats
    central = CentralDP(noise_multiplier=z, clip_norm=p["clip_norm"],
                        expected_clients=expected_cohort(cfg), adaptive=adaptive,
                        discrete=deployed)
    seed = cfg.seed
    rng: Callable[[int], RandomSource] = \
        (lambda step: secure_generator()) if deployed \
        else (lambda step: seeds.generator(seed, "dp", step))
    return CentralDPStage(central, event, budget, rng, p["accountant"])


def secagg_from_config(cfg: Config) -> SecAggAggregation | None:
    """The SecAgg+ sum rule for ``cfg["secure_aggregation"]`` (fixed point, or the rotated
    encoding with distributed DP's noise when the run asks for it), or None: simulated in
    process, or run by devices over gRPC (a deployment's sessions bind the rotated plan to
    each round's session)."""
    s = cfg["secure_aggregation"]
    if not s["enabled"]:
        return None
    from shoal.privacy.rotated_encoding import RotatedPlan
    from shoal.privacy.secagg_messages import Stage
    from shoal.privacy.secagg_rounds import SecAggAggregation

    seed = cfg.seed
    rotated, min_inputs = None, 1
    if s["encoding"] == "rotated":
        ddg = distributed_dp_from_config(cfg)
        if ddg is None:
            rotated = RotatedPlan(bits=s["ring_bits"] or 8, clip=s["norm_clip"])
        else:
            rotated, min_inputs = ddg.plan(s["ring_bits"] or 16), ddg.min_inputs
    return SecAggAggregation(clip=s["clip"], value_bits=s["value_bits"],
                             max_weight=s["max_weight"], neighbours=s["neighbours"],
                             threshold=s["threshold"], dropout=s["dropout"],
                             corrupt_rate=s["corrupt_rate"],
                             rng_for_round=lambda r: seeds.generator(seed, "secagg", r),
                             dropout_stage=None if s["dropout_stage"] == "any"
                             else Stage(s["dropout_stage"]),
                             post_quantum=s["post_quantum"], rotated=rotated,
                             rotation_seed=lambda r: seeds.generator(seed, "rotation",
                                                                     r).bytes(32),
                             min_inputs=min_inputs)


def secure_sum_from_config(cfg: Config) -> SumRule | None:
    """The pipeline's secure sum for ``cfg["secure_aggregation"]``: SecAgg+
    (:func:`secagg_from_config`), CKKS homomorphic aggregation, or None (plain).

    Raises:
        ConfigError: a CKKS ring degree other than 4096 or 8192, or the rotated encoding
            with CKKS (it is SecAgg+'s ring encoding).
    """
    s = cfg["secure_aggregation"]
    if not s["enabled"] or s["protocol"] == "secagg":
        return secagg_from_config(cfg)
    if s["encoding"] != "fixed_point":
        raise ConfigError("secure_aggregation.encoding = 'rotated' encodes into SecAgg+'s "
                          "ring; CKKS encrypts the clipped floats: use protocol 'secagg'",
                          key="secure_aggregation.encoding")
    if s["ckks_degree"] not in (4096, 8192):
        raise ConfigError(f"secure_aggregation.ckks_degree must be 4096 or 8192, got "
                          f"{s['ckks_degree']}", key="secure_aggregation.ckks_degree")
    from shoal.privacy.he import CkksParams
    from shoal.privacy.he_rounds import HEAggregation

    return HEAggregation(CkksParams(poly_modulus_degree=s["ckks_degree"]), clip=s["clip"],
                         max_weight=s["max_weight"])


def pipeline_from_config(cfg: Config, *, deployed: bool = False,
                         secure_in_transport: bool = False) -> Pipeline:
    """validate -> [privacy stage] -> sum (plain or SecAgg+) for ``cfg``.

    Args:
        deployed: central-DP noise from ``os.urandom`` instead of the run's seed.
        secure_in_transport: the carrier runs secure aggregation itself (the gRPC pool hands
            the coordinator the unmasked sum), so the pipeline sums plainly.
    """
    d = cfg["deploy"]
    validation = Validation(max_norm=d["max_norm"] or None) if deployed else Validation()
    dp = _dp_stage(cfg, deployed, secure_in_transport)
    robust_stages, robust_rule = robust_from_config(cfg)
    secure = None if secure_in_transport else secure_sum_from_config(cfg)
    # robust stages first: they refuse a group's mean before a DP stage has counted it
    return Pipeline(stages=(*robust_stages, *(() if dp is None else (dp,))),
                    sum_rule=secure if secure is not None else
                    robust_rule if robust_rule is not None else PlainSum(),
                    validation=validation)


def robust_from_config(cfg: Config) -> tuple[tuple[NormBound | CenteredClipping, ...],
                                             HeldRule | None]:
    """The robust stages (norm bound, centered clipping) and the robust sum rule of
    ``cfg["robust"]`` (docs/robustness.md).

    Raises:
        ConfigError: a robust rule with secure aggregation (the server sees only the sum) or
            with differential privacy (its noise is calibrated to a sum, not to a median).
    """
    r = cfg["robust"]
    if r["rule"] == "none" and not r["norm_bound"]:
        return (), None
    from shoal.robust import CenteredClipping, HeldRule, NormBound

    if cfg["secure_aggregation"]["enabled"]:
        raise ConfigError("robust aggregation needs every update, and secure aggregation "
                          "shows the server only their sum: turn one of them off",
                          key="robust.rule")
    if r["rule"] != "none" and cfg["privacy"]["placement"] != "none":
        raise ConfigError(f"robust.rule = {r['rule']!r} does not compose with differential "
                          f"privacy (its noise is calibrated to a clipped sum); "
                          f"robust.norm_bound does", key="robust.rule")
    stages: list[NormBound | CenteredClipping] = []
    if r["norm_bound"]:
        stages.append(NormBound(r["norm_bound"], adaptive=r["norm_adaptive"],
                                factor=r["norm_factor"]))
    if r["rule"] == "centered_clip":
        return (*stages, CenteredClipping(r["cc_tau"])), None
    rule = None if r["rule"] == "none" else HeldRule(
        r["rule"], r["byzantine_fraction"], beta=r["trim"] or None, m=r["krum_m"])
    return tuple(stages), rule


class LogNormalTime:
    """Simulated task time: ``examples x epochs x ms_per_example x speed_c`` milliseconds,
    with one log-normal speed factor per client (``exp(sigma x N(0, 1))`` from the stream
    ``(seed, "speed", client)``: no per-client state, however many clients)."""

    def __init__(self, seed: int, epochs: int, ms_per_example: float, sigma: float) -> None:
        self.seed, self.epochs = seed, epochs
        self.ms, self.sigma = ms_per_example, sigma

    def speed(self, client_ids: np.ndarray) -> np.ndarray:
        return np.array([math.exp(self.sigma * seeds.generator(self.seed, "speed", int(c))
                                  .standard_normal()) for c in client_ids])

    def __call__(self, task: TrainTask, client_ids: np.ndarray,
                 num_examples: np.ndarray) -> np.ndarray:
        n = np.maximum(np.asarray(num_examples, dtype=np.float64), 1.0)
        return n * self.epochs * self.ms / 1000.0 * self.speed(client_ids)


def time_model_from_config(cfg: Config) -> LogNormalTime | None:
    """The ``lognormal`` time model, or ``None`` for ``none``. A device trace
    (``time_model = "trace"``) is built by the simulator's own factory,
    :func:`shoal.sim.devices.trace_from_config`.

    Raises:
        ConfigError: ``time_model = "trace"`` asked of this factory.
    """
    s = cfg["sim"]
    if s["time_model"] == "trace":
        raise ConfigError("sim.time_model = 'trace' is built by "
                          "shoal.sim.devices.trace_from_config", key="sim.time_model")
    if s["time_model"] == "none":
        return None
    return LogNormalTime(cfg.seed, cfg["client"]["epochs"], s["ms_per_example"],
                         s["speed_sigma"])
