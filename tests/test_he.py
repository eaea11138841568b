"""Homomorphic (CKKS) aggregation: the aggregator adds ciphertexts it cannot open, the key
holder decrypts only sums, and the result is the plain weighted sum within CKKS's error."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tenseal")

from shoal.errors import PrivacyError, UpdateRejected  # noqa: E402
from shoal.pipeline import Pipeline, PlainSum  # noqa: E402
from shoal.privacy.he import (CkksParams, CkksSum, KeyHolder, encrypt_update,  # noqa: E402
                              public_context)
from shoal.privacy.he_rounds import HEAggregation  # noqa: E402

DIM = 5000  # three ciphertexts of 2048 slots (the weight rides in the slot after the last)
PARAMS = CkksParams()


@pytest.fixture(scope="module")
def holder():
    return KeyHolder(PARAMS, min_clients=2)


@pytest.fixture(scope="module")
def ctx(holder):
    return public_context(holder.public_context())


def updates(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.uniform(-0.6, 0.6, (n, DIM)).astype(np.float32), rng.integers(1, 50, n)


def test_the_sum_decrypts_to_the_weighted_sum_of_clipped_updates(holder, ctx):
    x, w = updates(6)
    acc = CkksSum(ctx, PARAMS, DIM, clip=0.5, max_weight=64)
    for row, weight in zip(x, w):
        acc.add(encrypt_update(ctx, row, float(weight), clip=0.5, slots=PARAMS.slots))
    assert acc.count == 6 and acc.ciphertexts == 3
    total, weight = holder.decrypt_sum(acc.result(), DIM, acc.count, round=1)
    oracle = (w[:, None] * np.clip(x.astype(np.float64), -0.5, 0.5)).sum(0)
    np.testing.assert_allclose(total, oracle, atol=1e-5)  # ~1e-8 per contribution x weight
    assert weight == pytest.approx(w.sum(), abs=1e-5)
    assert np.abs(total - x.astype(np.float64).T @ w).max() > 1  # clipping really happened
    # bytes: about 8x float32 per slot (2 x N 8-byte coefficients carry N/2 values)
    per_ciphertext = acc.bytes_in / acc.count / acc.ciphertexts
    assert 7.9 < per_ciphertext / (4 * PARAMS.slots) < 8.2
    assert PARAMS.security_bits == 128
    assert CkksParams(poly_modulus_degree=8192).security_bits == 256


def test_the_aggregator_cannot_decrypt_and_the_key_holder_opens_only_sums(holder, ctx):
    assert not ctx.has_secret_key()
    one = encrypt_update(ctx, np.ones(DIM), 3.0, clip=1.0, slots=PARAMS.slots)
    with pytest.raises(PrivacyError, match="at least 2"):  # one client's upload, not a sum
        holder.decrypt_sum(one, DIM, 1, round=10)
    acc = CkksSum(ctx, PARAMS, DIM, clip=1.0, max_weight=64)
    acc.add(one)
    acc.add(one)
    holder.decrypt_sum(acc.result(), DIM, 2, round=11)
    with pytest.raises(PrivacyError, match="already decrypted"):  # no second ciphertext
        holder.decrypt_sum(one, DIM, 2, round=11)
    with pytest.raises(PrivacyError, match="ciphertexts"):
        holder.decrypt_sum(one[:2], DIM, 2, round=12)
    with pytest.raises(PrivacyError, match="secret key"):  # only the key holder may hold it
        public_context(holder._ctx.serialize(save_secret_key=True))


def test_bad_contributions_are_refused_and_change_nothing(ctx):
    acc = CkksSum(ctx, PARAMS, DIM, clip=1.0, max_weight=64)
    good = encrypt_update(ctx, np.ones(DIM), 1.0, clip=1.0, slots=PARAMS.slots)
    acc.add(good)
    for bad, reason in ((good[:2], "wrong_shape"), ([b"junk"] * 3, "malformed"),
                        (encrypt_update(ctx, np.ones(DIM + 3000), 1.0, clip=1.0,
                                        slots=PARAMS.slots), "wrong_shape")):
        with pytest.raises(UpdateRejected) as info:
            acc.add(bad)
        assert info.value.reason == reason
    assert acc.count == 1
    tight = CkksSum(ctx, PARAMS, DIM, clip=1000.0, max_weight=100)  # 1e5 per contribution
    tight.add(good)
    with pytest.raises(UpdateRejected) as info:
        for _ in range(5):  # capacity 2^18 = 262,144: the third could overflow
            tight.add(good)
    assert info.value.reason == "capacity" and tight.count == 2


def test_ckks_plain_and_secagg_give_the_same_aggregate_for_the_same_uploads():
    from shoal.privacy.secagg_rounds import SecAggAggregation

    x, w = updates(8, seed=3)
    clip, max_weight = 0.5, 64
    rules = {"plain": PlainSum(),
             "ckks": HEAggregation(PARAMS, clip=clip, max_weight=max_weight),
             "secagg": SecAggAggregation(clip=clip, value_bits=20, max_weight=max_weight,
                                         neighbours=-1, threshold=0, dropout=0.0,
                                         corrupt_rate=0.05,
                                         rng_for_round=np.random.default_rng)}
    means = {}
    for name, rule in rules.items():
        run = Pipeline(sum_rule=rule).begin((), 1, DIM)
        rows = np.clip(x, -clip, clip) if name == "plain" else x  # the others clip themselves
        run.fold(rows, w.astype(np.float64))
        means[name], _, info = run.finish()
        assert info.count == 8
    np.testing.assert_allclose(means["ckks"], means["plain"], atol=1e-6)
    step = 2 * clip / (2**20 - 1)  # SecAgg+'s fixed-point quantization
    np.testing.assert_allclose(means["secagg"], means["plain"], atol=2 * step)


def test_a_simulated_run_with_ckks_ends_where_the_plain_run_does():
    from shoal.config import load_config
    from shoal.experiment import Experiment

    base = {"rounds": 2, "data.dataset": "synthetic", "data.clients": 12,
            "sampling.per_round": 4, "model.name": "logreg", "secure_aggregation.clip": 2.0,
            "secure_aggregation.max_weight": 10_000}  # neither bound binds here
    plain = Experiment(load_config(None, base)).run()
    he = Experiment(load_config(None, {**base, "secure_aggregation.enabled": True,
                                       "secure_aggregation.protocol": "ckks"})).run()
    np.testing.assert_allclose(he.state.params, plain.state.params, atol=1e-6)
    rec = he.records[-1]
    assert rec.privacy["he_security_bits"] == 128 and rec.privacy["he_upload_bytes"] > 0


def test_a_deployment_refuses_ckks_with_differential_privacy(tmp_path, capsys):
    """Devices clip per coordinate for CKKS, not to the L2 norm DP accounts for (deployed
    CKKS itself is tests/test_ckks_grpc.py)."""
    from shoal.cli import main

    work = tmp_path / "work"
    assert main(["serve", "--clients", "4", "--per-round", "2", "--rounds", "1",
                 "--set", "secure_aggregation.enabled=true",
                 "--set", "privacy.placement=\"central\"",
                 "--set", "secure_aggregation.protocol=\"ckks\"", "--dir", str(work),
                 "-q"]) == 2
    assert "secure_aggregation.protocol" in capsys.readouterr().err
    assert not (work / "secret").exists()
