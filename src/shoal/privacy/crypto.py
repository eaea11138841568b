"""Cryptographic primitives for secure aggregation: the only module in shoal that imports
``cryptography``.

Primitives follow the choices of Bonawitz et al., "Practical Secure Aggregation for
Privacy-Preserving Machine Learning" (CCS 2017) and Google's FCP implementation, with X25519 in
place of NIST P-256 (faster, and every 32-byte string is a valid key, so there is no point
validation to get wrong):

* key agreement: X25519, the raw shared secret run through HKDF-SHA256 with a caller-supplied
  salt (the round's session nonce) and a domain-separating ``info`` string, giving 32-byte keys.
  Encryption keys and mask seeds come from different ``info`` strings, so one shared secret never
  serves two purposes;
* authenticated encryption of key shares: AES-256-GCM, a fresh random 12-byte nonce prepended,
  the 16-byte tag appended; the associated data binds who sent the share to whom in which round,
  so a tampered, re-addressed or replayed ciphertext fails to open (:class:`ProtocolError`);
* mask PRG: the AES-256-CTR keystream of a 32-byte seed (counter block starting at zero) written
  straight into a numpy buffer and viewed as unsigned integers. Never numpy's generators, whose
  state is small and predictable (Flower's SecAgg+ seeds ``RandomState`` with 32 bits).

Private keys travel as raw 32-byte strings because the masking private key is Shamir-shared.

Signatures (signed models and training plans, :mod:`shoal.lifecycle.signing`): Ed25519
(RFC 8032), ML-DSA-65 (FIPS 204, "Module-Lattice-Based Digital Signature Standard", 2024) and
a hybrid of both (both signatures must verify: it stays secure while either scheme does). With
a non-empty ``context`` the signed message is ``context || 0x00 || message`` for both schemes
(pure Ed25519 has no context string of its own) and ML-DSA also gets ``context`` as its FIPS 204
context string; with an empty one both are the standard schemes on ``message`` itself (so
published test vectors apply). shoal always signs with a non-empty context.

Post-quantum hybrid key agreement (optional, SecAgg+): ML-KEM-768 (FIPS 203, "Module-Lattice-
Based Key-Encapsulation Mechanism Standard", 2024) alongside X25519. A hybrid key is HKDF-SHA256
over the classical secret *and* the KEM's shared secret, so it stays secret as long as either
X25519 or ML-KEM holds (the concatenation combiner of hybrid key exchange).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import (Ed25519PrivateKey,
                                                               Ed25519PublicKey)
from cryptography.hazmat.primitives.asymmetric.mldsa import MLDSA65PrivateKey, MLDSA65PublicKey
from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PrivateKey, MLKEM768PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from shoal.errors import ProtocolError

__all__ = [
    "KEY_BYTES",
    "NONCE_BYTES",
    "TAG_BYTES",
    "KeyPair",
    "generate_keypair",
    "public_key_from_private",
    "agree",
    "agree_many",
    "derive_key",
    "encrypt",
    "decrypt",
    "random_bytes",
    "keystream_into",
    "prg_uint",
    "SIGNATURE_SCHEMES",
    "SigningKeyPair",
    "generate_signing_key",
    "signing_key_from_private",
    "sign",
    "verify_signature",
    "KEM_PUBLIC_BYTES",
    "KEM_CIPHERTEXT_BYTES",
    "KemKeyPair",
    "kem_keypair",
    "kem_encapsulate",
    "kem_decapsulate",
    "hybrid_key",
]

KEY_BYTES = 32
"""Length of every symmetric key, seed, X25519 private and public key."""
NONCE_BYTES = 12
"""AES-GCM nonce length (random, prepended to the ciphertext)."""
TAG_BYTES = 16
"""AES-GCM tag length (appended by the cipher)."""

K = TypeVar("K")
_CTR_IV = bytes(16)  # each seed keys exactly one stream, so a fixed initial counter is safe


@dataclass(frozen=True)
class KeyPair:
    """An X25519 key pair as raw bytes. ``private`` is hidden from ``repr``."""

    private: bytes = field(repr=False)
    public: bytes


def generate_keypair() -> KeyPair:
    """Return a fresh X25519 key pair drawn from the operating system's CSPRNG."""
    sk = X25519PrivateKey.generate()
    return KeyPair(private=sk.private_bytes_raw(), public=sk.public_key().public_bytes_raw())


def public_key_from_private(private: bytes) -> bytes:
    """Return the X25519 public key of a raw 32-byte private key.

    Raises:
        ProtocolError: ``private`` is not 32 bytes.
    """
    _check_len("private key", private, KEY_BYTES)
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()


