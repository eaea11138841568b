"""The aggregator cluster's round state in Redis: the open task, who folded which device,
and the partial aggregates on their way to the committer.

One :class:`RoundBoard` per process talks to one Redis (``redis-server``; the same one the
shared device registry lives in). Keys, under ``{prefix}:cluster``:

* ``task`` -- the open training task's reference ``RUN.ID`` (absent: none): ``RUN`` is a
  random token each committer draws when it starts (a restarted committer counts its tasks
  from 1 again, and must not meet its predecessor's claims), ``ID`` the coordinator's task id.
* ``t:{RUN.ID}`` -- a hash: ``round``, ``version``, ``deadline`` (wall-clock seconds),
  ``target`` (folds the round takes), ``closed`` (``0``/``1``), ``settings`` and
  ``devices`` (JSON: the client settings; the cohort's device ids in the committer's order),
  ``clip_norm`` (``""``: none); ``t:{RUN.ID}:params`` the model (float32 bytes).
* ``t:{RUN.ID}:folds`` -- a hash device id -> ingest node: the one node that folds the device's
  update. :meth:`claim` is one Lua script (atomic in Redis): a device is folded by at most
  one node, never after the task closed or once ``target`` devices are claimed, which is why
  no update is ever counted twice however devices move between nodes.
* ``partials`` -- a list of partial aggregates (a JSON header, a newline, the float32
  delta); the committer pops them (:meth:`pop_partial`).

Task keys expire a day after they are written (a dead committer leaves no garbage forever).

Nothing here has a round rule: the committer's coordinator decides when a task opens and
closes, the ingest nodes' sessions and pipelines judge devices and updates.
"""

from __future__ import annotations

import json
import math
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import redis as redis_py

from shoal.errors import ProtocolError
from shoal.events import TrainTask
from shoal.registry.redis import RegistryUnavailable

__all__ = ["ClusterTask", "Partial", "RoundBoard", "remaining_s"]

_TTL_S = 86_400

#: KEYS: task hash, folds hash; ARGV: device, node -> "ok" | "taken" | "closed" | "full"
_CLAIM = """
local closed = redis.call('HGET', KEYS[1], 'closed')
if closed == false then return 'closed' end
if closed ~= '0' then return 'closed' end
local owner = redis.call('HGET', KEYS[2], ARGV[1])
if owner then
  if owner == ARGV[2] then return 'ok' end
  return 'taken'
end
if redis.call('HLEN', KEYS[2]) >= tonumber(redis.call('HGET', KEYS[1], 'target')) then
  return 'full'
end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[3]))
return 'ok'
"""

