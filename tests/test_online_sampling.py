"""Selection among the clients online at simulated time t: only online (and idle) clients,
uniformly, touching a number of clients proportional to the cohort, not to the population."""

from __future__ import annotations

import numpy as np
import pytest

from shoal.errors import ConfigError
from shoal.sampling import OnlineSampler, online_draw


class Windows:
    """Client c is online iff ``online[c]`` (whatever the time); counts what it is asked."""

    def __init__(self, online: np.ndarray) -> None:
        self.online_mask = online
        self.asked = 0

    def online(self, client_ids: np.ndarray, t: float) -> np.ndarray:
        self.asked += len(client_ids)
        return self.online_mask[np.asarray(client_ids)]


def test_only_online_idle_clients_sorted_and_distinct():
    rng = np.random.default_rng(0)
    n = 5000
    av = Windows(rng.random(n) < 0.3)
    busy = set(np.flatnonzero(av.online_mask)[:200].tolist())
    s = OnlineSampler(av, 100, lambda: 0.0)
    for i in range(20):
        got = s.idle(n, 100, np.random.default_rng(i), busy)
        assert len(got) == 100 and (np.diff(got) > 0).all()
        assert av.online_mask[got].all() and not busy & set(got.tolist())
        assert len(s.sample(n, np.random.default_rng(i))) == 100


def test_the_draw_is_uniform_among_the_online():
    """Each online client's inclusion frequency is count / online (chi-square over 4,000
    draws: the 99.9 % quantile with 59 degrees of freedom is about 99)."""
    n = 200
    online = np.zeros(n, bool)
    online[::3] = True  # 67 online
    av = Windows(online)
    hits = np.zeros(n)
    draws, k = 4000, 10
    for i in range(draws):
        hits[online_draw(n, k, np.random.default_rng(i), av, 0.0)] += 1
    assert hits[~online].sum() == 0
    expected = draws * k / online.sum()
    chi2 = ((hits[online] - expected) ** 2 / expected).sum()
    assert chi2 < 110, chi2


def test_cost_grows_with_the_cohort_not_the_population():
    rng = np.random.default_rng(1)
    n = 2_000_000
    av = Windows(rng.random(n) < 0.3)
    got = online_draw(n, 1300, np.random.default_rng(2), av, 0.0)
    assert len(got) == 1300
    assert av.asked < 10 * 1300 / 0.3  # a few times count / online fraction, never n


def test_few_online_falls_back_to_a_scan_and_stays_uniform():
    n = 10_000
    online = np.zeros(n, bool)
    online[[3, 500, 7777, 9000, 9999]] = True
    av = Windows(online)
    assert online_draw(n, 20, np.random.default_rng(0), av, 0.0).tolist() == \
        [3, 500, 7777, 9000, 9999]
    seen = np.zeros(n)
    for i in range(2000):
        seen[online_draw(n, 2, np.random.default_rng(i), av, 0.0)] += 1
    assert seen[~online].sum() == 0
    assert np.abs(seen[online] / 2000 - 2 / 5).max() < 0.05
    assert online_draw(n, 3, np.random.default_rng(0), Windows(np.zeros(n, bool)),
                       0.0).size == 0


def test_bad_cohort_size_is_refused():
    with pytest.raises(ConfigError, match="per_round"):
        OnlineSampler(Windows(np.ones(3, bool)), 0, lambda: 0.0)