def derive_key(secret: bytes, *, salt: bytes, info: bytes) -> bytes:
    """HKDF-SHA256 (RFC 5869) of ``secret`` with ``salt`` and ``info``, 32 bytes out."""
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=salt, info=info).derive(secret)


def agree(private: bytes, peer_public: bytes, *, salt: bytes, info: bytes) -> bytes:
    """X25519 key agreement followed by HKDF-SHA256; symmetric in the two parties.

    Args:
        private: our raw 32-byte private key.
        peer_public: the peer's raw 32-byte public key.
        salt: HKDF salt (the round's session nonce, so keys never repeat across rounds).
        info: HKDF info, domain-separating the purpose (and naming the pair) of the key.

    Returns:
        A 32-byte key.

    Raises:
        ProtocolError: a key has the wrong length, or the peer's key is a low-order point
            (the shared secret would be all zeros).
    """
    return agree_many(private, {0: peer_public}, salt=salt, info=lambda _: info)[0]


def agree_many(
    private: bytes,
    peer_publics: Mapping[K, bytes],
    *,
    salt: bytes,
    info: Callable[[K], bytes],
) -> dict[K, bytes]:
    """:func:`agree` with many peers, loading our private key once.

    Args:
        private: our raw 32-byte private key.
        peer_publics: peer label -> raw 32-byte public key.
        salt: HKDF salt.
        info: peer label -> HKDF info for that pair.

    Raises:
        ProtocolError: as :func:`agree`, naming the offending peer.
    """
    _check_len("private key", private, KEY_BYTES)
    sk = X25519PrivateKey.from_private_bytes(private)
    out: dict[K, bytes] = {}
    for peer, public in peer_publics.items():
        _check_len(f"public key of {peer!r}", public, KEY_BYTES)
        try:
            shared = sk.exchange(X25519PublicKey.from_public_bytes(public))
        except ValueError as exc:  # OpenSSL refuses an all-zero shared secret
            raise ProtocolError(
                f"X25519 key agreement with {peer!r} failed: {exc}", party=peer
            ) from exc
        out[peer] = derive_key(shared, salt=salt, info=info(peer))
    return out


def encrypt(key: bytes, plaintext: bytes, associated_data: bytes) -> bytes:
    """AES-256-GCM encryption: ``nonce (12 B) || ciphertext || tag (16 B)``.

    The nonce is random; a key may therefore seal many messages (fewer than 2^32).
    """
    _check_len("AEAD key", key, KEY_BYTES)
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, associated_data)


def decrypt(key: bytes, ciphertext: bytes, associated_data: bytes) -> bytes:
    """Open a ciphertext made by :func:`encrypt`.

    Raises:
        ProtocolError: the ciphertext is truncated, was tampered with, or was sealed under a
            different key or different associated data (replayed to another pair or round).
    """
    _check_len("AEAD key", key, KEY_BYTES)
    if len(ciphertext) < NONCE_BYTES + TAG_BYTES:
        raise ProtocolError(
            f"ciphertext of {len(ciphertext)} bytes is shorter than nonce + tag "
            f"({NONCE_BYTES + TAG_BYTES} bytes)"
        )
    nonce, body = ciphertext[:NONCE_BYTES], ciphertext[NONCE_BYTES:]
    try:
        return AESGCM(key).decrypt(nonce, body, associated_data)
    except InvalidTag as exc:
        raise ProtocolError(
            "ciphertext failed authentication (tampered, or replayed to another pair or round)"
        ) from exc


def random_bytes(n: int) -> bytes:
    """``n`` bytes from the operating system's CSPRNG (seeds, session nonces)."""
    return os.urandom(n)


def keystream_into(seed: bytes, out: np.ndarray) -> np.ndarray:
    """Overwrite ``out`` with the AES-256-CTR keystream of ``seed``; returns ``out``.

    The stream is the encryption of the counter blocks 0, 1, 2, ... (big-endian, 128-bit) under
    ``seed``, written straight into ``out`` without an intermediate ``bytes`` object, so
    expanding a mask for a million-entry vector costs one pass over the buffer. The same seed
    always gives the same stream; ``out``'s dtype decides how the bytes are grouped into
    integers (little-endian on every platform numpy supports here).

    Raises:
        ProtocolError: ``seed`` is not 32 bytes.
        ValueError: ``out`` is not C-contiguous or not writeable.
    """
    _check_len("PRG seed", seed, KEY_BYTES)
    if not (out.flags.c_contiguous and out.flags.writeable):
        raise ValueError("keystream_into needs a writeable C-contiguous output array")
    if out.nbytes == 0:
        return out
    # CTR keystream = encryption of zeros; reading a shared zero buffer is cheaper than
    # zeroing ``out`` and encrypting in place
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(_CTR_IV)).encryptor()
    encryptor.update_into(_zeros(out.nbytes), out.data.cast("B"))
    return out


