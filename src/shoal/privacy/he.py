"""Homomorphic aggregation with CKKS: the aggregator adds ciphertexts and never holds a key.

The CKKS scheme (J. H. Cheon, A. Kim, M. Kim, Y. Song, "Homomorphic Encryption for
Arithmetic of Approximate Numbers", ASIACRYPT 2017) through TenSEAL (A. Benaissa et al.,
"TenSEAL: A Library for Encrypted Tensor Operations Using Homomorphic Encryption", 2021,
over Microsoft SEAL). The only module in shoal that imports ``tenseal``.

Three parties:

* a :class:`KeyHolder` (a designated key service, or a silo the others trust for this) makes
  the keys, hands out the *public* context, and decrypts one sum per round -- only a sum of at
  least ``min_clients`` contributions, and never a second ciphertext for the same round, so the
  aggregator cannot use it to open one client's upload;
* each client :func:`encrypt_update` s ``w·clip(x)`` and its weight ``w`` under the public
  context (the weight rides in the slot after the last coordinate);
* the aggregator folds ciphertexts into a :class:`CkksSum` as they arrive (memory: one
  ciphertext set, whatever the cohort) and sends the sum to the key holder.

Addition needs no rescaling, so one data prime suffices: the default is N = 4096 with
coefficient primes of 60 and 49 bits (109 bits in all) and scale 2^40, which the Homomorphic
Encryption Standard (M. Albrecht et al., 2018) rates at 128-bit classical security; N = 8192
with the same primes stays far below that table's 118-bit bound for 256-bit security. A sum's
magnitude must stay below 2^18 (60 - 40 - 2 bits of headroom): :class:`CkksSum` refuses a
contribution that could push it over (``clip`` and ``max_weight`` bound every one). Each
coordinate of a decrypted sum carries an error of about 1e-8 per contribution at scale 2^40.

Threshold decryption (no single key holder) is not implemented: TenSEAL has no threshold
CKKS; the trust placed in the key holder is stated, not engineered away.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from shoal.errors import PrivacyError, UpdateRejected

__all__ = ["CkksParams", "KeyHolder", "CkksSum", "encrypt_update", "public_context"]

# Largest total coefficient-modulus bits (log2 q) per ring degree for a security level, from
# the Homomorphic Encryption Standard's table for ternary secrets (classical attacks).
_MAX_LOGQ = {4096: {128: 109, 192: 75, 256: 58}, 8192: {128: 218, 192: 152, 256: 118}}


def _tenseal() -> Any:
    try:
        import tenseal
    except ImportError as exc:  # pragma: no cover - the he extra installs it
        raise PrivacyError("homomorphic aggregation needs TenSEAL: pip install "
                           "'shoal[he]'") from exc
    return tenseal


@dataclass(frozen=True)
class CkksParams:
    """CKKS parameters for addition-only aggregation.

    Attributes:
        poly_modulus_degree: N, 4096 or 8192 (N/2 values per ciphertext).
        coeff_mod_bit_sizes: the primes' bit sizes; the first is the data prime.
        scale_bits: log2 of the encoding scale.
    """

    poly_modulus_degree: int = 4096
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 49)
    scale_bits: int = 40

    def __post_init__(self) -> None:
        if self.poly_modulus_degree not in _MAX_LOGQ:
            raise PrivacyError(f"poly_modulus_degree must be 4096 or 8192, got "
                               f"{self.poly_modulus_degree}")
        if self.security_bits < 128:
            raise PrivacyError(f"{sum(self.coeff_mod_bit_sizes)} modulus bits at N = "
                               f"{self.poly_modulus_degree} is below 128-bit security")
        if not 20 <= self.scale_bits <= self.coeff_mod_bit_sizes[0] - 12:
            raise PrivacyError("scale_bits must leave at least 12 bits of headroom under the "
                               "data prime")

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree // 2

    @property
    def security_bits(self) -> int:
        """The Homomorphic Encryption Standard's classical security level for these
        parameters (0 if below 128)."""
        logq = sum(self.coeff_mod_bit_sizes)
        levels = [lvl for lvl, bound in _MAX_LOGQ[self.poly_modulus_degree].items()
                  if logq <= bound]
        return max(levels, default=0)

    @property
    def ciphertext_bytes(self) -> int:
        """An upper bound on one serialized fresh ciphertext: two polynomials of N 64-bit
        coefficients per data prime (the last prime is the special one), plus SEAL's
        header (a fresh ciphertext at N = 4096 serializes to 65,676 bytes)."""
        return 2 * self.poly_modulus_degree * 8 * (len(self.coeff_mod_bit_sizes) - 1) + 4096

    @property
    def capacity(self) -> float:
        """The largest magnitude a sum's coordinate may reach and still decrypt."""
        return 2.0 ** (self.coeff_mod_bit_sizes[0] - self.scale_bits - 2)


