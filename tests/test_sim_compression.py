"""Compression inside simulated runs: bytes counted on the wire, updates really decoded."""

from __future__ import annotations

import numpy as np
import pytest

from shoal.codec import Chain
from shoal.config import load_config
from shoal.errors import ConfigError
from shoal.experiment import Experiment
from shoal.uplink import Downlink, Uplink, raw_wire_size

pytest.importorskip("zstandard")

SYNTH = {"data.dataset": "synthetic", "data.clients": 30, "model.name": "logreg",
         "sampling.per_round": 10, "rounds": 3, "client.batch_size": 10}


def _run(**overrides):
    return Experiment(load_config(None, {**SYNTH, **overrides})).run()


def test_uncompressed_runs_count_raw_float32_bytes():
    result = _run()
    dim = result.spec.size
    for rec in result.records[1:]:
        assert rec.bytes_up == rec.accepted * raw_wire_size(dim)
        assert rec.bytes_down == rec.sampled * raw_wire_size(dim)
    assert raw_wire_size(dim) >= 4 * dim


def test_q8_cuts_upload_bytes_about_fourfold_and_still_learns():
    plain = _run()
    q8 = _run(**{"compression.upload": "q8"})
    ratio = plain.records[-1].bytes_up / q8.records[-1].bytes_up
    assert 3.0 < ratio < 4.0  # 610 parameters: headers and per-block scales weigh more
    assert q8.summary()["final_accuracy"] > q8.summary()["initial_accuracy"]


def test_error_feedback_keeps_residuals_only_for_clients_that_trained():
    exp = Experiment(load_config(None, {**SYNTH, "compression.upload": "topk(0.05)+q8+zstd",
                                        "compression.error_feedback": True}))
    result = exp.run()
    trained = {int(c) for c in exp.pool.uplink.residuals}
    assert 10 <= len(trained) <= 30
    for r in exp.pool.uplink.residuals.values():
        assert r.shape == (result.spec.size,) and np.any(r != 0)


def test_delta_downloads_fall_back_to_full_models():
    d = Downlink(1000, "delta", Chain.parse("zstd"), max_staleness=1)
    params = np.random.default_rng(0).normal(size=1000).astype(np.float32)
    first = d.send(0, params, [1, 2])
    assert first[0] == first[1]  # unknown clients: full model
    small_step = params + np.float32(1e-3) * (np.arange(1000) % 3 == 0)
    second = d.send(1, small_step, [1, 3])
    assert second[0] < first[0] / 2  # client 1 synced v0: a sparse delta compresses well
    assert second[1] == pytest.approx(first[0], rel=0.05)  # client 3 never synced: full
    d.send(2, small_step + 1, [4])
    third = d.send(3, small_step + 2, [1])
    assert third[0] == pytest.approx(first[0], rel=0.05)  # 3 versions behind > staleness 1


def test_lossy_download_codec_and_bad_upload_chain_are_refused():
    with pytest.raises(ConfigError, match="lossless"):
        Downlink(10, "delta", Chain.parse("q8"))
    with pytest.raises(ConfigError, match="compression.upload"):
        load_config(None, {"compression.upload": "zstd+q8"})


def test_uplink_decodes_exactly_what_was_sent():
    up = Uplink(500, Chain.parse("fp16"))
    x = np.linspace(-1, 1, 500, dtype=np.float32)
    got, n = up.process(0, x, np.random.default_rng(0))
    np.testing.assert_allclose(got, x, rtol=2**-11)
    assert n < raw_wire_size(500) * 0.6
