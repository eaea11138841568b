"""Who may call the aggregator: the checks every device call passes before it reaches a
round, sans-I/O.

:class:`CallGate` verifies the call's bearer token (signature, expiry, scope, the device it
names, revocation), with mutual TLS that the token's device is the one the client certificate
names, and the device's rate limit. It takes what the transport saw (the call's metadata,
the peer certificate, the clock) and returns the authenticated device id, or raises
:class:`CallRefused` carrying the status a transport should answer with; the gRPC handlers
(:mod:`shoal.transport.server`) turn that into an aborted call. See ``docs/security.md``.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable

from shoal.errors import ShoalError
from shoal.observers import CarrierObserver
from shoal.transport.auth import AuthError, Keyring
from shoal.transport.certs import client_identity
from shoal.transport.limits import RateLimiter
from shoal.transport.revocation import RevocationFile
from shoal.transport.tokens import VerifiedTokens

__all__ = ["CallGate", "CallRefused"]

log = logging.getLogger("shoal.aggregator")


class CallRefused(ShoalError):
    """A call that may not proceed.

    Attributes:
        status: ``"unauthenticated"``, ``"permission_denied"`` or ``"resource_exhausted"``
            (the gRPC status names, lower case).
        reason: machine-readable (an :data:`~shoal.transport.auth.AUTH_REASONS` value,
            ``"identity"`` or ``"rate_limited"``).
    """

    def __init__(self, status: str, reason: str, message: str) -> None:
        super().__init__(message)
        self.status, self.reason = status, reason


@functools.lru_cache(maxsize=1024)
def _certified_device(cert_pem: bytes) -> str | None:
    """The device id a peer's client certificate names (parsed once per certificate)."""
    return client_identity(cert_pem)


class CallGate:
    """The checks of one aggregator's calls.

    Args:
        keyring: the keys that verify device tokens.
        limiter: per-device token bucket over all calls.
        revocations: revoked tokens (re-read when the file changes), or ``None``.
        metrics: told about every refusal (``call_refused``).
        bind_to_certificates: mutual TLS: a token is valid only on a connection whose
            client certificate names its device.
    """

    def __init__(self, keyring: Keyring, limiter: RateLimiter, *,
                 revocations: RevocationFile | None = None,
                 metrics: CarrierObserver | None = None,
                 bind_to_certificates: bool = False) -> None:
        self.limiter, self.revocations = limiter, revocations
        # a device's token is authenticated once, not on each of its calls (revocation,
        # expiry, device and scope are still checked on every call)
        self.tokens = VerifiedTokens(keyring)
        self.metrics = metrics if metrics is not None else CarrierObserver()
        self.bind_to_certificates = bind_to_certificates
        # refusals are all counted, but logged at most 10 at once and then 1 a second per
        # reason: a flood of forged calls must not become a flood of log lines
        self._log_budget = RateLimiter(1.0, 10.0, max_keys=64)
        self._unlogged: dict[str, int] = {}

    @property
    def keyring(self) -> Keyring:
        """The keys that verify device tokens."""
        return self.tokens.keyring

    def _log(self, reason: str, device: str, now: float, **fields: str) -> None:
        """Log a refusal (``auth_refused``) within the log budget; the refusals of the same
        reason left out since the last line are counted in its ``suppressed`` field."""
        if not self._log_budget.allow(reason, now):
            self._unlogged[reason] = self._unlogged.get(reason, 0) + 1
            return
        suppressed = self._unlogged.pop(reason, 0)
        log.warning("call refused: %s", reason, extra={"fields": {
            "event": "auth_refused", "reason": reason, "device": device,
            "suppressed": suppressed, **fields}})

    def authenticate(self, metadata: Iterable[tuple[str, str]], now: float,
                     device_id: str | None = None, scope: str | None = None) -> str:
        """The device whose valid token the call carries: signature, expiry, revocation and,
        when given, the device the call claims to be and the scope. What a transport checks
        before it reads a call's first message (:class:`~shoal.transport.admission.Admission`);
        no rate limit is spent.

        Raises:
            CallRefused: ``"unauthenticated"`` with the token's reason; counted and logged.
        """
        token = None
        for key, value in metadata:
            if key == "authorization" and value.startswith("Bearer "):
                token = value[len("Bearer "):]
        try:
            revoked = self.revocations.current() if self.revocations is not None else None
            claims = self.tokens.verify(token, now=now, expected_device=device_id,
                                        required_scope=scope, revoked=revoked)
        except AuthError as exc:
            self.metrics.call_refused(exc.reason)
            self._log(exc.reason, device_id or "", now)
            raise CallRefused("unauthenticated", exc.reason, f"{exc.reason}: {exc}") from None
        return claims.sub

    def check(self, metadata: Iterable[tuple[str, str]], peer_certificate: bytes,
              device_id: str | None, scope: str, now: float) -> str:
        """The device a call comes from, if it may proceed: :meth:`authenticate`, then the
        mutual-TLS identity and the device's rate limit.

        Args:
            metadata: the call's ``(key, value)`` metadata (``authorization: Bearer ...``).
            peer_certificate: the client certificate's PEM (``b""`` without mutual TLS).
            device_id: the device the call's message claims to be (``None``: any).
            scope: what the call does (``"checkin"``, ``"upload"``).
            now: seconds since the epoch.

        Raises:
            CallRefused: with its status and reason; the refusal is counted and logged.
        """
        device = self.authenticate(metadata, now, device_id, scope)
        if self.bind_to_certificates:
            certified = _certified_device(peer_certificate)
            if certified != device:
                # a stolen token is useless without the private key of its owner's certificate
                self.metrics.call_refused("identity")
                shown = repr(certified) if certified else "no single valid device name"
                self._log("identity", device, now, certificate=shown)
                raise CallRefused("permission_denied", "identity",
                                  f"identity: the token is for {device!r} but the client "
                                  f"certificate names {shown}")
        if not self.limiter.allow(device, now):
            self.metrics.call_refused("rate_limited")
            raise CallRefused("resource_exhausted", "rate_limited",
                              f"rate limited: retry in "
                              f"{self.limiter.retry_after(device, now):.1f} s")
        return device