class KeyHolder:
    """Holds the CKKS secret key; decrypts only sums, one per round.

    Args:
        params: the CKKS parameters.
        min_clients: a sum of fewer contributions is not decrypted.
    """

    def __init__(self, params: CkksParams = CkksParams(), *, min_clients: int = 2) -> None:
        if min_clients < 2:
            raise PrivacyError("min_clients must be >= 2: a sum of one is one client's update")
        ts = _tenseal()
        self.params = params
        self.min_clients = int(min_clients)
        self._ctx = ts.context(ts.SCHEME_TYPE.CKKS,
                               poly_modulus_degree=params.poly_modulus_degree,
                               coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes))
        self._ctx.global_scale = 2.0**params.scale_bits
        self._decrypted: set[Hashable] = set()

    def __repr__(self) -> str:
        return f"KeyHolder({self.params}, min_clients={self.min_clients})"

    def public_context(self) -> bytes:
        """The context clients and the aggregator use: encryption and addition, no secret."""
        return bytes(self._ctx.serialize(save_secret_key=False))

    def decrypt_sum(self, ciphertexts: Sequence[bytes], dim: int, contributions: int,
                    round: Hashable) -> tuple[np.ndarray, float]:
        """Decrypt a round's sum: ``(sum of w·x as float64 (dim,), total weight)``;
        ``round`` names the round (e.g. ``(round, task id)`` when rounds can be retried).

        Raises:
            PrivacyError: fewer than ``min_clients`` contributions, a second decryption for
                ``round``, or ciphertexts that do not make a ``dim``-value sum.
        """
        if contributions < self.min_clients:
            raise PrivacyError(f"the key holder decrypts only sums of at least "
                               f"{self.min_clients} contributions, got {contributions}")
        if round in self._decrypted:
            raise PrivacyError(f"round {round}'s sum was already decrypted")
        ts = _tenseal()
        want = -(-(dim + 1) // self.params.slots)
        if len(ciphertexts) != want:
            raise PrivacyError(f"a {dim}-value sum is {want} ciphertexts, got "
                               f"{len(ciphertexts)}")
        self._decrypted.add(round)
        try:
            values = np.concatenate([np.asarray(ts.ckks_vector_from(self._ctx, c).decrypt())
                                     for c in ciphertexts])
        except Exception as exc:  # TenSEAL raises bare C++ errors on malformed input
            raise PrivacyError(f"the sum does not decrypt: {exc}") from exc
        return values[:dim].astype(np.float64), float(values[dim])


def public_context(serialized: bytes) -> Any:
    """Load a public context; refuses one that carries a secret key.

    Raises:
        PrivacyError: malformed, or private.
    """
    ts = _tenseal()
    try:
        ctx = ts.context_from(serialized)
    except Exception as exc:
        raise PrivacyError(f"not a CKKS context: {exc}") from exc
    if ctx.has_secret_key():
        raise PrivacyError("this context holds the secret key: only the key holder may")
    return ctx


def encrypt_update(ctx: Any, delta: np.ndarray, weight: float, *, clip: float,
                   slots: int) -> list[bytes]:
    """A client's contribution: ``weight·clip(delta)`` and ``weight`` (the slot after the
    last coordinate), encrypted under the public ``ctx`` in ``slots``-value ciphertexts."""
    ts = _tenseal()
    x = np.clip(np.asarray(delta, dtype=np.float64), -clip, clip) * float(weight)
    flat = np.append(x, float(weight))
    return [bytes(ts.ckks_vector(ctx, flat[i:i + slots].tolist()).serialize())
            for i in range(0, flat.size, slots)]


class CkksSum:
    """The aggregator's running sum of encrypted contributions (it holds no key).

    Args:
        ctx: the public context.
        params: the CKKS parameters (for slots and capacity).
        dim: the model length.
        clip, max_weight: every contribution's bound (clients clip and cap), so that the sum
            stays decryptable: ``count · max_weight · clip`` must stay under the capacity.
    """

    def __init__(self, ctx: Any, params: CkksParams, dim: int, *, clip: float,
                 max_weight: float) -> None:
        if not (clip > 0 and max_weight >= 1 and dim >= 1):
            raise PrivacyError("need clip > 0, max_weight >= 1 and dim >= 1")
        self.ctx, self.params, self.dim = ctx, params, dim
        self.bound = float(clip) * float(max_weight)
        self.count = 0
        self.bytes_in = 0
        self._sum: list[Any] | None = None

    @property
    def ciphertexts(self) -> int:
        return -(-(self.dim + 1) // self.params.slots)

    def add(self, contribution: Sequence[bytes]) -> None:
        """Fold one client's ciphertexts in.

        Raises:
            UpdateRejected: ``wrong_shape`` (not this model's number of ciphertexts),
                ``malformed`` (a ciphertext does not parse under the context), or
                ``capacity`` (one more contribution could overflow the sum); nothing changes.
        """
        ts = _tenseal()
        if len(contribution) != self.ciphertexts:
            raise UpdateRejected("wrong_shape", f"expected {self.ciphertexts} ciphertexts, "
                                 f"got {len(contribution)}")
        if (self.count + 1) * self.bound >= self.params.capacity:
            raise UpdateRejected("capacity", f"{self.count + 1} contributions of up to "
                                 f"{self.bound:g} could exceed the sum's capacity "
                                 f"{self.params.capacity:g}")
        try:
            parsed = [ts.ckks_vector_from(self.ctx, c) for c in contribution]
            sizes = [p.size() for p in parsed]
            # every ciphertext's own scale (the wrapper's scale() is missing in TenSEAL 0.3)
            scales = {ct.scale for p in parsed for ct in p.data.ciphertext()}
        except Exception as exc:
            raise UpdateRejected("malformed", f"a ciphertext does not parse: {exc}") from exc
        full, last = self.params.slots, (self.dim + 1) - (len(parsed) - 1) * self.params.slots
        if sizes != [full] * (len(parsed) - 1) + [last]:
            raise UpdateRejected("wrong_shape", f"ciphertext sizes {sizes} do not make "
                                 f"{self.dim} + 1 values")
        # a ciphertext at another scale would add to garbage (or make every later one fail)
        if scales != {2.0 ** self.params.scale_bits}:
            raise UpdateRejected("malformed", f"ciphertexts must be at scale "
                                 f"2^{self.params.scale_bits}, got {sorted(scales)}")
        if self._sum is None:
            self._sum = parsed
        else:
            try:  # out of place: the sum changes only when every ciphertext added
                total = [acc + ct for acc, ct in zip(self._sum, parsed)]
            except Exception as exc:
                raise UpdateRejected("malformed", f"a ciphertext does not add to the "
                                     f"sum: {exc}") from exc
            self._sum = total
        self.count += 1
        self.bytes_in += sum(len(c) for c in contribution)

    def result(self) -> list[bytes]:
        """The sum's ciphertexts, for the key holder.

        Raises:
            PrivacyError: nothing was added.
        """
        if self._sum is None:
            raise PrivacyError("no contribution was added")
        return [bytes(ct.serialize()) for ct in self._sum]
