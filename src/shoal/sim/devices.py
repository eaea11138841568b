"""Built-in device populations and the time model a trace gives the simulator.

Generated traces hold one row per client, drawn from one seeded stream
``seeds.generator(trace_seed, "trace", name)`` with vectorized draws (ten million devices in
a few seconds and about 50 bytes each), so the same seed gives the same devices whatever the
run seed.

``mobile`` -- phones that train at night:

* **compute**: ``ms_per_example x exp(speed_sigma x z)`` milliseconds per training example,
  ``z ~ N(0, 1)`` (log-normal device speeds, as FedScale's and FLSim's synthetic timings);
* **bandwidth**: one of three network classes -- 3G-like 1 Mbit/s (20 % of devices), 4G-like
  10 Mbit/s (50 %), Wi-Fi-like 40 Mbit/s (30 %) -- times a log-normal spread
  ``exp(0.5 x z)`` (class medians chosen as round figures for illustration, not measured);
* **availability**: one session a day, at night in the device's time zone (devices are
  eligible while idle, charging and on an unmetered network: K. Bonawitz et al., "Towards
  Federated Learning at Scale: System Design", MLSys 2019). Local start ``22:00 + N(0,
  1.5 h)``, length ``N(online_hours, 2 h)`` clipped to [1 h, 20 h]; time zones drawn from
  :data:`TIME_ZONES` (a coarse weighting of where people live). The period is one day, in UTC
  seconds from the simulation's start (time 0 = midnight UTC).

``uniform`` -- the control: every device always online, ``ms_per_example`` for all, instant
transfers (one row serves any population).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shoal import seeds
from shoal.config import Config
from shoal.errors import ConfigError
from shoal.events import TrainTask
from shoal.sim.traces import Availability, Capacity, DeviceTrace, from_fedscale, load_trace

__all__ = ["BANDWIDTH_CLASSES", "BUILTIN_TRACES", "TIME_ZONES", "TracedDevices", "mobile",
           "trace_from_config", "uniform"]

BUILTIN_TRACES = ("mobile", "uniform")
DAY = 86_400.0

#: (name, median kbps, share of devices)
BANDWIDTH_CLASSES = (("3G", 1_000.0, 0.2), ("4G", 10_000.0, 0.5), ("Wi-Fi", 40_000.0, 0.3))
BANDWIDTH_SIGMA = 0.5
#: (UTC offset in hours, share of devices)
TIME_ZONES = ((-8.0, 0.08), (-6.0, 0.05), (-5.0, 0.08), (-3.0, 0.06), (0.0, 0.08),
              (1.0, 0.12), (3.0, 0.06), (5.5, 0.18), (7.0, 0.07), (8.0, 0.17), (9.0, 0.05))
NIGHT_START_H, NIGHT_START_SD_H, SESSION_SD_H = 22.0, 1.5, 2.0
MIN_SESSION_H, MAX_SESSION_H = 1.0, 20.0


def mobile(num_clients: int, *, seed: int = 0, ms_per_example: float = 2.0,
           speed_sigma: float = 0.5, online_hours: float = 8.0) -> DeviceTrace:
    """The ``mobile`` population of ``num_clients`` devices (see the module docstring).

    Raises:
        ConfigError: ``num_clients < 1``, or a parameter out of range.
    """
    if num_clients < 1:
        raise ConfigError(f"a trace needs at least one device, got {num_clients}",
                          key="data.clients")
    if not (MIN_SESSION_H <= online_hours <= MAX_SESSION_H):
        raise ConfigError(f"sim.online_hours must lie in [{MIN_SESSION_H:g}, "
                          f"{MAX_SESSION_H:g}], got {online_hours}", key="sim.online_hours")
    rng = seeds.generator(seed, "trace", "mobile")
    n = num_clients
    compute = ms_per_example * np.exp(speed_sigma * rng.standard_normal(n))
    classes = rng.choice(len(BANDWIDTH_CLASSES), size=n,
                         p=[share for _, _, share in BANDWIDTH_CLASSES])
    medians = np.array([kbps for _, kbps, _ in BANDWIDTH_CLASSES])
    bandwidth = medians[classes] * np.exp(BANDWIDTH_SIGMA * rng.standard_normal(n))
    zones = np.array([h for h, _ in TIME_ZONES])
    offset_h = zones[rng.choice(zones.size, size=n, p=[s for _, s in TIME_ZONES])]
    local_start_h = NIGHT_START_H + NIGHT_START_SD_H * rng.standard_normal(n)
    length = 3600.0 * np.clip(online_hours + SESSION_SD_H * rng.standard_normal(n),
                              MIN_SESSION_H, MAX_SESSION_H)
    start = np.mod((local_start_h - offset_h) * 3600.0, DAY)
    availability = _daily_sessions(start, length)
    return DeviceTrace(Capacity(compute, bandwidth), availability, "mobile")


def _daily_sessions(start: np.ndarray, length: np.ndarray) -> Availability:
    """One session a day per row: ``[start, start + length)`` seconds of the day (UTC); a
    session past midnight is the row's last window, continuing its first ``[0, rest)``."""
    n = start.size
    wraps = start + length > DAY
    counts = 1 + wraps.astype(np.int64)
    offsets = np.concatenate(([0], np.cumsum(counts)))
    s = np.empty(int(offsets[-1]))
    e = np.empty_like(s)
    last = offsets[1:] - 1
    s[last], e[last] = start, start + length
    first = offsets[:-1][wraps]
    s[first], e[first] = 0.0, start[wraps] + length[wraps] - DAY
    return Availability(np.full(n, DAY), offsets, s, e)


