"""The server side of one CKKS-aggregated round over pulling devices, sans-I/O.

A :class:`CkksDeviceRound` is the session of a task whose updates are summed under
homomorphic encryption (:mod:`shoal.privacy.he`: CKKS, Cheon, Kim, Kim & Song, "Homomorphic
Encryption for Arithmetic of Approximate Numbers", ASIACRYPT 2017). Selected devices check
in and receive a :class:`~shoal.device_task.Task` (with its one-time key) as in a plain
round, plus the key id of the run's public CKKS context (:class:`CkksSetup`). Each device
clips its update to ``[-clip, clip]``, multiplies it by its weight (its example count capped
at ``max_weight``), encrypts it and the weight under the public context and uploads the
ciphertexts. The session folds each upload into its :class:`~shoal.privacy.he.CkksSum` as it
arrives (memory: one ciphertext set) and never holds the secret key.

Collection ends when ``target`` devices are in or at ``deadline``; a device that never uploads
is simply not in the sum. With at least ``min_accepted`` contributions (and never fewer than
two) the summed ciphertexts go to the key holder (``CkksSetup.decrypt``), which decrypts the
sum and nothing else; the decrypted mean reaches the coordinator as one
:class:`~shoal.events.PartialAggregate`, exactly like a SecAgg+ round's unmasked sum. With
fewer, the round aborts and nothing is decrypted.

An upload is refused with :class:`~shoal.errors.UpdateRejected` and changes nothing when it
is not authenticated (the reasons of :meth:`DeviceTask.authenticate
<shoal.device_task.DeviceTask.authenticate>`), arrives after collection closed (``late``),
names another context's key id (``wrong_key``: the only defence against ciphertexts under
another key, which parse and add like good ones and decrypt to noise -- the id is the SHA-256
of the public context the device was given, so it catches a device of another run, not a
forger), or has ciphertexts that are malformed, of the wrong number or length
(``malformed``, ``wrong_shape``), or could overflow the sum (``capacity``). A repeated upload
of a device already in the sum is answered as accepted and counted in ``replays``.

Time is the ``now`` argument; nothing here sleeps, reads a clock or opens a socket. Not
thread-safe: the gateway serialises calls.
"""

from __future__ import annotations

import functools
import hashlib
from collections import Counter
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shoal.device_secagg import SecAggStatus
from shoal.device_task import CheckInDecision, DeviceTask
from shoal.errors import ConfigError, PrivacyError, ProtocolError, UpdateRejected
from shoal.events import PartialAggregate
from shoal.privacy.he import CkksParams, CkksSum, public_context

__all__ = ["CkksDeviceRound", "CkksSetup"]

#: ``decrypt(summed ciphertexts, dim, contributions, (round, task id)) -> (sum of w·x, sum
#: of w)``: the key holder decrypts each ``(round, task id)`` once
Decrypt = Callable[[Sequence[bytes], int, int, Hashable], "tuple[np.ndarray, float]"]


