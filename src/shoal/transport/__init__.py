"""How bytes reach devices and silos in a deployment (the gRPC carrier and its security).

Security primitives, pure and free of gRPC:

* :mod:`shoal.transport.auth` — device tokens (HMAC-SHA256, key rotation, revocation), a
  per-device token-bucket rate limiter and an idempotency-key replay guard; stdlib only.
* :mod:`shoal.transport.certs` — a local certificate authority, server and client certificates
  for TLS and mutual TLS, and checks for certificates users bring themselves.

The trust model is in ``docs/security.md``.
"""
