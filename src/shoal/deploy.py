"""The aggregator process: the round engine serving real devices over gRPC.

:func:`run_aggregator` assembles the same :class:`~shoal.experiment.Experiment` the
simulator runs -- strategy, coordinator and round policy, central evaluation, privacy -- but
with a :class:`~shoal.transport.carrier.GrpcCarrier` as its carrier, and makes it crash-safe:
every committed round is written to the model store (atomically, checksummed) before the
next round starts, and on start the aggregator resumes from the store's latest version, so
killing it with SIGKILL loses nothing committed. Devices reconnect by themselves (their
runtime retries with exponential backoff).
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shoal.config import Config
from shoal.build import secagg_from_config, secure_sum_from_config, selector_from_config
from shoal.device_ckks import CkksSetup
from shoal.key_service import KeyService
from shoal.records import RoundRecord
from shoal.strategy import ServerState
from shoal.sampling import RegistrySampler, UniformSampler
from shoal.data import FederatedData, GeneratedClients
from shoal.errors import ConfigError
from shoal.lifecycle.signing import Signer
from shoal.lifecycle.store_signing import commit_signer
from shoal.model_host import ModelHost
from shoal.params import ParamSpec
from shoal.observers import CarrierObserver, Observer, Observers
from shoal.registry import Registry, SQLiteRegistry
from shoal.experiment import Experiment, RunResult
from shoal.store import ModelStore
from shoal.transport.auth import Keyring, load_or_create_secret
from shoal.transport.revocation import RevocationFile
from shoal.transport.certs import load_client_ca
from shoal.transport.carrier import GrpcCarrier, wait_for_devices
from shoal.transport.server import AggregatorService, AggregatorSettings, serve

__all__ = ["AggregatorPaths", "central_model", "check_deployable", "registry_from_config",
           "run_aggregator", "run_committing", "wait_for_devices"]

log = logging.getLogger("shoal.aggregator")


@dataclass(frozen=True)
class AggregatorPaths:
    """Where the aggregator keeps its state.

    Attributes:
        secret: token signing key (created with mode 0600 if missing).
        registry: the SQLite client registry (with ``deploy.registry = "sqlite"``).
        store: model store (versions, crash recovery).
        tls_dir: directory with ``server.pem`` and ``server.key`` (``shoal certs``); ``None``
            serves without TLS, which is refused on anything but loopback.
        port_file: the bound port is written here (useful with ``deploy.port = 0``).
        client_ca: PEM CA certificate(s) for mutual TLS (cross-silo): every device must
            present a client certificate signed by it whose common name is its device id
            (``shoal certs --client NAME``). Needs ``tls_dir``.
        revoked: revoked tokens (``shoal revoke``), re-read while serving when it changes;
            a missing file revokes nothing.
        keys: the operator's keys (``shoal keys --out DIR``): every training version is
            signed when published (devices started with ``--trusted-key`` refuse anything
            else) and every committed version at commit time; ``None`` signs nothing.
    """

    secret: Path
    registry: Path
    store: Path
    tls_dir: Path | None = None
    port_file: Path | None = None
    client_ca: Path | None = None
    revoked: Path | None = None
    keys: Path | None = None


def settings_from_config(cfg: Config) -> AggregatorSettings:
    """The device-facing settings of ``cfg`` (the round rules go to the coordinator's
    policy, :func:`~shoal.build.policy_from_config`; the norm bound to its pipeline)."""
    d, c = cfg["deploy"], cfg["compression"]
    return AggregatorSettings(
        max_update_bytes=int(d["max_update_mb"] * (1 << 20)),
        checkin_interval_s=d["checkin_interval_s"], absent_after_s=d["absent_after_s"],
        heartbeat_s=d["heartbeat_s"],
        max_active_uploads=d["max_active_uploads"], bdp_probe=d["bdp_probe"],
        idle_timeout_s=d["idle_timeout_s"],
        max_weight=d["max_weight"], weight_cap_multiple=d["weight_cap_multiple"],
        roster_wait_s=cfg["secure_aggregation"]["roster_wait_s"],
        stage_timeout_s=cfg["secure_aggregation"]["stage_timeout_s"],
        upload_codec="" if c["upload"] == "none" else c["upload"],
        error_feedback=c["error_feedback"], download_codec=c["download_codec"],
        delta_downloads=c["download"] == "delta", keep_versions=c["max_staleness"])


def run_aggregator(cfg: Config, paths: AggregatorPaths,
                   on_round: Callable[[RoundRecord], None] | None = None,
                   on_ready: Callable[[int], None] | None = None, *,
                   observers: Iterable[Observer] = (),
                   on_store: Callable[[ModelStore, threading.Lock], None] | None = None
                   ) -> tuple[Experiment, RunResult]:
    """Serve devices until ``cfg.rounds`` rounds are committed (resuming from the store),
    telling ``observers`` (a progress bar, a run directory, logs, the dashboard) what happens;
    those that are :class:`~shoal.observers.CarrierObserver` also hear the gRPC service's
    traffic. Prometheus metrics are always collected and served on ``deploy.metrics_port``
    when it is >= 0. ``on_store(store, lock)`` gets the model store once it is open and the
    lock every write to it holds (the dashboard's promote and rollback take it too).

    Raises:
        ConfigError: what :func:`check_deployable` refuses, or not enough devices enrolled
            within ``deploy.wait_timeout_s``.
        StorageError: the disk under the registry or the model store is full, read-only
            or failing (naming the path); every version committed before is intact and a
            restart resumes from the last one.
        CredentialFileError: the client-CA file is missing, not PEM, not a CA, or expired
            (checked before anything is written).
    """
    d = cfg["deploy"]
    check_deployable(cfg, tls=paths.tls_dir is not None,
                     mutual_tls=paths.client_ca is not None)
    client_ca = None
    if paths.client_ca is not None:
        client_ca = load_client_ca(paths.client_ca, now=dt.datetime.now(dt.timezone.utc))
    revocations = RevocationFile(paths.revoked) if paths.revoked is not None else None
    signer = None
    if paths.keys is not None:  # refused (KeyFileError) before anything is written
        from shoal.lifecycle.keys import KEY_FILE, load_signer

        signer = load_signer(paths.keys / KEY_FILE)
    settings = settings_from_config(cfg)
    keyring = Keyring.single(load_or_create_secret(paths.secret))
    store = ModelStore(paths.store)
    store_lock = threading.Lock()  # the aggregator's commits and the dashboard's moves
    observers = list(observers)

    def registry_factory() -> Registry:
        return registry_from_config(cfg, paths.registry)

    tls = None
    if paths.tls_dir is not None:
        tls = ((paths.tls_dir / "server.pem").read_bytes(),
               (paths.tls_dir / "server.key").read_bytes())

    host, spec, data = central_model(cfg)
    try:
        metrics = _metrics()
        service = AggregatorService(settings, keyring, spec.size, spec.fingerprint,
                                    registry_factory, revocations=revocations,
                                    metrics=Observers([metrics, *observers]), signer=signer)
        keys = _key_service(cfg)  # CKKS: the key holder's own process, before serving
        port, stop = serve(service, d["host"], d["port"], tls=tls, client_ca=client_ca)
    except BaseException:
        if host is not None:
            host.close()
        raise
    try:
        if paths.port_file is not None:
            paths.port_file.write_text(f"{port}\n")
        if d["metrics_port"] >= 0:
            if not hasattr(metrics, "serve_http"):
                raise ConfigError("a metrics port needs prometheus_client (pip install "
                                  "shoal[deploy])", key="deploy.metrics_port")
            mport = metrics.serve_http(d["metrics_port"], d["host"],
                                       idle_timeout_s=d["idle_timeout_s"])
            log.info("metrics on http://%s:%d/metrics", d["host"], mport)
        if on_store:
            on_store(store, store_lock)
        if on_ready:
            on_ready(port)
        devices = wait_for_devices(registry_factory(), d["wait_devices"] or
                                    cfg["data"]["clients"], d["wait_timeout_s"], service)
        secure = secagg_from_config(cfg) if keys is None else CkksSetup(
            keys.params, keys.context, clip=cfg["secure_aggregation"]["clip"],
            max_weight=cfg["secure_aggregation"]["max_weight"], decrypt=keys.decrypt)
        carrier = GrpcCarrier(service, devices, secure=secure)
        # the policy asks ceil(deploy.target x deploy.over_selection) devices a round; a
        # selection other than uniform reads the service's registry at each round
        s = cfg["sampling"]
        sampler = (UniformSampler(s["per_round"]) if s["selection"] == "uniform"
                   else RegistrySampler(selector_from_config(cfg), s["per_round"],
                                        carrier.devices, lambda: service.registry))
        exp = Experiment(cfg, data, pool=carrier, sampler=sampler, model=host)
        return exp, run_committing(exp, store, store_lock, on_round,
                                   observers=[metrics, *observers], signer=signer)
    finally:
        stop()
        if host is not None:
            host.close()
        if keys is not None:
            keys.close()
        with store_lock:
            store.close()
        if hasattr(metrics, "close"):
            metrics.close()


def central_model(cfg: Config
                  ) -> tuple[ModelHost | None, ParamSpec, FederatedData | GeneratedClients | None]:
    """Where an aggregator's model lives: ``(host, layout, data)``. With
    ``deploy.model_process`` a :class:`~shoal.model_host.ModelHost` (PyTorch, the data and
    central evaluation in a process of their own) and no data here; otherwise no host, the
    model built here and the data loaded once, for the run's
    :class:`~shoal.experiment.Experiment` to evaluate with in this process."""
    if cfg["deploy"]["model_process"]:
        host = ModelHost(cfg, threads=os.cpu_count() or 1)
        return host, host.spec, None
    from shoal.build import load_data
    from shoal.frameworks.torch import spec_of
    from shoal.models import build_model

    data = load_data(cfg)
    train = data.train
    return None, spec_of(build_model(cfg["model"]["name"], int(np.prod(train.x.shape[1:])),
                                     train.num_classes, cfg.seed)), data


def _key_service(cfg: Config) -> KeyService | None:
    """The CKKS key holder (a process of its own) when ``cfg`` aggregates with CKKS."""
    s = cfg["secure_aggregation"]
    if not s["enabled"] or s["protocol"] != "ckks":
        return None
    secure_sum_from_config(cfg)  # refuses a bad degree or encoding before a process starts
    from shoal.privacy.he import CkksParams

    return KeyService(CkksParams(poly_modulus_degree=s["ckks_degree"]))


def run_committing(exp: Experiment, store: ModelStore, store_lock: threading.Lock,
                   on_round: Callable[[RoundRecord], None] | None = None, *,
                   observers: Iterable[Observer] = (), signer: Signer | None = None
                   ) -> RunResult:
    """Run ``exp`` from the store's latest version (if any), committing every version to
    ``store`` (under ``store_lock``) before the next round starts: what makes an aggregator
    (or the aggregator cluster's committer) crash-safe. With ``signer`` each version's model
    and plan are signed as it is committed (served later without signing anew).

    Raises:
        StorageError: the store could not be written; every version before is intact.
    """
    state = None
    latest = store.latest()
    if latest is not None:
        state = exp.restore(store.load(latest.id))
        log.info("resuming from model version %d (round %d)", latest.id, state.version)

    def commit(st: ServerState, rec: RoundRecord) -> None:
        with store_lock:
            parent = store.latest()
            store.commit(exp.checkpoint(st), round=st.version,
                         metrics={"accepted": float(rec.accepted)},
                         parent=parent.id if parent else None, now=time.time(),
                         sign=None if signer is None else commit_signer(signer, st.params,
                                                                        store))

    return exp.run(on_round, state=state, on_commit=commit, observers=observers)


def registry_from_config(cfg: Config, path: Path | None = None) -> Registry:
    """The device registry ``deploy.registry`` names: the SQLite file ``path``, or the
    Redis registry at ``deploy.redis_url`` (keys under ``deploy.redis_prefix:registry``).

    Raises:
        ConfigError: ``sqlite`` without a path, or ``redis`` without the redis extra.
        RegistryUnavailable: Redis cannot be reached.
    """
    d = cfg["deploy"]
    if d["registry"] == "sqlite":
        if path is None:
            raise ConfigError("deploy.registry = 'sqlite' keeps the registry in a file of one "
                              "process: several need 'redis'", key="deploy.registry")
        return SQLiteRegistry(path)
    try:
        from shoal.registry.redis import RedisRegistry
    except ImportError:
        raise ConfigError("deploy.registry = 'redis' needs the redis package (pip install "
                          "'shoal[redis]')", key="deploy.registry") from None
    return RedisRegistry(d["redis_url"], prefix=f"{d['redis_prefix']}:registry")


def _metrics() -> CarrierObserver:
    """Prometheus metrics when ``prometheus_client`` is installed (the deploy extra), else
    hooks that do nothing."""
    try:
        from shoal.telemetry import PrometheusObserver

        return PrometheusObserver()
    except ImportError:  # pragma: no cover - the deploy extra installs it
        return CarrierObserver()


def check_deployable(cfg: Config, *, tls: bool, mutual_tls: bool = False) -> None:
    """Refuse, before anything is written, a configuration a deployment would misapply.

    Raises:
        ConfigError: insecure serving on a non-loopback address, mutual TLS without TLS,
            a generated population (simulation only), local DP (which devices do not apply yet), CKKS aggregation with DP (devices
            clip per coordinate for CKKS, not to an L2 norm) or with a roster whose sum
            could exceed what decrypts, an upload codec with secure aggregation (its
            compression is ``secure_aggregation.encoding = 'rotated'``), so many SecAgg
            neighbours that a device's encrypted shares exceed the largest message the
            aggregator receives, or central or distributed DP whose cohorts the
            accountant would describe wrongly. Deployable
            with secure aggregation: central DP (devices clip before masking, the noise is
            added to the unmasked sum), the rotated ring, distributed DP (devices add
            their discrete Gaussian shares before masking; the server unmasks only a noised
            sum) and post-quantum hybrid key agreement.
    """
    d = cfg["deploy"]
    if not tls and d["host"] not in ("127.0.0.1", "localhost", "::1"):
        raise ConfigError(f"deploy.host = {d['host']!r} without TLS: give a certificate "
                          f"directory (shoal certs) or listen on 127.0.0.1", key="deploy.host")
    if mutual_tls and not tls:
        raise ConfigError("mutual TLS (--client-ca) needs the server's certificate "
                          "directory (--certs)", key="client_ca")
    if cfg["data"]["population"] == "generated":
        raise ConfigError("data.population = 'generated' makes clients on demand in "
                          "simulation; a deployment's clients are its devices (and the "
                          "reference devices train clients of a fixed partition)",
                          key="data.population")
    if cfg["privacy"]["placement"] == "local":
        raise ConfigError("the device runtime does not yet apply local DP; run it in "
                          "simulation (shoal run) or use privacy.placement = 'central'",
                          key="privacy.placement")
    if cfg["secure_aggregation"]["enabled"] and cfg["secure_aggregation"]["protocol"] == "ckks" \
            and cfg["privacy"]["placement"] != "none":
        raise ConfigError("secure_aggregation.protocol = 'ckks' over gRPC clips each "
                          "coordinate, not the L2 norm differential privacy accounts for: "
                          "use protocol 'secagg' with privacy.placement, or "
                          "privacy.placement = 'none'", key="secure_aggregation.protocol")
    if cfg["secure_aggregation"]["enabled"] and cfg["compression"]["upload"] != "none":
        raise ConfigError("secure aggregation encodes updates itself (fixed point in a ring, "
                          "or secure_aggregation.encoding = 'rotated' for a few-bit ring): "
                          "compression.upload must be 'none' with it",
                          key="compression.upload")
    _check_central_dp_accounting(cfg)
    _check_share_messages(cfg)
    _check_ckks_capacity(cfg)


def _check_ckks_capacity(cfg: Config) -> None:
    """Refuse a CKKS round whose sum could outgrow what decrypts: every device adds up to
    ``clip x max_weight`` per coordinate, and the sum must stay under the parameters'
    capacity (2^18 at scale 2^40), else the later uploads of a round would be refused."""
    s, d = cfg["secure_aggregation"], cfg["deploy"]
    if not s["enabled"] or s["protocol"] != "ckks":
        return
    from shoal.privacy.he import CkksParams

    roster = math.ceil((d["target"] or cfg["sampling"]["per_round"]) * d["over_selection"])
    capacity = CkksParams(poly_modulus_degree=s["ckks_degree"]).capacity
    if roster * s["clip"] * s["max_weight"] >= capacity:
        raise ConfigError(f"{roster} devices a round, each adding up to clip x max_weight = "
                          f"{s['clip'] * s['max_weight']:g} per coordinate, could exceed the "
                          f"{capacity:g} a CKKS sum can hold: lower secure_aggregation."
                          f"max_weight below {capacity / (roster * s['clip']):.0f}",
                          key="secure_aggregation.max_weight")


def _check_share_messages(cfg: Config) -> None:
    """Refuse a secure-aggregation round whose ShareKeys message could not reach the
    aggregator: a device seals one ciphertext per neighbour into one message, and no message
    above ``MAX_RECEIVE_BYTES`` is received (post-quantum ciphertexts carry 1,088 more bytes
    each, so about 270 neighbours fit, against about 3,000 classical ones)."""
    s, d = cfg["secure_aggregation"], cfg["deploy"]
    if not s["enabled"] or s["protocol"] != "secagg":
        return
    from shoal.privacy.secagg_messages import SecAggParams
    from shoal.privacy.secagg_session import share_ciphertext_bytes
    from shoal.transport.listener import MAX_RECEIVE_BYTES
    from shoal.transport.proto import shoal_pb2 as pb

    secure = secagg_from_config(cfg)
    assert secure is not None
    roster = math.ceil((d["target"] or cfg["sampling"]["per_round"]) * d["over_selection"])
    config = secure.config_for(roster)
    k = roster - 1 if config.neighbours is None else config.neighbours
    sealed = bytes(share_ciphertext_bytes(SecAggParams(
        neighbours=max(k, 2), threshold=2, bits=32, length=1,
        post_quantum=s["post_quantum"])))
    message = pb.SecAggChunk(header=pb.SecAggHeader(
        device_id="d" * 64, round=2**40, base_version=2**40, upload_key="k" * 32,
        shares=pb.SecAggShares(session=bytes(16),
                               ciphertexts={2**40 + v: sealed for v in range(k)})))
    if message.ByteSize() > MAX_RECEIVE_BYTES:
        raise ConfigError(f"a roster of {roster} devices gives each {k} neighbours, whose "
                          f"encrypted shares ({message.ByteSize():,} bytes in one message) "
                          f"exceed the {MAX_RECEIVE_BYTES:,} bytes the aggregator receives; "
                          f"set secure_aggregation.neighbours (SecAgg+) below {k}",
                          key="secure_aggregation.neighbours")


def _check_central_dp_accounting(cfg: Config) -> None:
    """Refuse a deployment whose cohorts the privacy accountant would describe wrongly
    (central DP, and distributed DP, whose accountant assumes the same sampling).

    The ledger accounts for each round as a fixed-size uniform sample of
    ``sampling.per_round`` out of ``data.clients`` (or a Poisson sample). A deployment asks
    ``ceil(target x over_selection)`` devices, chosen by ``sampling.selection``: unless that is
    exactly a uniform sample of ``per_round``, epsilon would be reported for a sampling that
    did not happen (over-selection in particular invites more clients than accounted for).
    The cohorts themselves are drawn from ``os.urandom`` (an ``Experiment`` with a device
    pool): amplification by sampling assumes nobody can tell who was sampled, and the seeded
    cohorts of a simulation can be recomputed from the config.
    """
    placement = cfg["privacy"]["placement"]
    if placement not in ("central", "distributed"):
        return
    d, s = cfg["deploy"], cfg["sampling"]
    target = d["target"] or s["per_round"]
    wanted = {"sampling.method": (s["method"], "uniform"),
              "sampling.selection": (s["selection"], "uniform"),
              "deploy.over_selection": (d["over_selection"], 1.0),
              "deploy.target": (target, s["per_round"]),
              # the pool is the devices enrolled when the run starts: at least data.clients of
              # them (more only makes the real sampling rate smaller than the one accounted)
              "deploy.wait_devices": (d["wait_devices"] or cfg["data"]["clients"],
                                      cfg["data"]["clients"])}
    for key, (got, need) in wanted.items():
        if got != need:
            raise ConfigError(f"{placement} DP in a deployment needs cohorts the accountant "
                              f"describes (a uniform sample of sampling.per_round out of "
                              f"data.clients devices): {key} must be {need!r}, got {got!r}",
                              key=key)


_wait_for_devices = wait_for_devices  # the name cli/launch_canary.py imports