def uniform(*, ms_per_example: float = 2.0) -> DeviceTrace:
    """Every device alike and always online, with instant transfers (one row)."""
    return DeviceTrace(Capacity(np.array([ms_per_example]), np.array([math.inf])),
                       Availability.always(), "uniform")


@dataclass(frozen=True)
class TracedDevices:
    """A device trace as the carrier loop's time model (a
    :class:`~shoal.runner.DeviceModel`): compute seconds for a task's examples and epochs,
    transfer seconds for its bytes, and the end of each device's session.

    Attributes:
        trace: the devices.
        epochs: local epochs (the examples a client processes = its examples x epochs).
    """

    trace: DeviceTrace
    epochs: int = 1

    def __call__(self, task: TrainTask, client_ids: np.ndarray,
                 num_examples: np.ndarray) -> np.ndarray:
        passes = np.asarray(num_examples, np.float64) * self.epochs
        return self.trace.compute_seconds(client_ids, passes)

    def transfer_seconds(self, client_ids: np.ndarray, nbytes: np.ndarray) -> np.ndarray:
        return self.trace.transfer_seconds(client_ids, nbytes)

    def online_until(self, client_ids: np.ndarray, t: float) -> np.ndarray:
        return self.trace.online_until(client_ids, t)

    def online(self, client_ids: np.ndarray, t: float) -> np.ndarray:
        return self.trace.online(client_ids, t)


def builtin_trace(name: str, num_clients: int, *, seed: int = 0, ms_per_example: float = 2.0,
                  speed_sigma: float = 0.5, online_hours: float = 8.0) -> DeviceTrace:
    """A built-in trace by name (:data:`BUILTIN_TRACES`).

    Raises:
        ConfigError: an unknown name.
    """
    if name == "mobile":
        return mobile(num_clients, seed=seed, ms_per_example=ms_per_example,
                      speed_sigma=speed_sigma, online_hours=online_hours)
    if name == "uniform":
        return uniform(ms_per_example=ms_per_example)
    raise ConfigError(f"no built-in trace {name!r}; built-in: {', '.join(BUILTIN_TRACES)}, or "
                      f"give a trace file (.npz, or FedScale's capacity pickle)",
                      key="sim.trace")


