"""Attacks as client behaviours: a fixed set of malicious clients in the simulator.

:func:`attacked_pool` builds the in-process pool of a config whose ``[attack]`` names an
attack: the malicious clients (a fixed fraction of the population, drawn from
``attack.seed``) train on poisoned data (:func:`poisoned_data`) and/or replace the update they
upload (:class:`AttackedPool` wraps the pool and rewrites their rows of every arriving batch
before the coordinator sees it). Honest clients are untouched.

Data poisoning (the attacker trains honestly on bad data):

* ``label_flip``: labels ``y -> C - 1 - y`` (as in the epfml reference code);
* ``backdoor``: a ``poison_fraction`` of the attacker's examples carry a pixel pattern and the
  target label, and the update is boosted by ``scale`` (model replacement: ``n / eta``
  clients per round over the server learning rate) -- E. Bagdasaryan, A. Veit, Y. Hua,
  D. Estrin, V. Shmatikov, "How To Backdoor Federated Learning", AISTATS 2020;
  :func:`backdoor_testset` measures the backdoor accuracy;
* ``sybil``: every attacker flips labels and all of them upload one identical update, the
  mean of theirs (many colluding identities: C. Fung, C. J. M. Yoon, I. Beschastnikh,
  "Mitigating Sybils in Federated Learning Poisoning", 2018).

Model poisoning (the attacker uploads a crafted vector):

* ``sign_flip``: ``-scale x`` its honest update; ``gaussian``: ``N(0, noise_std^2)`` noise;
* ``alie``: ``mu - z sigma`` (coordinate-wise mean and standard deviation of the reference
  updates) with the paper's ``z = Phi^-1((n - s) / n)``, ``s = floor(n/2 + 1) - f`` --
  M. Baruch, G. Baruch, Y. Goldberg, "A Little Is Enough: Circumventing Defenses For
  Distributed Learning", NeurIPS 2019;
* ``ipm``: ``-epsilon x mu`` -- C. Xie, O. Koyejo, I. Gupta, "Fall of Empires: Breaking
  Byzantine-tolerant SGD by Inner Product Manipulation", UAI 2020;
* ``min_max`` / ``min_sum``: ``mu - gamma sigma`` with the largest ``gamma`` (bisection) whose
  distances to the reference updates stay within theirs: max distance <= the largest
  pairwise distance (min-max), sum of squared distances <= the largest such sum (min-sum) --
  V. Shejwalkar, A. Houmansadr, "Manipulating the Byzantine: Optimizing Model Poisoning
  Attacks and Defenses for Federated Learning", NDSS 2021.

Knowledge: ``alie``, ``ipm``, ``min_max`` and ``min_sum`` need statistics of honest
updates. With ``knowledge = "omniscient"`` they are given every honest update of the cohort
(the other clients' and their own honest ones: the full-knowledge threat model of both
papers); with ``"own"`` only the honest updates the attackers computed themselves. All
attackers of a cohort send the same crafted vector. The statistics are taken over the whole
cohort, so the wrapper holds a cohort's updates (copies) whenever it contains an attacker.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterator, Mapping
from dataclasses import Field, dataclass, replace
from typing import Any, ClassVar, Generic, Protocol, TypeVar

import numpy as np
import torch

from shoal import seeds
from shoal.config import Config
from shoal.data import Dataset, FederatedData
from shoal.errors import ConfigError
from shoal.events import TrainTask, UpdateBatch
from shoal.privacy.dp import LocalDP
from shoal.sim.pool import InProcessPool, in_process_pool

__all__ = ["ATTACKS", "Attack", "AttackedPool", "attacked_pool", "malicious_clients",
           "poisoned_data", "stamp", "backdoor_testset", "MaliciousTrain"]

ATTACKS = ("label_flip", "sign_flip", "gaussian", "backdoor", "alie", "ipm", "min_max",
           "min_sum", "sybil")
_DATA_POISONING = ("label_flip", "backdoor", "sybil")
_STATISTICS = ("alie", "ipm", "min_max", "min_sum")


def malicious_clients(num_clients: int, fraction: float, seed: int) -> np.ndarray:
    """The sorted ids of ``round(fraction x num_clients)`` malicious clients, drawn from the
    stream ``(seed, "attack", "clients")`` (independent of the run seed)."""
    count = int(round(fraction * num_clients))
    perm = seeds.generator(seed, "attack", "clients").permutation(num_clients)
    return np.sort(perm[:count]).astype(np.int64)


# --------------------------------------------------------------------------- data poisoning


def stamp(x: np.ndarray) -> np.ndarray:
    """Copies of ``x`` (flat examples) carrying the backdoor pattern: for 28x28 images a
    3x3 checkerboard of white pixels near the top-left corner, otherwise the first four
    features set to 4 (well outside standardised features)."""
    out = np.array(x, dtype=np.float32, copy=True)
    if out.shape[1] == 28 * 28:
        img = out.reshape(len(out), 28, 28)
        for r, c in ((1, 1), (1, 3), (2, 2), (3, 1), (3, 3)):
            img[:, r, c] = 1.0
        return out
    out[:, :4] = 4.0
    return out


def backdoor_testset(test: Dataset, target: int) -> Dataset:
    """The test examples whose label is not ``target``, stamped and labelled ``target``:
    the accuracy on it is the backdoor accuracy (attack success rate)."""
    keep = test.y != target
    x = stamp(test.x[keep].reshape(int(keep.sum()), -1)).reshape(test.x[keep].shape)
    return Dataset(x, np.full(int(keep.sum()), target, np.int64), test.num_classes,
                   test.name + "/backdoor")


def poisoned_data(data: FederatedData, malicious: np.ndarray, attack: Attack,
                  rng: np.random.Generator) -> FederatedData:
    """``data`` where the malicious clients' examples are replaced by poisoned copies
    (appended to the shared training set; honest clients keep their indices).

    Raises:
        ConfigError: ``attack.target_label`` is not a label of the data.
    """
    train = data.train
    if attack.kind not in _DATA_POISONING or len(malicious) == 0:
        return data
    if attack.kind == "backdoor" and not 0 <= attack.target_label < train.num_classes:
        raise ConfigError(f"attack.target_label = {attack.target_label} is not a label of "
                          f"{train.name} (0..{train.num_classes - 1})",
                          key="attack.target_label")
    flat = train.x.reshape(len(train.x), -1)
    parts = list(data.client_indices)
    new_x, new_y = [], []
    offset = len(train.y)
    for c in malicious.tolist():
        idx = parts[c]
        if attack.kind == "backdoor":
            chosen = rng.random(len(idx)) < attack.poison_fraction
            x = np.where(chosen[:, None], stamp(flat[idx]), flat[idx])
            y = np.where(chosen, attack.target_label, train.y[idx])
        else:
            x, y = flat[idx], train.num_classes - 1 - train.y[idx]
        new_x.append(x)
        new_y.append(y.astype(np.int64))
        parts[c] = np.arange(offset, offset + len(idx), dtype=np.int64)
        offset += len(idx)
    x_all = np.concatenate([flat, *new_x]).reshape(-1, *train.x.shape[1:])
    poisoned = Dataset(x_all.astype(np.float32, copy=False), np.concatenate([train.y, *new_y]),
                       train.num_classes, train.name + "/poisoned")
    return replace(data, train=poisoned, client_indices=tuple(parts))


# --------------------------------------------------------------------------- crafted updates


@dataclass(frozen=True)
class Attack:
    """What the malicious clients do (see the module docstring).

    Raises:
        ConfigError: an unknown kind or knowledge.
    """

    kind: str
    knowledge: str = "omniscient"
    scale: float = 0.0
    noise_std: float = 1.0
    ipm_epsilon: float = 0.5
    target_label: int = 0
    poison_fraction: float = 0.5
    server_lr: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in ATTACKS:
            raise ConfigError(f"attack.kind must be one of {list(ATTACKS)}, got "
                              f"{self.kind!r}", key="attack.kind")
        if self.knowledge not in ("omniscient", "own"):
            raise ConfigError(f"attack.knowledge must be 'omniscient' or 'own', got "
                              f"{self.knowledge!r}", key="attack.knowledge")

    def craft(self, rows: np.ndarray, malicious: np.ndarray, rng: np.random.Generator
              ) -> np.ndarray:
        """The rows the malicious clients upload.

        Args:
            rows: ``(n, D)`` the cohort's updates as trained (the attackers' on their own,
                possibly poisoned, data).
            malicious: bool mask over ``rows``.
            rng: the round's attack stream (Gaussian noise).
        """
        own = rows[malicious].astype(np.float64)
        a, n = len(own), len(rows)
        if self.kind == "label_flip":
            return own
        if self.kind == "backdoor":
            return own * (self.scale or n / self.server_lr)
        if self.kind == "sign_flip":
            return -(self.scale or 1.0) * own
        if self.kind == "gaussian":
            return rng.normal(0.0, self.noise_std, size=own.shape)
        if self.kind == "sybil":
            return np.repeat(own.mean(axis=0, keepdims=True), a, axis=0)
        ref = (rows if self.knowledge == "omniscient" else rows[malicious]).astype(np.float64)
        mu = ref.mean(axis=0)
        sigma = ref.std(axis=0)
        if self.kind == "ipm":
            vec = -self.ipm_epsilon * mu
        elif self.kind == "alie":
            vec = mu - alie_z(n, a) * sigma
        else:
            vec = min_max_vector(ref, mu, sigma, squared_sum=self.kind == "min_sum")
        return np.repeat(vec[np.newaxis], a, axis=0)


def alie_z(n: int, f: int) -> float:
    """Baruch et al.'s ``z_max = Phi^-1((n - s) / n)`` with ``s = floor(n/2 + 1) - f``
    (the paper's convention; the epfml code uses ``(n - f - s) / (n - f)``)."""
    s = math.floor(n / 2 + 1) - f
    p = min(max((n - s) / n, 1e-6), 1 - 1e-6)
    return statistics.NormalDist().inv_cdf(p)


def min_max_vector(ref: np.ndarray, mu: np.ndarray, dev: np.ndarray, *,
                   squared_sum: bool) -> np.ndarray:
    """``mu - gamma dev`` with the largest ``gamma`` found by Shejwalkar and Houmansadr's
    bisection (start 10, stop at 1e-5) that keeps the vector's distances to ``ref`` within
    the reference updates' own (min-max: the largest distance; min-sum: the sum of squares).
    """
    sq = np.einsum("ij,ij->i", ref, ref)
    gram = ref @ ref.T
    pair = np.maximum(sq[:, None] + sq[None, :] - 2 * gram, 0.0)
    bound = pair.sum(axis=1).max() if squared_sum else pair.max()

    def fits(gamma: float) -> bool:
        v = mu - gamma * dev
        d = np.maximum(sq - 2 * ref @ v + v @ v, 0.0)
        return bool((d.sum() if squared_sum else d.max()) <= bound)

    gamma, step, ok = 10.0, 10.0, 0.0
    while abs(ok - gamma) > 1e-5:
        if fits(gamma):
            ok = gamma
            gamma += step / 2
        else:
            gamma -= step / 2
        step /= 2
    return mu - ok * dev


# --------------------------------------------------------------------------- the pool


class AttackedPool:
    """A client pool whose malicious clients upload what ``attack`` crafts.

    Args:
        pool: the honest pool (trained on :func:`poisoned_data` for data poisoning).
        attack: what the malicious clients do.
        malicious: their sorted ids.
        seed: the run seed (Gaussian noise: stream ``(seed, "attack", round, task)``).
    """

    def __init__(self, pool: InProcessPool, attack: Attack, malicious: np.ndarray,
                 seed: int) -> None:
        self.pool, self.attack, self.seed = pool, attack, seed
        self.malicious = np.asarray(malicious, np.int64)

    @property
    def num_clients(self) -> int:
        return self.pool.num_clients

    def train(self, task: TrainTask, client_ids: np.ndarray) -> Iterator[UpdateBatch]:
        ids = np.asarray(client_ids, np.int64)
        if not np.isin(ids, self.malicious).any():
            yield from self.pool.train(task, ids)
            return
        # the trainer reuses its buffers between chunks: hold copies of the cohort's rows
        batches = [replace(b, deltas=np.array(b.deltas, np.float32, copy=True))
                   for b in self.pool.train(task, ids)]
        rows = np.concatenate([b.deltas for b in batches])
        who = np.concatenate([b.client_ids for b in batches])
        bad = np.isin(who, self.malicious)
        rng = seeds.generator(self.seed, "attack", task.round, task.task_id)
        rows[bad] = self.attack.craft(rows, bad, rng).astype(np.float32)
        start = 0
        for b in batches:
            k = len(b.client_ids)
            yield replace(b, deltas=rows[start:start + k])
            start += k


def attack_from_config(cfg: Config) -> Attack:
    a = cfg["attack"]
    return Attack(a["kind"], knowledge=a["knowledge"], scale=a["scale"],
                  noise_std=a["noise_std"], ipm_epsilon=a["ipm_epsilon"],
                  target_label=a["target_label"], poison_fraction=a["poison_fraction"],
                  server_lr=cfg["strategy"]["server_lr"])


def attacked_pool(cfg: Config, model: torch.nn.Module, data: FederatedData, dim: int,
                  local_dp: LocalDP | None = None) -> tuple[InProcessPool | AttackedPool, str]:
    """:func:`~shoal.sim.pool.in_process_pool` with ``cfg["attack"]``'s malicious clients
    (unchanged when ``attack.kind = "none"``)."""
    a = cfg["attack"]
    if a["kind"] == "none":
        return in_process_pool(cfg, model, data, dim, local_dp)
    attack = attack_from_config(cfg)
    bad = malicious_clients(len(data.client_indices), a["fraction"], a["seed"])
    poisoned = poisoned_data(data, bad, attack, seeds.generator(a["seed"], "attack", "data"))
    pool, engine = in_process_pool(cfg, model, poisoned, dim, local_dp)
    return AttackedPool(pool, attack, bad, cfg.seed), engine


# --------------------------------------------------------------------------- a device


class _TrainResult(Protocol):
    """What :class:`MaliciousTrain` needs of a training result: a dataclass with a ``delta``
    (the device API's ``TrainResult``, named structurally: ``sim`` never imports
    ``transport``)."""

    __dataclass_fields__: ClassVar[dict[str, Field[Any]]]

    @property
    def delta(self) -> np.ndarray: ...


_R = TypeVar("_R", bound=_TrainResult)
_R_co = TypeVar("_R_co", bound=_TrainResult, covariant=True)


class _Train(Protocol[_R_co]):
    """A device's training function (the device API's ``TrainFn``)."""

    def __call__(self, params: np.ndarray, settings: Mapping[str, float], round: int) -> _R_co: ...


class MaliciousTrain(Generic[_R]):
    """A deployed device's training function turned malicious (for deployment tests): it
    trains honestly with ``train`` and uploads ``sign_flip`` (``-scale x`` the update),
    ``gaussian`` noise or a ``backdoor``-style boost (``scale x`` the update). Attacks that
    need other devices' updates cannot run on one device.

    Raises:
        ConfigError: any other kind.
    """

    def __init__(self, train: _Train[_R], kind: str, *, scale: float = 1.0, noise_std: float = 1.0,
                 rng: np.random.Generator | None = None) -> None:
        if kind not in ("sign_flip", "gaussian", "backdoor"):
            raise ConfigError(f"a single malicious device can run 'sign_flip', 'gaussian' or "
                              f"'backdoor', not {kind!r}", key="attack.kind")
        self.train, self.kind, self.scale, self.noise_std = train, kind, scale, noise_std
        self.rng = rng if rng is not None else np.random.default_rng()

    def __call__(self, params: np.ndarray, settings: Mapping[str, float], round: int) -> _R:
        result = self.train(params, settings, round)
        delta = np.asarray(result.delta, np.float32)
        if self.kind == "gaussian":
            delta = self.rng.normal(0.0, self.noise_std, delta.shape).astype(np.float32)
        else:
            delta = delta * np.float32(-self.scale if self.kind == "sign_flip" else self.scale)
        return replace(result, delta=delta)
