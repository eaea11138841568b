"""Model versions through tiers: devices cache models by version, so a version an edge (or
any aggregator) publishes names exactly one model, whatever its parent retries."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("grpc")

from shoal.errors import ProtocolError  # noqa: E402
from shoal.registry import SQLiteRegistry  # noqa: E402
from shoal.transport.auth import Keyring  # noqa: E402
from shoal.transport.server import AggregatorService, AggregatorSettings  # noqa: E402

DIM = 8


def test_a_published_version_names_one_model(tmp_path) -> None:
    service = AggregatorService(AggregatorSettings(keep_versions=1), Keyring.single(b"s" * 32),
                                DIM, "fp", lambda: SQLiteRegistry(tmp_path / "r.db"))
    one, two = np.ones(DIM, np.float32), np.full(DIM, 2.0, np.float32)
    service.publish(3, one)
    service.publish(3, one.copy())  # the same model again (a retried round): nothing changes
    with pytest.raises(ProtocolError, match="other parameters"):
        service.publish(3, two)
    assert np.array_equal(service.publisher.params(3), one)  # still the first model
    service.publish(4, two)
    service.publish(5, one)  # keeps one version besides the current: 3 is gone
    with pytest.raises(ProtocolError, match="no longer held"):
        service.publish(3, one)
    assert service.publisher.versions == (4, 5)