def trace_file(path: str, availability: str = "") -> DeviceTrace:
    """A trace from files: shoal's ``.npz``, or FedScale's capacity pickle with an optional
    availability pickle.

    Raises:
        ConfigError: an availability file with an ``.npz`` trace (which holds its own).
        DataError: a file is missing or malformed.
    """
    if not Path(path).exists():
        raise ConfigError(f"sim.trace = {path!r} is neither a built-in trace "
                          f"({', '.join(BUILTIN_TRACES)}) nor an existing file",
                          key="sim.trace")
    if Path(path).suffix == ".npz":
        if availability:
            raise ConfigError("sim.trace_availability goes with a FedScale capacity file; an "
                              ".npz trace holds its own availability",
                              key="sim.trace_availability")
        return load_trace(path)
    return from_fedscale(path, availability or None)


def trace_from_config(cfg: Config) -> DeviceTrace:
    """The device trace of ``cfg["sim"]`` for ``cfg["data"]["clients"]`` devices.

    Raises:
        ConfigError, DataError: see :func:`builtin_trace` and :func:`trace_file`.
    """
    s = cfg["sim"]
    if s["trace"] in BUILTIN_TRACES:
        if s["trace_availability"]:
            raise ConfigError("sim.trace_availability replaces nothing in a built-in trace; "
                              "give it with a FedScale capacity file as sim.trace",
                              key="sim.trace_availability")
        return builtin_trace(s["trace"], cfg["data"]["clients"], seed=s["trace_seed"],
                             ms_per_example=s["ms_per_example"],
                             speed_sigma=s["speed_sigma"], online_hours=s["online_hours"])
    return trace_file(s["trace"], s["trace_availability"])


#: quantiles :func:`summarize` reports
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def summarize(trace: DeviceTrace, num_clients: int, *, model_bytes: int,
              sample: int = 1_000_000) -> dict:
    """The distribution a trace gives ``num_clients`` clients: quantiles (5/25/50/75/95 %) of
    compute speed, bandwidth, the time to move ``model_bytes`` one way, the period and the
    share of it a device is online; the fraction of clients online at each hour of the first
    day. Clients are sampled evenly (``sample`` of them) beyond that many.

    Raises:
        ConfigError: ``num_clients < 1``.
    """
    if num_clients < 1:
        raise ConfigError(f"a summary needs at least one client, got {num_clients}",
                          key="clients")
    ids = np.unique(np.linspace(0, num_clients - 1, min(num_clients, sample)).astype(np.int64))
    rows = ids % trace.capacity.rows
    compute = trace.capacity.compute_ms[rows]
    kbps = trace.capacity.bandwidth_kbps[rows]

    def q(x: np.ndarray) -> list[float]:
        # "nearest": no interpolation, so an infinite bandwidth stays inf, not nan
        return [float(v) for v in np.quantile(x, QUANTILES, method="nearest")]

    out: dict = {
        "name": trace.name, "clients": int(num_clients),
        "capacity_rows": trace.capacity.rows, "availability_rows": trace.availability.rows,
        "quantiles": list(QUANTILES), "compute_ms_per_example": q(compute),
        "bandwidth_kbps": q(kbps), "model_bytes": int(model_bytes),
        "model_transfer_s": q(trace.transfer_seconds(ids, np.full(ids.size, model_bytes))),
    }
    av = trace.availability
    if av.rows:
        arow = ids % av.rows
        out["period_h"] = q(av.period[arow] / 3600.0)
        out["online_share_of_period"] = q((av.online_seconds() / av.period)[arow])
        out["windows_per_device"] = float(np.diff(av.offsets)[arow].mean())
        out["online_by_hour"] = [float(trace.online(ids, 3600.0 * h + 1800.0).mean())
                                 for h in range(24)]
    else:
        out["online_share_of_period"] = [1.0] * len(QUANTILES)
        out["online_by_hour"] = [1.0] * 24
    return out
