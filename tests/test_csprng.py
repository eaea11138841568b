"""The deployment CSPRNG against independent oracles: its bytes are the AES-256-CTR keystream
computed here directly with ``cryptography`` (key ratchet included), and its distributions
pass statistical checks against the exact ones (scipy)."""

from __future__ import annotations

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from scipy import stats

from shoal.errors import PrivacyError
from shoal.privacy.csprng import CryptoRandom
from shoal.privacy.dp import secure_generator

KEY = bytes(range(32))


def aes_ctr(key: bytes, nbytes: int) -> bytes:
    enc = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    return enc.update(bytes(nbytes)) + enc.finalize()


def oracle_words(key: bytes, n: int) -> tuple[np.ndarray, bytes]:
    """One draw of n words: the stream's first 32 bytes are the next key, never output."""
    stream = aes_ctr(key, 32 + 8 * n)
    return np.frombuffer(stream[32:], dtype="<u8"), stream[:32]


def test_outputs_are_the_aes_ctr_keystream_and_the_key_ratchets():
    rng = CryptoRandom(KEY)
    words, key2 = oracle_words(KEY, 5)
    np.testing.assert_array_equal(rng.random(5), (words >> np.uint64(11)) * 2.0**-53)
    words2, _ = oracle_words(key2, 3)  # the second draw continues from the ratcheted key
    assert rng.bytes(24) == words2.tobytes()
    assert repr(rng) == "CryptoRandom()"  # the key never shows


def test_secure_generator_is_keyed_by_os_urandom(monkeypatch):
    import shoal.privacy.dp as dp

    asked = []
    monkeypatch.setattr(dp.os, "urandom", lambda n: asked.append(n) or KEY[:n])
    np.testing.assert_array_equal(secure_generator().random(4), CryptoRandom(KEY).random(4))
    assert asked == [32]
    monkeypatch.undo()
    a, b = secure_generator().random(4), secure_generator().random(4)
    assert not np.array_equal(a, b)


def test_standard_normal_matches_the_gaussian():
    z = CryptoRandom(KEY).standard_normal(400_001)
    assert z.shape == (400_001,) and z.dtype == np.float64
    n = z.size
    assert abs(z.mean()) < 5 / np.sqrt(n)
    assert abs(z.var() - 1) < 5 * np.sqrt(2 / n)
    assert stats.kstest(z, "norm").pvalue > 1e-4
    tail = np.mean(np.abs(z) > 3)  # P = 0.0026998
    assert abs(tail - 0.0026998) < 5 * np.sqrt(0.0027 / n)
    assert CryptoRandom(KEY).standard_normal(3, dtype=np.float32).dtype == np.float32
    x = CryptoRandom(KEY).normal(2.0, 3.0, 200_000)
    assert abs(x.mean() - 2.0) < 5 * 3 / np.sqrt(x.size) and abs(x.std() - 3) < 0.05


@pytest.mark.parametrize("low, high", [(0, 6), (-3, 7), (0, 2**40 + 3)])
def test_integers_are_uniform_and_in_range(low, high):
    x = CryptoRandom(KEY).integers(low, high, size=120_000)
    assert x.dtype == np.int64 and x.min() >= low and x.max() < high
    if high - low <= 10:
        counts = np.bincount(x - low, minlength=high - low)
        assert stats.chisquare(counts).pvalue > 1e-4
    else:  # top bits uniform: the range's upper half holds about half the draws
        assert abs(np.mean(x >= low + (high - low) // 2) - 0.5) < 0.01


def test_choice_without_replacement_is_distinct_and_uniform():
    rng = CryptoRandom(KEY)
    hits = np.zeros(50, dtype=np.int64)
    for _ in range(2_000):
        picked = rng.choice(50, size=7, replace=False)
        assert len(set(picked.tolist())) == 7 and picked.min() >= 0 and picked.max() < 50
        hits[picked] += 1
    assert stats.chisquare(hits).pvalue > 1e-4
    big = rng.choice(1_000, size=900, replace=False)  # the permutation path
    assert len(set(big.tolist())) == 900
    assert rng.choice(10, size=10, replace=False).tolist() != list(range(10))  # not sorted
    with pytest.raises(PrivacyError):
        rng.choice(5, size=6, replace=False)
    with pytest.raises(PrivacyError):
        rng.choice(5, size=2, p=[0.2] * 5)


def test_bad_keys_and_ranges_are_refused():
    with pytest.raises(PrivacyError):
        CryptoRandom(b"short")
    with pytest.raises(PrivacyError):
        CryptoRandom(KEY).integers(3, 3)
    with pytest.raises(PrivacyError):
        CryptoRandom(KEY).normal(0.0, -1.0)