@dataclass(frozen=True)
class CkksSetup:
    """What the aggregator knows of a run's CKKS aggregation: the public context, the bounds
    every device applies, and the one call to the key holder.

    Attributes:
        params: the CKKS parameters.
        context: the serialized *public* context (no secret key; refused otherwise).
        clip: every device clips each coordinate to ``[-clip, clip]``.
        max_weight: every device caps its weight (example count) at this.
        decrypt: the key holder's decryption of one round's sum (e.g.
            :meth:`KeyHolder.decrypt_sum <shoal.privacy.he.KeyHolder.decrypt_sum>` in
            another process); the aggregator never holds the secret key.
    """

    params: CkksParams
    context: bytes = field(repr=False)
    clip: float
    max_weight: int
    decrypt: Decrypt = field(repr=False, compare=False)

    def __post_init__(self) -> None:
        if not (self.clip > 0 and self.max_weight >= 1):
            raise ConfigError("CKKS aggregation needs clip > 0 and max_weight >= 1",
                              key="secure_aggregation.clip")
        self.public  # noqa: B018 -- refuses a context with a secret key, at once

    @functools.cached_property
    def public(self) -> Any:
        """The loaded public context (encryption and addition only)."""
        return public_context(self.context)

    @functools.cached_property
    def key_id(self) -> bytes:
        """SHA-256 of the public context: the name devices echo with their ciphertexts."""
        return hashlib.sha256(self.context).digest()

    def ciphertexts(self, dim: int) -> int:
        """Ciphertexts in one upload of a ``dim``-value model (the weight rides along)."""
        return -(-(dim + 1) // self.params.slots)


class CkksDeviceRound:
    """One CKKS-aggregated round over pulling devices (see the module docstring).

    Args:
        task_id, round, model_version, selected, client_ids, checkin_interval_s,
            retry_spread_s: as for :class:`~shoal.device_task.DeviceTask`.
        target: uploads after which collection closes early (>= 1).
        min_accepted: fewest contributions to decrypt (at least 2: a sum of one is one
            device's update).
        deadline: when collection closes at the latest.
        dim: the model length.
        setup: the run's :class:`CkksSetup`.

    Raises:
        ConfigError: an argument out of range.
    """

    def __init__(self, task_id: int, round: int, model_version: int, selected: Sequence[str],
                 *, target: int, min_accepted: int, deadline: float, dim: int,
                 setup: CkksSetup, client_ids: Sequence[int] | None = None,
                 checkin_interval_s: float = 10.0, retry_spread_s: float = 10.0) -> None:
        for name, value in (("target", target), ("min_accepted", min_accepted), ("dim", dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an int >= 1, got {value!r}", key=name)
        self._devices = DeviceTask(task_id, round, model_version, selected,
                                   client_ids=client_ids, deadline=deadline,
                                   checkin_interval_s=checkin_interval_s,
                                   retry_spread_s=retry_spread_s)
        self.task_id, self.round = self._devices.task_id, self._devices.round
        self.model_version = self._devices.model_version
        self.clip_norm = None
        self.setup, self.dim = setup, dim
        self.target, self.min_accepted = target, max(2, min_accepted)
        self.deadline = self._devices.deadline
        # the gateway wakes for the nearer of these; a CKKS round has one collection stage
        self.roster_deadline = self.stage_deadline = self.deadline
        self.phase = "collecting"
        self.error = ""
        self.roster: tuple[int, ...] = ()
        self.included: set[int] = set()
        self.replays = 0
        self.dropped_at: Counter[str] = Counter()
        self._sum: CkksSum | None = CkksSum(setup.public, setup.params, dim, clip=setup.clip,
                                            max_weight=setup.max_weight)
        self._rejections: Counter[str] = Counter()

    # -- queries ------------------------------------------------------------------------------

    @property
    def selected(self) -> tuple[str, ...]:
        return self._devices.selected

    @property
    def rejections(self) -> dict[str, int]:
        out = Counter(self._devices.rejections)
        out.update(self._rejections)
        return dict(out)

    @property
    def bytes_in(self) -> int:
        """Ciphertext bytes folded into the sum so far."""
        return self._sum.bytes_in if self._sum is not None else 0

    def device_id(self, client_id: int) -> str:
        return self._devices.device_id(client_id)

    def client_id(self, device_id: str) -> int:
        return self._devices.client_id(device_id)

    def status(self, now: float | None = None) -> SecAggStatus:
        """Where the round stands, in the shape of a SecAgg+ round's status (phase
        ``"collecting"``, ``"done"`` or ``"aborted"``)."""
        return SecAggStatus(phase=self.phase, stage=None, roster=len(self.roster),
                            included=len(self.included),
                            done=self.phase in ("done", "aborted"),
                            commit=self.phase == "done", error=self.error)

    def result(self) -> tuple[list[bytes], frozenset[int]]:
        """``(the summed ciphertexts, included client ids)``.

        Raises:
            ProtocolError: the round has not finished successfully.
        """
        if self.phase != "done" or self._sum is None:
            raise ProtocolError(f"no result: the round is {self.phase}")
        return self._sum.result(), frozenset(self.included)

    def partial(self, metrics: Mapping[str, float] | None = None) -> PartialAggregate:
        """Have the key holder decrypt the sum; the weighted mean of the included devices'
        clipped updates as the coordinator's arrival.

        Raises:
            ProtocolError: the round has not finished successfully.
            PrivacyError: the key holder refused (e.g. a second decryption of this task).
        """
        ciphertexts, included = self.result()
        total, weight = self.setup.decrypt(ciphertexts, self.dim, len(included),
                                           (self.round, self.task_id))
        # the weight is a sum of integers carried with an error of about 1e-8 each
        examples = int(round(weight))
        n = len(included)
        if not n <= examples <= n * self.setup.max_weight:
            raise PrivacyError(f"the decrypted weight {weight:g} is not a sum of {n} example "
                               f"counts of 1..{self.setup.max_weight:g}: a contribution was "
                               f"not encrypted as devices do")
        # honest contributions are w * clip(x): every coordinate of the sum within clip * sum w
        # (plus CKKS's error); a device's out-of-range plaintext shows here, if nowhere else
        worst = float(np.max(np.abs(total))) if len(total) else 0.0
        if worst > self.setup.clip * examples * (1 + 1e-6) + 1e-3:
            raise PrivacyError(f"a coordinate of the decrypted sum is {worst:g}, beyond "
                               f"clip x total weight = {self.setup.clip * examples:g}: a "
                               f"contribution was not clipped as devices do")
        p = self.setup.params
        return PartialAggregate(
            delta=(np.asarray(total, dtype=np.float64) / examples).astype(np.float32),
            num_examples=examples, clients=len(included),
            metrics={"ckks_included": float(len(included)),
                     "ckks_dropped": float(len(self.roster) - len(included)),
                     "ckks_ring_degree": float(p.poly_modulus_degree),
                     "ckks_security_bits": float(p.security_bits),
                     "ckks_upload_bytes": float(self.bytes_in / max(1, len(included))),
                     **(metrics or {})},
            base_version=self.model_version, clip_norm=None)

    # -- device calls -------------------------------------------------------------------------

    def check_in(self, device_id: str, now: float, *, rng: np.random.Generator
                 ) -> CheckInDecision:
        """A device's check-in: a task while collection is open, else a ComeBack."""
        return self._devices.check_in(device_id, now, rng=rng)

    def upload(self, device_id: str, round: int, base_version: int, upload_key: str,
               key_id: bytes, ciphertexts: Sequence[bytes], now: float) -> bool:
        """Fold one device's ciphertexts into the sum; returns False for a replay (the
        device is already in the sum: nothing changes).

        Raises:
            UpdateRejected: see the module docstring; the round is then unchanged.
        """
        cid = self._devices.authenticate(device_id, round, base_version, upload_key)
        if cid in self.included:
            self.replays += 1
            return False
        if self.phase != "collecting" or self._sum is None or now >= self.deadline:
            raise self._reject("late", "collection of this round's ciphertexts has closed",
                               device_id)
        if bytes(key_id) != self.setup.key_id:
            raise self._reject("wrong_key", f"the ciphertexts name key "
                               f"{bytes(key_id).hex()[:16] or '(none)'}; this round's public "
                               f"context is {self.setup.key_id.hex()[:16]}", device_id)
        try:
            self._sum.add(ciphertexts)
        except UpdateRejected as exc:
            raise self._reject(exc.reason, exc.detail, device_id) from None
        self.included.add(cid)
        self._devices.answered(device_id)
        return True

    def _reject(self, reason: str, detail: str, device_id: str) -> UpdateRejected:
        self._rejections[reason] += 1
        return UpdateRejected(reason, detail, client_id=device_id, round=self.round)

    # -- driving ------------------------------------------------------------------------------

    def tick(self, now: float) -> bool:
        """Close collection once ``target`` devices are in or at the deadline; returns
        whether the round changed (it is then done or aborted)."""
        if self.phase != "collecting":
            return False
        if len(self.included) < self.target and now < self.deadline:
            return False
        self._devices.close("collection closed")
        self.roster = tuple(sorted(self._devices.client_id(d) for d in self._devices.tasked))
        self.dropped_at["upload"] = len(self.roster) - len(self.included)
        if len(self.included) < self.min_accepted:
            self._abort(f"only {len(self.included)} encrypted updates arrived; the round "
                        f"needs {self.min_accepted} (nothing was decrypted)")
        else:
            self.phase = "done"
        return True

    def _abort(self, why: str) -> None:
        self.phase, self.error = "aborted", why
        self._sum = None  # the partial sum is dropped undecrypted

    def close(self, reason: str = "closed") -> SecAggStatus:
        """Stop the round; an unfinished one is aborted and nothing is decrypted."""
        self._devices.close(reason)
        if self.phase == "collecting":
            self._abort(f"the round was closed before it finished ({reason})")
        return self.status()
