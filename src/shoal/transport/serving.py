"""What the aggregator serves devices for inference: task-free, separate from training.

:class:`ModelServing` answers ``GetModel`` and ``GetPlan`` without gRPC. The version a device
is served is the model store's production -- or, while a canary runs
(:class:`~shoal.lifecycle.canary.Canary`), the candidate for a device inside the canary:
:meth:`ModelServing.version_for` asks :meth:`Canary.serves
<shoal.lifecycle.canary.Canary.serves>` with the device's *authenticated* id (the caller
passes what the token or the client certificate names, never a field of the request). A
device that already holds its version is told "not modified"; otherwise it gets the full
model or the exact delta against the served version it holds (the training downloads' rule,
:class:`~shoal.transport.downloads.ModelPublisher`), with the operator's signature.

Serving never signs. The operator's signatures are made where the key is -- at commit time
by the aggregator that commits, by the canary launcher before it serves, or by hand with
``shoal models sign VERSION --keys DIR`` (:mod:`shoal.lifecycle.store_signing`) -- and kept
beside each version in the store; :class:`ModelServing` is given only the public key and
serves a version's stored signature by that key. A version without one (committed unsigned,
or signed with a key since replaced) is not served: ``GetModel`` / ``GetPlan`` answer
``NOT_FOUND`` naming the command that signs it. Without a key, models and plans are served
unsigned (and devices that trust a key refuse them).

Every device a version's bytes were sent to is recorded (:meth:`ModelServing.reached`), so
an operator -- and the canary's audit log -- can tell who ever held a candidate.

Thread-safe (the gRPC handlers and the aggregator's thread share it).
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass

import numpy as np

from shoal.codec import Chain
from shoal.lifecycle.canary import Canary
from shoal.lifecycle.signing import SignatureRejected, SignedArtifact, TrustedKey, plan_bytes
from shoal.store import ModelStore
from shoal.transport.downloads import ModelPayload, ModelPublisher

__all__ = ["NotServing", "PlanPayload", "ModelServing"]


class NotServing(LookupError):
    """Nothing can be served to this device (no production version yet, the served version
    has no training plan, or it is not signed by the operator's current key); the gRPC
    handler answers ``NOT_FOUND`` with this message."""


@dataclass(frozen=True)
class PlanPayload:
    """A served version's training plan as it goes on the wire (canonical JSON)."""

    version: int
    plan: bytes
    signed: SignedArtifact | None


class ModelServing:
    """Production (or a canary's arms) for devices (see the module docstring).

    Args:
        store: the aggregator's model store (read for versions and their signatures).
        key: the operator's public key: the stored signatures by it are served, and a
            version without one is not; ``None`` to serve unsigned.
        codec: lossless chain of what is sent (``compression.download_codec``).
        deltas: send a device holding an older served version the exact delta when smaller.
    """

    def __init__(self, store: ModelStore, *, key: TrustedKey | None = None,
                 codec: Chain | None = None, deltas: bool = True) -> None:
        self.store, self.key = store, key
        self._codec, self._deltas = codec, deltas
        self._publisher = ModelPublisher(codec, 1, deltas=deltas)
        self._canary: Canary | None = None
        self._reached: dict[int, set[str]] = {}
        self._lock = threading.RLock()

    @property
    def canary(self) -> Canary | None:
        return self._canary

    @canary.setter
    def canary(self, canary: Canary | None) -> None:
        """Serve ``canary``'s arms from now on (``None``: production to everyone)."""
        with self._lock:
            self._canary = canary

    def version_for(self, device_id: str) -> int | None:
        """The store version ``device_id`` (its authenticated id) is served now, or
        ``None`` before there is a production version."""
        with self._lock:
            if self._canary is not None:
                return self._canary.serves(device_id)
            prod = self.store.production()
            return None if prod is None else prod.id

    def reached(self, version: int) -> frozenset[str]:
        """Every device the bytes of ``version`` were sent to by this server."""
        with self._lock:
            return frozenset(self._reached.get(version, ()))

    def params(self, version: int) -> np.ndarray:
        """The model of store ``version`` (from the store, checked against its digest)."""
        with self._lock:
            held = self._publisher.params(version)
            if held is not None:
                return held
            return np.asarray(self.store.load(version).state.params, np.float32)

    def model(self, device_id: str, have: int) -> tuple[int, ModelPayload | None]:
        """What ``GetModel`` answers ``device_id`` holding served version ``have``:
        ``(version, None)`` when it already holds it ("not modified"), else ``(version,
        payload)`` -- and the device is recorded as reached by ``version``.

        Raises:
            NotServing: there is no production version yet.
        """
        with self._lock:
            version = self._serves(device_id)
            if version == have:
                return version, None
            self._hold(version)
            payload = self._publisher.payload(version, have)
            self._reached.setdefault(version, set()).add(device_id)
            return version, payload

    def plan(self, device_id: str, have: int) -> tuple[int, PlanPayload | None]:
        """What ``GetPlan`` answers: the training plan of the version ``device_id`` is
        served, ``(version, None)`` when it holds that plan already.

        Raises:
            NotServing: no production version yet, or the version has no plan.
        """
        with self._lock:
            version = self._serves(device_id)
            if version == have:
                return version, None
            plan = self.store.get(version).plan
            if plan is None:
                raise NotServing(f"model version {version} was committed without a "
                                 f"training plan")
            return version, PlanPayload(version, plan_bytes(plan),
                                        self._signature(version, "plan"))

    # -- internals ---------------------------------------------------------------------------

    def _serves(self, device_id: str) -> int:
        version = self.version_for(device_id)
        if version is None:
            raise NotServing("no model is in production yet")
        return version

    def _hold(self, version: int) -> None:
        """Make ``version`` and the other versions served now (production, a canary's
        arms) downloadable, as full models and deltas between each other. Publishers take
        versions in increasing order, so a new set is published anew: that happens when
        the served versions change, not per device."""
        wanted = {version}
        prod = self.store.production()
        if prod is not None:
            wanted.add(prod.id)
        if self._canary is not None:
            wanted |= {self._canary.candidate, self._canary.production}
        if wanted <= set(self._publisher.versions):
            return
        publisher = ModelPublisher(self._codec, len(wanted) - 1, deltas=self._deltas)
        for v in sorted(wanted):
            publisher.publish(v, self.params(v), self._signature(v, "model"))
        self._publisher = publisher

    def _signature(self, version: int, kind: str) -> SignedArtifact | None:
        """The stored signature of ``version``'s ``kind`` by the operator's key (``None``
        without a key).

        Raises:
            NotServing: the version has none by this key (serving never signs).
        """
        if self.key is None:
            return None
        stored = self.store.get(version).signatures.get(kind)
        if stored is not None:
            try:
                signed = SignedArtifact.from_json(stored)
                if json.loads(signed.header).get("key_id") == self.key.id:
                    return signed
            except (SignatureRejected, ValueError):
                pass  # malformed or another key's: not served
        raise NotServing(f"model version {version}'s {kind} is not signed by the operator's "
                         f"key {self.key.id}: sign it where the key is (`shoal models "
                         f"--store STORE sign {version} --keys KEYDIR`)")
