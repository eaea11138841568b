"""Cohorts trained by Ray actors (``sim.backend = "ray"``): the simulator across cores and
machines on an existing distributed engine.

Ray is the engine of P. Moritz et al., "Ray: A Distributed Framework for Emerging AI
Applications", OSDI 2018: here its object store holds the training set once, and its actors
train. :class:`RayWorkers` is a :class:`~shoal.sim.pool.Workers` for the in-process pool:

* at start-up the training set (features and labels) and the clients' index lists are put in
  the object store *once*; each actor (one CPU, one PyTorch thread) builds a
  :class:`~shoal.sim.cohort.CohortTrainer` on them -- on the actor's machine the arrays are
  read from shared memory, not copied per actor;
* per call, the global model is put once and the cohort (sorted by size, longest first) is
  dealt round-robin to the actors, up to ``chunk`` clients each at a time, so every slice
  holds long and short clients alike; each actor trains its slice with
  :func:`~shoal.sim.pool.train_chunk` -- the vectorized engine and the random streams
  ``(seed, "train", key, client)`` of in-process training -- and returns its rows;
* the driver regroups the rows into the chunks, in the row order, that in-process training
  yields (the coordinator's float32 fold depends on how rows are batched), and the pool
  carries on exactly as in process: the uplink (compression, local DP, error feedback, whose
  per-client state lives in the driver) and then the coordinator, which validates, clips,
  aggregates and records each client as usual.

Why rows and not a partial weighted sum per actor: the coordinator's semantics are per
client -- a non-finite or oversized update is refused on its own, DP clips each client,
robust rules need every row, the registry and the round record learn who took part and their
loss. A sum computed in the actor would lose all of that or move the pipeline into the
carrier. The price is ``k x D`` floats per round through the object store (config L: 100 x
0.8 MB); ``benchmarks/bench_ray.py`` measures what it costs against in-process training.

Ray and in-process training with the same PyTorch threads per trainer (one, the actors'
default) give bit-identical models (``tests/test_ray_backend.py``, configs S and L; in-process
training itself changes in the last bits with its thread count, see ``docs/scaling.md``).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from shoal.data import FederatedData
from shoal.errors import ConfigError, ShoalError
from shoal.sim.cohort import CohortTrainer
from shoal.sim.pool import ClientData, LocalWorkers, Trained, _IndexLists, auto_chunk
from shoal.training import LocalTrainConfig

if TYPE_CHECKING:
    from shoal.config import Config

__all__ = ["RayError", "RayWorkers"]


class RayError(ShoalError):
    """Ray could not be reached, or an actor failed while training (the message says which
    and why)."""


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigError("sim.backend = 'ray' needs Ray: pip install 'shoal[ray]'",
                          key="sim.backend") from None
    return ray


class _SliceTrainer:
    """The actor: one :class:`LocalWorkers` over the shared training set."""

    def __init__(self, module: torch.nn.Module, engine: str, x: np.ndarray, y: np.ndarray,
                 clients: ClientData, seed: int, chunk: int, threads: int) -> None:
        torch.set_num_threads(threads)  # the CPUs Ray gave it: more would fight over them
        with warnings.catch_warnings():
            # the object store's arrays are read-only; training only ever reads them
            warnings.filterwarnings("ignore", message=".*not writable.*")
            trainer = CohortTrainer(module, torch.from_numpy(x), torch.from_numpy(y), engine)
        self.local = LocalWorkers(trainer, clients, seed, chunk)

    def train(self, params: np.ndarray, config: LocalTrainConfig, client_ids: np.ndarray,
              keys: np.ndarray) -> list[Trained]:
        # The trainer reuses its buffers between chunks, so rows of several chunks are
        # copies; one chunk (what the driver sends) is serialised as it is on return.
        one = len(client_ids) <= self.local.chunk
        return [t if one else Trained(t.index, np.array(t.deltas, copy=True), t.num_examples,
                                      t.loss)
                for t in self.local.train(params, config, client_ids, keys)]

    def ready(self) -> bool:
        return True


class RayWorkers:
    """Ray actors that train slices of each cohort (see the module docstring).

    Args:
        trainer: the driver's cohort trainer (its model, engine and training set are what
            the actors get).
        clients: where each client's examples are.
        seed: the run seed.
        address: ``""`` starts a Ray on this machine (if this process has none yet);
            ``"auto"`` joins the cluster this machine belongs to; ``"ray://host:port"``
            connects to a remote cluster's client server. If Ray is already initialised in
            this process (``ray.init`` by the caller), that cluster is used.
        actors: how many actors; 0 = one per ``threads`` CPUs of the cluster.
        chunk: clients trained together at most (in-process training's chunk, whose row
            order the rows keep); 0 = :func:`auto_chunk`.
        threads: CPUs and PyTorch threads of each actor.
        start_timeout: seconds to wait for every actor to be up (they wait for free CPUs).

    Raises:
        ConfigError: Ray is not installed.
        RayError: the cluster cannot be reached, or the actors did not start in time.
    """

    def __init__(self, trainer: CohortTrainer, clients: ClientData, seed: int, *,
                 address: str = "", actors: int = 0, chunk: int = 0, threads: int = 1,
                 start_timeout: float = 120.0) -> None:
        ray = self._ray = _ray()
        self.owns_ray = False
        if not ray.is_initialized():
            try:
                ray.init(address=address or None, include_dashboard=False,
                         logging_level=logging.WARNING, log_to_driver=False)
            except Exception as exc:  # Ray raises ConnectionError, RuntimeError, ValueError
                raise RayError(f"cannot start or reach Ray at "
                               f"{address or 'this machine'!r}: {exc}") from exc
            self.owns_ray = True
        cpus = int(ray.cluster_resources().get("CPU", 1))
        n = actors or max(1, cpus // threads)
        self.dim = trainer.spec.size
        self.chunk = chunk or auto_chunk(self.dim)
        if isinstance(clients, FederatedData):  # its training set is shipped once, below
            clients = _IndexLists(clients.client_indices)
        x = ray.put(trainer.x.numpy())
        y = ray.put(trainer.y.numpy())
        shared = ray.put(clients)
        actor = ray.remote(num_cpus=threads)(_SliceTrainer)
        module = trainer.flat_module.module
        self.actors = [actor.remote(module, trainer.engine, x, y, shared, seed, self.chunk,
                                    threads) for _ in range(n)]
        self._rows = np.empty((0, self.dim), np.float32)
        try:
            ray.get([a.ready.remote() for a in self.actors], timeout=start_timeout)
        except ray.exceptions.GetTimeoutError:
            self.close()
            raise RayError(f"{n} Ray actors of {threads} CPU(s) each did not start within "
                           f"{start_timeout:g} s: the cluster has {cpus} CPUs, "
                           f"{ray.available_resources().get('CPU', 0):g} free; lower "
                           f"sim.ray_actors or sim.threads") from None
        except ray.exceptions.RayError as exc:
            self.close()
            raise RayError(f"the Ray actors failed to start: {exc}") from exc

    @classmethod
    def from_config(cls, cfg: Config, trainer: CohortTrainer, clients: ClientData
                    ) -> RayWorkers:
        """The workers of ``cfg``'s ``sim.ray_address`` and ``sim.ray_actors``, each actor
        with ``sim.threads`` PyTorch threads (1 when automatic)."""
        sim = cfg["sim"]
        return cls(trainer, clients, cfg.seed, address=sim["ray_address"],
                   actors=sim["ray_actors"], threads=sim["threads"] or 1)

    def train(self, params: np.ndarray, config: LocalTrainConfig, client_ids: np.ndarray,
              keys: np.ndarray) -> Iterator[Trained]:
        """Train the clients on the actors; yield their rows as :class:`LocalWorkers` would
        (the same chunks, rows in the same order), so the coordinator folds the same
        matrices and the models agree to the last bit.

        The clients go out in groups of up to ``chunk`` per actor, dealt round-robin; the
        next group is sent before this one's rows are gathered. Yielded rows live in a buffer
        the next group reuses: fold or copy them first.

        Raises:
            RayError: an actor died or failed while training (nothing of the call is
                yielded after it).
        """
        ray = self._ray
        k, n, c = len(client_ids), len(self.actors), self.chunk
        model = ray.put(np.asarray(params, np.float32))

        def send(start: int) -> tuple[int, list[np.ndarray], list[Any]]:
            size = min(n * c, k - start)
            parts = [np.arange(i, size, n) for i in range(min(n, size))]
            return start, parts, [a.train.remote(model, config, client_ids[start + p],
                                                 keys[start + p])
                                  for a, p in zip(self.actors, parts)]

        nxt = send(0) if k else None
        while nxt is not None:
            start, parts, refs = nxt
            size = sum(len(p) for p in parts)
            nxt = send(start + size) if start + size < k else None
            if self._rows.shape[0] < size:
                self._rows = np.empty((size, self.dim), np.float32)
            rows = self._rows[:size]
            examples = np.empty(size, np.int64)
            loss = np.empty(size, np.float64)
            for part, ref in zip(parts, refs):
                for t in self._wait(ray.get, ref):
                    at = part[t.index]
                    rows[at], examples[at], loss[at] = t.deltas, t.num_examples, t.loss
            # Clients come sorted by size, so a chunk trained in process has its rows in
            # input order (the engine orders by local steps, stably): the same chunks here.
            for j in range(0, size, c):
                span = slice(j, min(j + c, size))
                yield Trained(start + np.arange(span.start, span.stop), rows[span],
                              examples[span], loss[span])

    def _wait(self, get: Any, refs: Any) -> Any:
        try:
            return get(refs)
        except self._ray.exceptions.RayError as exc:
            raise RayError(f"a Ray actor failed while training: {exc}") from exc

    def close(self) -> None:
        """Stop the actors, and the Ray this object started (if it did). Actors also stop
        once nothing refers to this object, but only when it is garbage-collected."""
        for a in self.actors:
            self._ray.kill(a)
        self.actors = []
        if self.owns_ray:
            self._ray.shutdown()
            self.owns_ray = False

    def __repr__(self) -> str:
        return f"RayWorkers({len(self.actors)} actors, {self.chunk} clients per chunk)"

