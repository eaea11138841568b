"""Signed models and training plans: the operator signs, devices verify before installing.

What is signed is a small canonical header (:func:`~shoal.store.lineage.canonical_json`):
the artifact's kind (``"model"`` or ``"plan"``), the version series it belongs to
(``namespace``: ``"served:<store id>"`` for a model store's versions, ``"train:<run id>"`` for
a training run's), its version in that series, the SHA-256 and length of its bytes (a model's
float32 vector, a plan's canonical JSON), the scheme and the signer's key id. The header
travels with the signature, so a device checks, in order: the scheme is the one it trusts (no
downgrade from hybrid to Ed25519), the key id is its operator's, the signature is valid for
the header, the kind and the series are the ones it asked for, and the bytes it received hash
to the header's digest. Any failure is a :class:`SignatureRejected` naming the reason; the
device (:mod:`shoal.transport.device_models`) then keeps the model or plan it had.

A version number alone names nothing: training run 7's version 3 and a model store's version
3 are different models, so a signature binds both the series and the number, and a device
refuses a training model signed for the store, a store's model signed for another store it
has not been serving from, and a valid signature of another number.

Schemes: Ed25519, ML-DSA-65 (post-quantum, FIPS 204) and their hybrid; the primitives are in
:mod:`shoal.privacy.crypto`, the one module that wraps ``cryptography``.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shoal.errors import ProtocolError
from shoal.privacy import crypto
from shoal.store.lineage import canonical_json

__all__ = ["KINDS", "SERIES", "SignatureRejected", "SignedArtifact", "Signer", "TrustedKey",
           "artifact_namespace", "key_id", "model_bytes", "plan_bytes", "served_namespace",
           "training_namespace", "verify_artifact", "version_signatures"]

KINDS = ("model", "plan")
#: the version series a namespace names: a model store's served versions, a training run's
SERIES = ("served", "train")
_CONTEXT = b"shoal-artifact/1"
_NAMESPACE = re.compile(r"^(served|train):[A-Za-z0-9_-]{1,64}$")
_FIELDS = {"kind", "namespace", "version", "sha256", "size", "scheme", "key_id"}


def served_namespace(store_id: str) -> str:
    """The namespace of a model store's versions (``store_id``:
    :func:`~shoal.lifecycle.store_signing.store_id`)."""
    return _checked_namespace(f"served:{store_id}")


def training_namespace(run_id: str) -> str:
    """The namespace of one training run's versions (a random id per aggregator run)."""
    return _checked_namespace(f"train:{run_id}")


def _checked_namespace(namespace: str) -> str:
    if not isinstance(namespace, str) or not _NAMESPACE.match(namespace):
        raise ProtocolError(f"a namespace is 'served:<id>' or 'train:<id>' (id: 1-64 of "
                            f"A-Z a-z 0-9 _ -), got {namespace!r}")
    return namespace


class SignatureRejected(ProtocolError):
    """A device refused a model or plan; what it had is unchanged.

    Attributes:
        reason: ``unsigned``, ``scheme``, ``wrong_key``, ``bad_signature``, ``tampered``,
            ``wrong_kind``, ``wrong_namespace``, ``wrong_version``, ``downgrade`` or
            ``malformed``.
    """

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def key_id(public: bytes) -> str:
    """The first 16 hex digits of the public key's SHA-256: names a key in headers."""
    return hashlib.sha256(public).hexdigest()[:16]


def model_bytes(params: np.ndarray) -> bytes:
    """The bytes a model's signature covers: its flat float32 vector, little-endian."""
    return np.ascontiguousarray(params, dtype="<f4").tobytes()


def plan_bytes(plan: Mapping[str, Any]) -> bytes:
    """The bytes a training plan's signature covers: its canonical JSON."""
    return canonical_json(dict(plan))