#: KEYS: folds hash; ARGV: device, node -> 1 if released
_RELEASE = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  return redis.call('HDEL', KEYS[1], ARGV[1])
end
return 0
"""


@dataclass(frozen=True)
class ClusterTask:
    """The committer's training task as the ingest nodes read it.

    Attributes:
        ref: its reference on the board (``RUN.ID``).
        task: the coordinator's task (its deadline on the wall clock, ``time.time()``).
        devices: the cohort's device ids.
        target: how many devices the round folds at most.
        closed: the committer closed it (late folds are refused).
    """

    ref: str
    task: TrainTask
    devices: tuple[str, ...]
    target: int
    closed: bool


@dataclass(frozen=True)
class Partial:
    """One ingest node's partial aggregate of the task ``task`` (its reference ``RUN.ID``):
    the weighted mean ``delta`` of the updates of ``devices`` (those it folded),
    ``num_examples`` the weight behind it."""

    task: str
    node: str
    delta: np.ndarray
    num_examples: int
    devices: tuple[str, ...]
    base_version: int
    metrics: Mapping[str, float] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        head = {"task": self.task, "node": self.node, "examples": int(self.num_examples),
                "devices": list(self.devices), "base": int(self.base_version),
                "metrics": {k: float(v) for k, v in self.metrics.items()}}
        return json.dumps(head).encode() + b"\n" + \
            np.ascontiguousarray(self.delta, np.float32).tobytes()

    @classmethod
    def from_bytes(cls, blob: bytes, dim: int) -> Partial:
        """Parse one queued partial.

        Raises:
            ProtocolError: not a partial of a ``dim``-parameter model.
        """
        head_raw, sep, body = blob.partition(b"\n")
        try:
            head = json.loads(head_raw)
            devices = tuple(str(d) for d in head["devices"])
            task, examples, base = str(head["task"]), int(head["examples"]), int(head["base"])
            node, metrics = str(head["node"]), {str(k): float(v)
                                                for k, v in dict(head["metrics"]).items()}
        except (ValueError, KeyError, TypeError) as exc:
            raise ProtocolError(f"a queued partial aggregate has a bad header: {exc}") from None
        if not sep or len(body) != 4 * dim:
            raise ProtocolError(f"a queued partial aggregate of node {node!r} holds "
                                f"{len(body)} bytes, not {dim} float32 values")
        return cls(task, node, np.frombuffer(body, np.float32).copy(), examples, devices,
                   base, metrics)


class RoundBoard:
    """The cluster's round state in Redis (see the module docstring).

    Args:
        url: the Redis, ``redis://host:port/db``.
        prefix: the deployment's key prefix (``deploy.redis_prefix``).
        timeout: seconds a Redis call may take before :class:`RegistryUnavailable`.
    """

    def __init__(self, url: str, *, prefix: str = "shoal", timeout: float = 5.0) -> None:
        self._r = redis_py.Redis.from_url(url, socket_timeout=timeout,
                                          socket_connect_timeout=timeout)
        kw = self._r.connection_pool.connection_kwargs
        self.address = f"{kw.get('host', '?')}:{kw.get('port', '')}"
        self.timeout = timeout
        self.p = f"{prefix}:cluster"
        self.run = ""  # the committer's run token (reset)
        self._claim = self._r.register_script(_CLAIM)
        self._release = self._r.register_script(_RELEASE)

    def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (redis_py.ConnectionError, redis_py.TimeoutError) as exc:
            raise RegistryUnavailable(f"the cluster's Redis at {self.address} is unreachable "
                                      f"({exc})", address=self.address) from None

    def close(self) -> None:
        self._r.close()

    # -- the committer ----------------------------------------------------------------------

    def open(self, task: TrainTask, devices: Sequence[str], target: int) -> None:
        """Publish ``task`` (deadline on the wall clock) for ``devices``; it becomes the
        open task."""
        ref = self.ref(task.task_id)
        key = f"{self.p}:t:{ref}"
        clip = "" if task.clip_norm is None else repr(float(task.clip_norm))
        fields: dict[str, str | int] = {
            "round": task.round, "version": task.version, "deadline": repr(float(task.deadline)),
            "target": int(target), "closed": 0, "settings": json.dumps(dict(task.settings)),
            "clip_norm": clip, "devices": json.dumps(list(devices))}
        pipe = self._r.pipeline()
        pipe.set(f"{key}:params", np.ascontiguousarray(task.params, np.float32).tobytes(),
                 ex=_TTL_S)
        pipe.hset(key, items=[x for pair in fields.items() for x in pair])
        pipe.expire(key, _TTL_S)
        pipe.set(f"{self.p}:task", ref, ex=_TTL_S)
        self._call(pipe.execute)

    def close_task(self, task_id: int) -> None:
        """Close ``task_id`` of this committer's run: later folds are refused."""
        key = f"{self.p}:t:{self.ref(task_id)}"
        self._call(lambda: self._r.exists(key) and self._r.hset(key, "closed", 1))

    def pop_partial(self, timeout_s: float, dim: int) -> Partial | None:
        """The next queued partial aggregate, waiting up to ``timeout_s`` (``None``: none).

        Raises:
            ProtocolError: a queued entry is not a partial of a ``dim``-parameter model.
        """
        wait = max(0.0, min(timeout_s, self.timeout / 2))
        got = self._call(self._r.blpop, [f"{self.p}:partials"], timeout=wait) if wait >= 0.01 \
            else self._call(self._r.lpop, f"{self.p}:partials")
        if not got:
            return None
        return Partial.from_bytes(got[1] if isinstance(got, (list, tuple)) else got, dim)

    def ref(self, task_id: int) -> str:
        """The board's reference of this committer's task ``task_id``."""
        return f"{self.run}.{task_id}"

    def reset(self) -> None:
        """Start a committer's run: draw its token, forget a previous run's open task and
        queued partials."""
        self.run = secrets.token_hex(8)
        self._call(self._r.delete, f"{self.p}:task", f"{self.p}:partials")

    # -- the ingest nodes -------------------------------------------------------------------

    def current(self) -> str:
        """The open task's reference (``""``: none)."""
        got = self._call(self._r.get, f"{self.p}:task")
        return got.decode() if got else ""

    def load(self, ref: str) -> ClusterTask | None:
        """Task ``ref`` as published (``None`` once it expired or was never opened)."""
        key = f"{self.p}:t:{ref}"
        pipe = self._r.pipeline()
        pipe.hgetall(key)
        pipe.get(f"{key}:params")
        h, params = self._call(pipe.execute)
        if not h or params is None:
            return None
        f = {k.decode(): v.decode() for k, v in h.items()}
        clip = f["clip_norm"]
        task = TrainTask(task_id=int(ref.rpartition(".")[2]), version=int(f["version"]),
                         params=np.frombuffer(params, np.float32).copy(),
                         round=int(f["round"]), settings=json.loads(f["settings"]),
                         deadline=float(f["deadline"]),
                         clip_norm=float(clip) if clip else None)
        return ClusterTask(ref, task, tuple(json.loads(f["devices"])), int(f["target"]),
                           f["closed"] != "0")

    def state(self, ref: str) -> tuple[bool, int, dict[str, str]]:
        """``(closed, target, folds)`` of task ``ref`` (folds: device -> node); an expired
        task reads as closed."""
        key = f"{self.p}:t:{ref}"
        pipe = self._r.pipeline()
        pipe.hmget(key, ["closed", "target"])
        pipe.hgetall(f"{key}:folds")
        (closed, target), folds = self._call(pipe.execute)
        return (closed is None or closed != b"0", int(target or 0),
                {k.decode(): v.decode() for k, v in folds.items()})

    def claim(self, ref: str, device: str, node: str) -> str:
        """Let ``node`` fold ``device``'s update of task ``ref``: ``"ok"`` (it is this node's
        now, or already was), ``"taken"`` (another node's), ``"closed"`` or ``"full"``."""
        key = f"{self.p}:t:{ref}"
        got = self._call(self._claim, keys=[key, f"{key}:folds"], args=[device, node, _TTL_S])
        return got.decode() if isinstance(got, bytes) else str(got)

    def release(self, ref: str, device: str, node: str) -> None:
        """Undo ``node``'s claim of ``device`` (its update was refused after all)."""
        self._call(self._release, keys=[f"{self.p}:t:{ref}:folds"], args=[device, node])

    def push_partial(self, partial: Partial) -> None:
        self._call(self._r.rpush, f"{self.p}:partials", partial.to_bytes())


def remaining_s(deadline: float, now: float, grace_s: float) -> float:
    """Seconds an ingest node still folds for a task due at ``deadline`` (at least 0.1)."""
    if not math.isfinite(deadline):
        return math.inf
    return max(0.1, deadline - grace_s - now)
