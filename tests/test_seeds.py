"""shoal.seeds: every stream is a function of (run seed, path) alone."""

from __future__ import annotations

import numpy as np
import pytest

from shoal import seeds
from shoal.errors import ConfigError


def draw(*key) -> np.ndarray:
    return seeds.generator(*key).integers(0, 2**32, size=4)


def test_a_stream_depends_on_its_path_only():
    first = draw(7, "train", 3, 12)
    draw(7, "sample", 3)  # drawing another stream in between changes nothing
    np.testing.assert_array_equal(draw(7, "train", 3, 12), first)
    for other in [(8, "train", 3, 12), (7, "sample", 3, 12), (7, "train", 4, 12),
                  (7, "train", 3, 13), (7, "train", 3)]:
        assert not np.array_equal(draw(*other), first), other
    assert seeds.torch_seed(7, "init") == seeds.torch_seed(7, "init") < 2**63


@pytest.mark.parametrize(("key", "message", "config_key"), [
    ((-1, "train", 1), "run seed must be >= 0, got -1", "seed"),
    ((0, "train", -3), "seed path entry 1 must be >= 0, got -3", None),
])
def test_negative_entries_are_config_errors_naming_the_entry(key, message, config_key):
    with pytest.raises(ConfigError, match=message) as info:
        seeds.generator(*key)
    assert info.value.key == config_key