@dataclass(frozen=True)
class SignedArtifact:
    """A signature over one model or plan, as it travels beside the artifact.

    Attributes:
        header: the canonical JSON of ``{kind, namespace, version, sha256, size, scheme,
            key_id}``.
        signature: the scheme's signature of ``header``.
    """

    header: bytes
    signature: bytes

    def fields(self) -> dict[str, Any]:
        """The header's fields.

        Raises:
            SignatureRejected: the header is not a well-formed header (``malformed``).
        """
        try:
            doc = json.loads(self.header)
            if not isinstance(doc, dict) or set(doc) != _FIELDS:
                raise ValueError("unexpected fields (signed before namespaces existed? "
                                 "sign the version again: shoal models sign)")
            if not isinstance(doc["namespace"], str) or not _NAMESPACE.match(
                    doc["namespace"]):
                raise ValueError(f"bad namespace {doc['namespace']!r}")
        except ValueError as exc:
            raise SignatureRejected(f"the signature header is malformed: {exc}",
                                    "malformed") from None
        return doc

    def to_json(self) -> dict[str, str]:
        """The JSON form kept beside a model-store version (the header is ASCII JSON)."""
        return {"header": self.header.decode("ascii"), "signature": self.signature.hex()}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> SignedArtifact:
        """Inverse of :meth:`to_json`.

        Raises:
            SignatureRejected: not that form (``malformed``).
        """
        try:
            return cls(str(doc["header"]).encode("ascii"), bytes.fromhex(doc["signature"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise SignatureRejected(f"a stored signature is malformed: {exc}",
                                    "malformed") from None


@dataclass(frozen=True)
class TrustedKey:
    """What a device trusts: one operator public key of one scheme."""

    scheme: str
    public: bytes

    @property
    def id(self) -> str:
        return key_id(self.public)


@dataclass(frozen=True)
class Signer:
    """The operator's side: signs models and plans with one private key.

    Args:
        key: a :class:`~shoal.privacy.crypto.SigningKeyPair` (see
            :func:`~shoal.privacy.crypto.generate_signing_key`).
    """

    key: crypto.SigningKeyPair = field(repr=False)

    @property
    def trusted(self) -> TrustedKey:
        """The public half, to provision on devices."""
        return TrustedKey(self.key.scheme, self.key.public)

    def sign(self, kind: str, version: int, payload: bytes, namespace: str
             ) -> SignedArtifact:
        """Sign ``payload`` (:func:`model_bytes` or :func:`plan_bytes`) as ``kind`` version
        ``version`` of the series ``namespace`` (:func:`served_namespace`,
        :func:`training_namespace`).

        Raises:
            ProtocolError: unknown kind, or a malformed namespace.
        """
        if kind not in KINDS:
            raise ProtocolError(f"kind must be one of {KINDS}, got {kind!r}")
        header = canonical_json({"kind": kind, "namespace": _checked_namespace(namespace),
                                 "version": int(version),
                                 "sha256": hashlib.sha256(payload).hexdigest(),
                                 "size": len(payload), "scheme": self.key.scheme,
                                 "key_id": key_id(self.key.public)})
        return SignedArtifact(header, crypto.sign(self.key.scheme, self.key.private, header,
                                                  _CONTEXT))

    def sign_model(self, params: np.ndarray, version: int, namespace: str
                   ) -> SignedArtifact:
        return self.sign("model", version, model_bytes(params), namespace)

    def sign_plan(self, plan: Mapping[str, Any], version: int, namespace: str
                  ) -> SignedArtifact:
        return self.sign("plan", version, plan_bytes(plan), namespace)


def version_signatures(signer: Signer, version: int, params: np.ndarray,
                       plan: Mapping[str, Any] | None, namespace: str
                       ) -> dict[str, dict[str, str]]:
    """The operator's signatures of one model-store version (``namespace``: the store's
    :func:`served_namespace`), in the form the store keeps beside it (:meth:`ModelStore.sign
    <shoal.store.models.ModelStore.sign>`): ``model``, and ``plan`` when the version has
    one."""
    out = {"model": signer.sign_model(params, version, namespace).to_json()}
    if plan is not None:
        out["plan"] = signer.sign_plan(plan, version, namespace).to_json()
    return out


def artifact_namespace(signed: SignedArtifact) -> str:
    """The namespace a signature's header names (read it after :func:`verify_artifact`).

    Raises:
        SignatureRejected: a malformed header."""
    return str(signed.fields()["namespace"])


def verify_artifact(trusted: TrustedKey, kind: str, payload: bytes,
                    signed: SignedArtifact | None, *, namespace: str) -> int:
    """The device's check before it installs a model or plan; returns the signed version.

    Args:
        trusted: the operator key the device was provisioned with.
        kind: what the device expects (``"model"`` or ``"plan"``).
        payload: the bytes it received (:func:`model_bytes` / :func:`plan_bytes`).
        signed: the signature that came with them, or ``None``.
        namespace: the series the device asked for: exactly this namespace (e.g. the
            store it has been served from), or, given only a series (``"served"`` /
            ``"train"``), any namespace of it.

    Raises:
        SignatureRejected: unsigned, another scheme, another key, an invalid signature,
            another kind of artifact, another series or namespace (``wrong_namespace``), or
            a payload that does not match the signed digest.
    """
    if signed is None or not signed.signature:
        raise SignatureRejected(f"refusing an unsigned {kind}", "unsigned")
    doc = signed.fields()
    if doc["scheme"] != trusted.scheme:
        raise SignatureRejected(f"the {kind} is signed with {doc['scheme']!r}; this device "
                                f"accepts only {trusted.scheme!r}", "scheme")
    if doc["key_id"] != trusted.id:
        raise SignatureRejected(f"the {kind} is signed by key {doc['key_id']}, not by this "
                                f"device's operator key {trusted.id}", "wrong_key")
    if not crypto.verify_signature(trusted.scheme, trusted.public, signed.header,
                                   signed.signature, _CONTEXT):
        raise SignatureRejected(f"the {kind}'s signature does not verify", "bad_signature")
    if doc["kind"] != kind:
        raise SignatureRejected(f"expected a signed {kind}, got a signed {doc['kind']}",
                                "wrong_kind")
    got = doc["namespace"]
    if (got != namespace) if ":" in namespace else (got.split(":", 1)[0] != namespace):
        raise SignatureRejected(f"the {kind} is signed as version {doc['version']} of "
                                f"{got!r}, not of {namespace!r}", "wrong_namespace")
    if doc["size"] != len(payload) or doc["sha256"] != hashlib.sha256(payload).hexdigest():
        raise SignatureRejected(f"the {kind}'s bytes do not match what was signed "
                                f"(version {doc['version']})", "tampered")
    return int(doc["version"])