_ZEROS = [b""]


def _zeros(nbytes: int) -> memoryview:
    # One immutable zero buffer, grown to the largest request (a vector's size).
    if len(_ZEROS[0]) < nbytes:
        _ZEROS[0] = bytes(nbytes)
    return memoryview(_ZEROS[0])[:nbytes]


def prg_uint(seed: bytes, length: int, bits: int) -> np.ndarray:
    """Pseudo-random vector uniform in ``[0, 2**bits)``, from the AES-256-CTR stream of ``seed``.

    Entries are uint32 when ``bits <= 32`` (4 keystream bytes each) and uint64 otherwise; the
    reduction mod ``2**bits`` keeps the low bits, which is exact and uniform because the ring
    is a power of two.

    Raises:
        ProtocolError: ``seed`` is not 32 bytes, ``bits`` is outside [1, 64] or ``length`` is
            negative.
    """
    if not 1 <= bits <= 64:
        raise ProtocolError(f"bits must be in [1, 64], got {bits}")
    if length < 0:
        raise ProtocolError(f"length must be >= 0, got {length}")
    dtype = np.uint32 if bits <= 32 else np.uint64
    out = keystream_into(seed, np.empty(length, dtype=dtype))
    if bits < 8 * out.itemsize:
        np.bitwise_and(out, dtype((1 << bits) - 1), out=out)
    return out


def _check_len(what: str, value: bytes, expected: int) -> None:
    if len(value) != expected:
        raise ProtocolError(f"{what} must be {expected} bytes, got {len(value)}")


# --------------------------------------------------------------------------- signatures

#: scheme -> (private key bytes, public key bytes, signature bytes)
SIGNATURE_SCHEMES = {
    "ed25519": (32, 32, 64),
    "ml-dsa-65": (32, 1952, 3309),  # the private key is FIPS 204's 32-byte seed
    "hybrid": (64, 32 + 1952, 64 + 3309),  # Ed25519 first, then ML-DSA-65
}


@dataclass(frozen=True)
class SigningKeyPair:
    """A signing key pair of one scheme as raw bytes. ``private`` is hidden from ``repr``."""

    scheme: str
    private: bytes = field(repr=False)
    public: bytes


def _scheme(scheme: str) -> tuple[int, int, int]:
    try:
        return SIGNATURE_SCHEMES[scheme]
    except (KeyError, TypeError):
        raise ProtocolError(f"unknown signature scheme {scheme!r}; known: "
                            f"{sorted(SIGNATURE_SCHEMES)}") from None


def generate_signing_key(scheme: str) -> SigningKeyPair:
    """A fresh key pair of ``scheme`` from the operating system's CSPRNG.

    Raises:
        ProtocolError: unknown scheme.
    """
    _scheme(scheme)
    if scheme == "ed25519":
        private = Ed25519PrivateKey.generate().private_bytes_raw()
    elif scheme == "ml-dsa-65":
        private = os.urandom(32)
    else:
        private = Ed25519PrivateKey.generate().private_bytes_raw() + os.urandom(32)
    return signing_key_from_private(scheme, private)


def signing_key_from_private(scheme: str, private: bytes) -> SigningKeyPair:
    """The key pair of a raw private key (an Ed25519 key, an ML-DSA-65 seed, or both
    concatenated for ``hybrid``).

    Raises:
        ProtocolError: unknown scheme, or ``private`` has the wrong length.
    """
    sk_len, _, _ = _scheme(scheme)
    _check_len(f"{scheme} private key", private, sk_len)
    if scheme == "ed25519":
        public = Ed25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()
    elif scheme == "ml-dsa-65":
        public = MLDSA65PrivateKey.from_seed_bytes(private).public_key().public_bytes_raw()
    else:
        public = (signing_key_from_private("ed25519", private[:32]).public
                  + signing_key_from_private("ml-dsa-65", private[32:]).public)
    return SigningKeyPair(scheme, private, public)


