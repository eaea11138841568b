"""How bytes reach devices and silos in a deployment (the gRPC carrier and its security).

Security primitives, pure and free of gRPC:

* :mod:`shoal.transport.auth` — the keys that sign device tokens (rotation, the secret file)
  and the errors of a refused credential; :mod:`shoal.transport.tokens` — device tokens
  (HMAC-SHA256), issued and verified; :mod:`shoal.transport.revocation` — revoked token ids
  and the live list an aggregator enforces; :mod:`shoal.transport.limits` — a per-device
  token-bucket rate limiter. All stdlib only.
* :mod:`shoal.transport.certs` — a local certificate authority, server and client certificates
  for TLS and mutual TLS, and checks for certificates users bring themselves.

The trust model is in ``docs/security.md``.
"""