def sign(scheme: str, private: bytes, message: bytes, context: bytes) -> bytes:
    """Sign ``message`` under ``context`` (a domain separator, at most 255 bytes).

    ML-DSA-65 signing is hedged (fresh randomness per signature, FIPS 204's default), so
    two signatures of one message differ; both verify.

    Raises:
        ProtocolError: unknown scheme, a private key of the wrong length, or a context
            longer than 255 bytes.
    """
    sk_len, _, _ = _scheme(scheme)
    _check_len(f"{scheme} private key", private, sk_len)
    if len(context) > 255:
        raise ProtocolError(f"a signature context is at most 255 bytes, got {len(context)}")
    signed = _framed(message, context)
    if scheme == "ed25519":
        return Ed25519PrivateKey.from_private_bytes(private).sign(signed)
    if scheme == "ml-dsa-65":
        return MLDSA65PrivateKey.from_seed_bytes(private).sign(signed, context)
    return (sign("ed25519", private[:32], message, context)
            + sign("ml-dsa-65", private[32:], message, context))


def _framed(message: bytes, context: bytes) -> bytes:
    return context + b"\0" + message if context else message


def verify_signature(scheme: str, public: bytes, message: bytes, signature: bytes,
                     context: bytes) -> bool:
    """True when ``signature`` is ``scheme``'s valid signature of ``message`` under
    ``context`` by the holder of ``public``; false for any other signature, including one of
    the wrong length. A ``hybrid`` signature is valid only if both halves are.

    Raises:
        ProtocolError: unknown scheme, or ``public`` has the wrong length.
    """
    _, pk_len, sig_len = _scheme(scheme)
    _check_len(f"{scheme} public key", public, pk_len)
    if len(signature) != sig_len or len(context) > 255:
        return False
    signed = _framed(message, context)
    try:
        if scheme == "ed25519":
            Ed25519PublicKey.from_public_bytes(public).verify(signature, signed)
        elif scheme == "ml-dsa-65":
            MLDSA65PublicKey.from_public_bytes(public).verify(signature, signed, context)
        else:
            return (verify_signature("ed25519", public[:32], message, signature[:64], context)
                    and verify_signature("ml-dsa-65", public[32:], message, signature[64:],
                                         context))
    except InvalidSignature:
        return False
    except ValueError:  # a public key the library cannot decode
        raise ProtocolError(f"{scheme} public key is malformed") from None
    return True


# --------------------------------------------------------------------------- ML-KEM (hybrid)

KEM_PUBLIC_BYTES = 1184
"""ML-KEM-768 encapsulation key length."""
KEM_CIPHERTEXT_BYTES = 1088
"""ML-KEM-768 ciphertext length."""
_KEM_SEED_BYTES = 64


@dataclass(frozen=True)
class KemKeyPair:
    """An ML-KEM-768 key pair: ``private`` is the 64-byte seed (hidden from ``repr``)."""

    private: bytes = field(repr=False)
    public: bytes


def kem_keypair() -> KemKeyPair:
    """A fresh ML-KEM-768 key pair from the operating system's CSPRNG."""
    seed = os.urandom(_KEM_SEED_BYTES)
    sk = MLKEM768PrivateKey.from_seed_bytes(seed)
    return KemKeyPair(private=seed, public=sk.public_key().public_bytes_raw())


def kem_encapsulate(public: bytes) -> tuple[bytes, bytes]:
    """Encapsulate to ``public``: ``(32-byte shared secret, ciphertext)``.

    Raises:
        ProtocolError: ``public`` is not a valid ML-KEM-768 encapsulation key.
    """
    _check_len("ML-KEM public key", public, KEM_PUBLIC_BYTES)
    try:
        shared, ciphertext = MLKEM768PublicKey.from_public_bytes(public).encapsulate()
    except ValueError as exc:
        raise ProtocolError(f"invalid ML-KEM-768 public key: {exc}") from exc
    return shared, ciphertext


def kem_decapsulate(private: bytes, ciphertext: bytes) -> bytes:
    """The shared secret of ``ciphertext`` under the key pair of seed ``private``.

    ML-KEM rejects implicitly: a tampered ciphertext yields an unrelated secret, not an error,
    so tampering shows up as a failed authentication of what the key protects.

    Raises:
        ProtocolError: a seed or ciphertext of the wrong length.
    """
    _check_len("ML-KEM private seed", private, _KEM_SEED_BYTES)
    _check_len("ML-KEM ciphertext", ciphertext, KEM_CIPHERTEXT_BYTES)
    return MLKEM768PrivateKey.from_seed_bytes(private).decapsulate(ciphertext)


def hybrid_key(classical: bytes, post_quantum: bytes, *, salt: bytes, info: bytes) -> bytes:
    """HKDF-SHA256 over ``classical || post_quantum``: secret while either input is."""
    _check_len("classical secret", classical, KEY_BYTES)
    _check_len("post-quantum secret", post_quantum, KEY_BYTES)
    return derive_key(classical + post_quantum, salt=salt, info=info)
