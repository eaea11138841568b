"""Tests of shoal.strategy: WeightedMean, ServerState, FedAvg, FedProx and the FedOpt family.

Oracles: sums worked out by hand in the test, numpy's own ``np.average``, and the update rules
of Reddi et al. (ICLR 2021, Algorithm 2) evaluated by hand for two rounds.
"""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import shoal.strategy
from shoal.errors import ConfigError, ShoalError, SpecError, UpdateRejected
from shoal.summation import EmptyAccumulator, WeightedMean
from shoal.strategy import (
    STRATEGIES,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedProx,
    FedYogi,
    ServerState,
    Strategy,
    make_strategy,
)

F32 = np.float32
FAST = settings(max_examples=40, deadline=None)


def vec(*values: float) -> np.ndarray:
    return np.array(values, dtype=F32)


def all_strategies() -> list[Strategy]:
    return [
        FedAvg(),
        FedProx(mu=0.01),
        FedAdagrad(server_lr=0.1),
        FedAdam(server_lr=0.1),
        FedYogi(server_lr=0.1),
    ]


# --------------------------------------------------------------------------------------------
# FedAvg / FedProx golden numbers
# --------------------------------------------------------------------------------------------

# Three clients, two parameters, weights 1, 2, 3 (e.g. example counts).
X0 = (1.0, -2.0)
DELTAS = ((1.0, 2.0), (3.0, -1.0), (-2.0, 4.0))
WEIGHTS = (1.0, 2.0, 3.0)
# Weighted sum by hand: 1*(1, 2) + 2*(3, -1) + 3*(-2, 4) = (1 + 6 - 6, 2 - 2 + 12) = (1, 12);
# total weight 6, so the mean delta is (1/6, 2).
MEAN_DELTA = (1.0 / 6.0, 2.0)


def fill(acc: WeightedMean, deltas=DELTAS, weights=WEIGHTS) -> WeightedMean:
    for delta, weight in zip(deltas, weights):
        acc.add(vec(*delta), weight)
    return acc


def test_weighted_mean_golden() -> None:
    acc = fill(WeightedMean(2))
    assert acc.count == 3
    assert acc.total_weight == 6.0
    mean = acc.mean()
    assert mean.dtype == F32
    np.testing.assert_allclose(mean, MEAN_DELTA, rtol=1e-7)
    np.testing.assert_allclose(acc.mean(np.float64), MEAN_DELTA, rtol=1e-15)


@pytest.mark.parametrize("server_lr", [1.0, 0.5])
def test_fedavg_golden(server_lr: float) -> None:
    strategy = FedAvg(server_lr=server_lr)
    state = strategy.init(vec(*X0))
    new = strategy.apply(state, fill(WeightedMean(state.params.size)).mean(np.float64))
    # server_lr 1: (1 + 1/6, -2 + 2) = (7/6, 0); server_lr 0.5: (1 + 1/12, -2 + 1) = (13/12, -1)
    expected = {1.0: (7.0 / 6.0, 0.0), 0.5: (13.0 / 12.0, -1.0)}[server_lr]
    assert new.params.dtype == F32
    np.testing.assert_allclose(new.params, expected, rtol=1e-7, atol=1e-7)
    assert new.version == 1
    assert dict(new.slots) == {}


def test_fedavg_with_unit_lr_is_weighted_mean_of_client_models() -> None:
    # McMahan et al.: w_{t+1} = sum_k n_k w_k / n with w_k the client models.
    strategy = FedAvg()
    state = strategy.init(vec(*X0))
    models = [np.add(X0, d) for d in DELTAS]  # (2, 0), (4, -3), (-1, 2)
    by_hand = (
        (1 * 2.0 + 2 * 4.0 + 3 * -1.0) / 6.0,  # 7/6
        (1 * 0.0 + 2 * -3.0 + 3 * 2.0) / 6.0,  # 0
    )
    np.testing.assert_allclose(np.average(models, axis=0, weights=WEIGHTS), by_hand)
    new = strategy.apply(state, fill(WeightedMean(state.params.size)).mean(np.float64))
    np.testing.assert_allclose(new.params, by_hand, rtol=1e-7, atol=1e-7)


def test_fedprox_is_fedavg_plus_mu_for_clients() -> None:
    prox, avg = FedProx(mu=0.01), FedAvg()
    state = prox.init(vec(*X0))
    assert prox.client_config(state) == {"mu": 0.01}
    assert avg.client_config(state) == {}
    new_prox = prox.apply(state, fill(WeightedMean(state.params.size)).mean(np.float64))
    new_avg = avg.apply(state, fill(WeightedMean(state.params.size)).mean(np.float64))
    np.testing.assert_array_equal(new_prox.params, new_avg.params)
    np.testing.assert_allclose(new_prox.params, (7.0 / 6.0, 0.0), rtol=1e-7, atol=1e-7)
    # the config dict is the caller's to change
    prox.client_config(state)["mu"] = 5.0
    assert prox.client_config(state) == {"mu": 0.01}


# --------------------------------------------------------------------------------------------
# WeightedMean properties
# --------------------------------------------------------------------------------------------


@st.composite
def cohorts(draw, max_k: int = 6, max_dim: int = 5):
    k = draw(st.integers(1, max_k))
    dim = draw(st.integers(1, max_dim))
    element = st.floats(-1e3, 1e3, allow_nan=False, width=32)
    updates = draw(hnp.arrays(F32, (k, dim), elements=element))
    weights = draw(hnp.arrays(np.float64, (k,), elements=st.floats(1e-3, 1e3)))
    order = draw(st.permutations(range(k)))
    return updates, weights, list(order)


def accumulate(updates: np.ndarray, weights: np.ndarray, order=None) -> WeightedMean:
    acc = WeightedMean(updates.shape[1])
    for i in order if order is not None else range(len(weights)):
        acc.add(updates[i], weights[i])
    return acc


# The running sum is float64: summing the same (|u| <= 1e3, k <= 8) terms in another order
# moves it by at most ~k * 1.1e-16 * sum|w u| / sum w < 1e-12, so the float64 means agree to
# TOL64; after rounding to float32 they may differ by one float32 step (~1.2e-7 relative).
TOL64 = dict(rtol=1e-12, atol=1e-11)
TOL = dict(rtol=3e-7, atol=1e-9)


@FAST
@given(cohorts())
def test_weighted_mean_matches_numpy_average_and_is_permutation_invariant(cohort) -> None:
    updates, weights, order = cohort
    forward = accumulate(updates, weights)
    shuffled = accumulate(updates, weights, order)
    oracle = np.average(updates.astype(np.float64), axis=0, weights=weights)
    np.testing.assert_allclose(forward.mean(np.float64), oracle, **TOL64)
    np.testing.assert_allclose(shuffled.mean(np.float64), forward.mean(np.float64), **TOL64)
    np.testing.assert_allclose(shuffled.mean(), forward.mean(), **TOL)
    assert shuffled.count == forward.count == len(weights)
    assert shuffled.total_weight == pytest.approx(weights.sum(), rel=1e-12)


@FAST
@given(cohorts(), hnp.arrays(F32, 5, elements=st.floats(-10, 10, width=32)))
def test_fedavg_step_is_permutation_invariant(cohort, x0) -> None:
    updates, weights, order = cohort
    strategy = FedAvg(server_lr=0.7)
    state = strategy.init(x0[: updates.shape[1]])
    a = strategy.apply(state, accumulate(updates, weights).mean(np.float64))
    b = strategy.apply(state, accumulate(updates, weights, order).mean(np.float64))
    np.testing.assert_allclose(a.params, b.params, **TOL)
    oracle = x0[: updates.shape[1]] + 0.7 * np.average(updates.astype(np.float64), 0, weights)
    np.testing.assert_allclose(a.params, oracle, rtol=1e-6, atol=1e-5)


@FAST
@given(cohorts())
def test_add_stacked_equals_repeated_add(cohort) -> None:
    updates, weights, _ = cohort
    stacked = WeightedMean(updates.shape[1])
    stacked.add_stacked(updates, weights)
    one_by_one = accumulate(updates, weights)
    if updates.dtype == np.float32:
        # float32 cohorts fold through sgemv in float32 partial sums (documented in
        # _weighted_row_sum): allow a few float32 roundings per row of the weighted magnitude.
        w = np.asarray(weights, np.float64)
        bound = 4 * len(w) * 2.0**-24 * (w @ np.abs(updates.astype(np.float64))) / w.sum()
        diff = np.abs(stacked.mean(np.float64) - one_by_one.mean(np.float64))
        assert np.all(diff <= bound + 1e-30)
    else:
        np.testing.assert_allclose(stacked.mean(np.float64), one_by_one.mean(np.float64),
                                   **TOL64)
    assert stacked.count == one_by_one.count
    assert stacked.total_weight == pytest.approx(one_by_one.total_weight, rel=1e-12)


@FAST
@given(cohorts(max_k=8), st.data())
def test_merge_equals_single_accumulator(cohort, data) -> None:
    updates, weights, _ = cohort
    k, dim = updates.shape
    cut = data.draw(st.integers(0, k), label="cut")
    # Two "edge aggregators" each see part of the cohort; the global one merges them.
    edge_a = accumulate(updates[:cut], weights[:cut]) if cut else WeightedMean(dim)
    edge_b = accumulate(updates[cut:], weights[cut:]) if cut < k else WeightedMean(dim)
    merged = WeightedMean(dim)
    merged.merge(edge_a)
    merged.merge(edge_b)
    single = accumulate(updates, weights)
    np.testing.assert_allclose(merged.mean(np.float64), single.mean(np.float64), **TOL64)
    assert merged.count == k
    assert merged.total_weight == pytest.approx(single.total_weight, rel=1e-12)
    # merging leaves the merged-in accumulators alone
    assert edge_a.count == cut and edge_b.count == k - cut


def test_merge_rejects_other_length_and_itself() -> None:
    acc = fill(WeightedMean(2))
    with pytest.raises(UpdateRejected) as info:
        acc.merge(WeightedMean(3))
    assert info.value.reason == "wrong_shape"
    with pytest.raises(UpdateRejected) as info:
        acc.merge(acc)
    assert info.value.reason == "duplicate"
    with pytest.raises(TypeError):
        acc.merge(np.zeros(2))  # type: ignore[arg-type]
    assert acc.count == 3 and acc.total_weight == 6.0
    np.testing.assert_allclose(acc.mean(), MEAN_DELTA, rtol=1e-7)


def test_mean_of_empty_accumulator_raises() -> None:
    acc = WeightedMean(4)
    with pytest.raises(EmptyAccumulator, match="no updates were accumulated"):
        acc.mean()
    assert issubclass(EmptyAccumulator, ShoalError)
    strategy = FedAvg()
    state = strategy.init(np.zeros(4, F32))
    with pytest.raises(EmptyAccumulator):
        strategy.apply(state, acc.mean(np.float64))


@pytest.mark.parametrize("dim", [0, -1, 2.0, True])
def test_weighted_mean_dim_must_be_positive_int(dim) -> None:
    with pytest.raises(SpecError):
        WeightedMean(dim)


# --------------------------------------------------------------------------------------------
# Rejection changes nothing
# --------------------------------------------------------------------------------------------

BAD_ADDS = [
    ("wrong_shape", np.zeros((1, 3), F32), 1.0),
    ("wrong_shape", np.zeros(4, F32), 1.0),
    ("wrong_shape", np.zeros(2, F32), 1.0),
    ("wrong_dtype", np.zeros(3, np.int64), 1.0),
    ("wrong_dtype", np.zeros(3, np.complex64), 1.0),
    ("wrong_dtype", [0.0, 0.0, 0.0], 1.0),
    ("non_finite", vec(0.0, np.nan, 1.0), 1.0),
    ("non_finite", vec(np.inf, 0.0, 1.0), 1.0),
    ("non_finite", vec(0.0, 0.0, -np.inf), 1.0),
    ("non_finite", np.array([1e308, 0.0, 0.0]), 10.0),  # finite, but weight * update overflows
    ("bad_weight", vec(1.0, 2.0, 3.0), 0.0),
    ("bad_weight", vec(1.0, 2.0, 3.0), -1.0),
    ("bad_weight", vec(1.0, 2.0, 3.0), math.nan),
    ("bad_weight", vec(1.0, 2.0, 3.0), math.inf),
    ("bad_weight", vec(1.0, 2.0, 3.0), True),
    ("bad_weight", vec(1.0, 2.0, 3.0), "1"),
    ("bad_weight", vec(1.0, 2.0, 3.0), np.complex128(1.0)),
]


def assert_same_accumulators(acc: WeightedMean, twin: WeightedMean) -> None:
    """Equal count, weight and bit-identical sums (checked through the next add and mean)."""
    assert (acc.count, acc.total_weight) == (twin.count, twin.total_weight)
    follow_up = vec(0.25, -0.5, 2.0)
    acc.add(follow_up, 3.0)
    twin.add(follow_up, 3.0)
    np.testing.assert_array_equal(acc.mean(np.float64), twin.mean(np.float64))


@pytest.mark.parametrize(("reason", "update", "weight"), BAD_ADDS)
def test_rejected_add_leaves_accumulator_untouched(reason, update, weight) -> None:
    acc, twin = WeightedMean(3), WeightedMean(3)
    for a in (acc, twin):
        a.add(vec(1.0, 2.0, 3.0), 2.0)
        a.add(vec(-1.5, 0.5, 4.0), 1.0)
    with pytest.raises(UpdateRejected) as info:
        acc.add(update, weight)
    assert info.value.reason == reason
    assert reason in str(info.value)
    assert_same_accumulators(acc, twin)


def test_rejected_first_add_leaves_accumulator_empty() -> None:
    acc = WeightedMean(3)
    with pytest.raises(UpdateRejected):
        acc.add(vec(1.0, np.nan, 0.0), 1.0)
    assert acc.count == 0 and acc.total_weight == 0.0
    with pytest.raises(EmptyAccumulator):
        acc.mean()


def test_non_finite_detail_names_the_element() -> None:
    with pytest.raises(UpdateRejected, match=r"element 1 is nan"):
        WeightedMean(3).add(vec(0.0, np.nan, 1.0), 1.0)


GOOD_ROWS = np.array([[1.0, 2.0, 3.0], [0.5, -0.5, 0.0], [4.0, 0.0, -1.0]], F32)
BAD_STACKS = [
    ("wrong_shape", GOOD_ROWS[:, :2], np.ones(3), None),
    ("wrong_shape", GOOD_ROWS[0], np.ones(1), None),
    ("wrong_dtype", GOOD_ROWS.astype(np.int32), np.ones(3), None),
    ("non_finite", np.where(np.arange(3)[:, None] == 2, np.nan, GOOD_ROWS).astype(F32),
     np.ones(3), "row 2"),
    ("non_finite", np.array([[1.0, 1.0, 1.0], [np.inf, 1.0, 1.0], [-np.inf, 1.0, 1.0]], F32),
     np.ones(3), "row 1"),
    ("bad_weight", GOOD_ROWS, np.array([1.0, 0.0, 1.0]), "row 1"),
    ("bad_weight", GOOD_ROWS, np.array([1.0, 2.0, np.nan]), "row 2"),
    ("bad_weight", GOOD_ROWS, np.ones(2), None),
    ("bad_weight", GOOD_ROWS, np.array([True, True, True]), None),
]


@pytest.mark.parametrize(("reason", "updates", "weights", "names"), BAD_STACKS)
def test_rejected_add_stacked_changes_nothing(reason, updates, weights, names) -> None:
    acc, twin = WeightedMean(3), WeightedMean(3)
    for a in (acc, twin):
        a.add_stacked(GOOD_ROWS, np.array([1.0, 2.0, 3.0]))
    with pytest.raises(UpdateRejected) as info:
        acc.add_stacked(updates, weights)
    assert info.value.reason == reason
    if names is not None:
        assert names in str(info.value)
    assert_same_accumulators(acc, twin)


def test_add_stacked_with_no_rows_is_a_no_op() -> None:
    acc = WeightedMean(3)
    acc.add_stacked(np.empty((0, 3), F32), np.empty(0))
    assert acc.count == 0 and acc.total_weight == 0.0


# --------------------------------------------------------------------------------------------
# FedAdagrad / FedAdam / FedYogi against Algorithm 2 of Reddi et al., by hand
# --------------------------------------------------------------------------------------------

# eta = 0.1, beta1 = 0.9, beta2 = 0.99, tau = 1e-3; x_0 = (0.5, -1.0).
# Round 1: deltas (0.1, -0.6) with weight 3 and (0.5, 0.2) with weight 1:
#   D1 = ((0.3 + 0.5) / 4, (-1.8 + 0.2) / 4) = (0.2, -0.4);  D1^2 = (0.04, 0.16).
# Round 2: one delta (0.01, 0.5) with weight 2:  D2 = (0.01, 0.5);  D2^2 = (1e-4, 0.25).
# m_{-1} = 0, v_{-1} = tau^2 = 1e-6.
#   m_0 = 0.1 * D1 = (0.02, -0.04)
#   m_1 = 0.9 * m_0 + 0.1 * D2 = (0.018 + 0.001, -0.036 + 0.05) = (0.019, 0.014)
ETA, TAU = 0.1, 1e-3
X_0 = (0.5, -1.0)
ROUNDS = (
    [((0.1, -0.6), 3.0), ((0.5, 0.2), 1.0)],
    [((0.01, 0.5), 2.0)],
)
M_HAND = ((0.02, -0.04), (0.019, 0.014))
V_HAND = {
    # v_0 = 1e-6 + D1^2;  v_1 = v_0 + D2^2
    "fedadagrad": ((0.040001, 0.160001), (0.040101, 0.410001)),
    # v_0 = 0.99e-6 + 0.01 * D1^2 = (0.00040099, 0.00160099)
    # v_1 = 0.99 * v_0 + 0.01 * D2^2 = (0.0003969801 + 0.000001, 0.0015849801 + 0.0025)
    "fedadam": ((0.00040099, 0.00160099), (0.0003979801, 0.0040849801)),
    # v_0: v_{-1} = 1e-6 < D1^2 in both coordinates, sign = -1: v_0 = 1e-6 + 0.01 * D1^2.
    # v_1: coordinate 0 has v_0 = 4.01e-4 > D2^2 = 1e-4, sign = +1: 4.01e-4 - 0.01 * 1e-4;
    #      coordinate 1 has v_0 = 1.601e-3 < D2^2 = 0.25, sign = -1: 1.601e-3 + 0.01 * 0.25.
    "fedyogi": ((0.000401, 0.001601), (0.000400, 0.004101)),
}


@pytest.mark.parametrize("name", sorted(V_HAND))
def test_adaptive_optimizers_two_steps_by_hand(name: str) -> None:
    strategy = make_strategy(name, server_lr=ETA, beta1=0.9, tau=TAU)
    state = strategy.init(np.array(X_0))
    np.testing.assert_array_equal(state.slots["m"], (0.0, 0.0))
    np.testing.assert_allclose(state.slots["v"], (1e-6, 1e-6), rtol=1e-7)

    x = list(X_0)
    for t, clients in enumerate(ROUNDS):
        acc = WeightedMean(state.params.size)
        for delta, weight in clients:
            acc.add(vec(*delta), weight)
        state = strategy.apply(state, acc.mean(np.float64))
        m, v = M_HAND[t], V_HAND[name][t]
        # x_{t+1} = x_t + eta * m_t / (sqrt(v_t) + tau), no bias correction
        x = [
            x[0] + ETA * m[0] / (math.sqrt(v[0]) + TAU),
            x[1] + ETA * m[1] / (math.sqrt(v[1]) + TAU),
        ]
        assert state.version == t + 1
        np.testing.assert_allclose(state.slots["m"], m, rtol=1e-6)
        np.testing.assert_allclose(state.slots["v"], v, rtol=1e-6)
        np.testing.assert_allclose(state.params, x, rtol=1e-6)


def test_fedadagrad_first_step_literal() -> None:
    # x_1[0] = 0.5 + 0.1 * 0.02 / (sqrt(0.040001) + 0.001) = 0.5 + 0.002 / 0.2010025 = 0.509950...
    strategy = FedAdagrad(server_lr=0.1)
    state = strategy.init(vec(*X_0))
    acc = WeightedMean(state.params.size)
    acc.add(vec(0.2, -0.4), 1.0)
    np.testing.assert_allclose(strategy.apply(state, acc.mean(np.float64)).params[0], 0.50995012, rtol=1e-7)


def test_adaptive_optimizer_needs_its_slots() -> None:
    state = FedAvg().init(np.zeros(2, F32))
    acc = WeightedMean(2)
    acc.add(vec(1.0, 1.0), 1.0)
    with pytest.raises(SpecError, match="slots"):
        FedAdam(server_lr=0.1).apply(state, acc.mean(np.float64))


# --------------------------------------------------------------------------------------------
# Purity: apply returns new state and never writes into the old one
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", all_strategies(), ids=lambda s: s.name)
def test_apply_does_not_mutate_input_state(strategy: Strategy) -> None:
    state = strategy.init(vec(0.5, -1.0, 2.0))
    acc = WeightedMean(state.params.size)
    acc.add(vec(0.1, 0.2, -0.3), 2.0)
    state = strategy.apply(state, acc.mean(np.float64))  # a state with non-trivial slots
    before = {k: np.array(a, copy=True) for k, a in state.to_arrays().items()}
    acc = WeightedMean(state.params.size)
    acc.add(vec(-0.4, 0.1, 0.05), 1.0)
    new = strategy.apply(state, acc.mean(np.float64))
    for key, array in state.to_arrays().items():
        np.testing.assert_array_equal(array, before[key])
        assert array.dtype == before[key].dtype
    assert state.version == 1 and new.version == 2
    assert not np.array_equal(new.params, state.params)
    for key in state.slots:
        assert not np.shares_memory(new.slots[key], state.slots[key])
    assert not np.shares_memory(new.params, state.params)


def test_state_arrays_are_read_only_and_init_copies() -> None:
    caller = np.array([1.0, 2.0])  # float64 in, float32 state out
    state = FedAdam(server_lr=0.1).init(caller)
    caller[0] = 99.0
    assert state.params.dtype == F32
    np.testing.assert_array_equal(state.params, (1.0, 2.0))
    with pytest.raises(ValueError):
        state.params[0] = 5.0
    with pytest.raises(ValueError):
        state.slots["m"][0] = 5.0
    with pytest.raises(TypeError):
        state.slots["extra"] = np.zeros(2, F32)  # type: ignore[index]


@pytest.mark.parametrize(
    "params", [np.zeros(0, F32), np.zeros((2, 2), F32), np.arange(3), vec(1.0, np.nan), [1.0]]
)
def test_init_rejects_unusable_params(params) -> None:
    with pytest.raises(SpecError):
        FedAvg().init(params)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(params=np.zeros(3)),  # float64
        dict(params=np.zeros(3, F32), version=-1),
        dict(params=np.zeros(3, F32), version=1.0),
        dict(params=np.zeros(3, F32), slots={"m": np.zeros(2, F32)}),
        dict(params=np.zeros(3, F32), slots={"": np.zeros(3, F32)}),
    ],
)
def test_server_state_validates(kwargs) -> None:
    with pytest.raises(SpecError):
        ServerState(**kwargs)


def test_delta_of_other_length_is_refused() -> None:
    state = FedAvg().init(np.zeros(3, F32))
    acc = WeightedMean(2)
    acc.add(vec(1.0, 1.0), 1.0)
    with pytest.raises(SpecError, match=r"shape \(2,\) but the model has 3"):
        FedAvg().apply(state, acc.mean(np.float64))


# --------------------------------------------------------------------------------------------
# Serialization
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", all_strategies(), ids=lambda s: s.name)
def test_state_round_trips_through_npz(strategy: Strategy) -> None:
    state = strategy.init(vec(0.5, -1.0, 2.0))
    acc = WeightedMean(state.params.size)
    acc.add(vec(0.1, 0.2, -0.3), 2.0)
    state = strategy.apply(state, acc.mean(np.float64))

    buffer = io.BytesIO()
    np.savez(buffer, **state.to_arrays())
    buffer.seek(0)
    with np.load(buffer) as stored:
        restored = ServerState.from_arrays(dict(stored))

    assert restored.version == state.version == 1
    assert type(restored.version) is int
    assert restored.params.dtype == F32
    assert restored.params.tobytes() == state.params.tobytes()
    assert set(restored.slots) == set(state.slots)
    for key in state.slots:
        assert restored.slots[key].dtype == F32
        assert restored.slots[key].tobytes() == state.slots[key].tobytes()
    # and it resumes exactly where the original would have gone
    nxt = vec(-0.4, 0.1, 0.05)
    a, b = WeightedMean(state.params.size), WeightedMean(restored.params.size)
    a.add(nxt, 1.0)
    b.add(nxt, 1.0)
    assert strategy.apply(state, a.mean(np.float64)).params.tobytes() == \
        strategy.apply(restored, b.mean(np.float64)).params.tobytes()


@pytest.mark.parametrize(
    "arrays",
    [
        {"round": np.int64(0)},
        {"params": np.zeros(2, F32)},
        {"params": np.zeros(2, F32), "round": np.int64(0), "momentum": np.zeros(2, F32)},
        {"params": np.zeros(2, F32), "round": np.float64(1.0)},
        {"params": np.zeros(2, F32), "round": np.array([1])},
        {"params": np.zeros(2), "round": np.int64(0)},
        {"params": np.zeros(2, F32), "round": np.int64(0), "slot.m": np.zeros(3, F32)},
    ],
)
def test_from_arrays_rejects_malformed_checkpoints(arrays) -> None:
    with pytest.raises(SpecError):
        ServerState.from_arrays(arrays)


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


def test_make_strategy_builds_each_registered_strategy() -> None:
    assert set(STRATEGIES) == {"fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad"}
    assert make_strategy("fedavg") == FedAvg()
    assert make_strategy("fedprox", mu=0.1, server_lr=0.5) == FedProx(mu=0.1, server_lr=0.5)
    assert make_strategy("fedadam", server_lr=0.01, beta2=0.9) == FedAdam(
        server_lr=0.01, beta2=0.9
    )
    assert make_strategy("fedyogi", server_lr=0.01) == FedYogi(server_lr=0.01)
    assert make_strategy("fedadagrad", server_lr=0.01) == FedAdagrad(server_lr=0.01)
    for strategy in all_strategies():
        assert isinstance(strategy, Strategy)
        assert STRATEGIES[strategy.name] is type(strategy)


def test_unknown_strategy_name_lists_the_allowed_ones() -> None:
    with pytest.raises(ConfigError) as info:
        make_strategy("fedsgd")
    assert info.value.key == "strategy.name"
    for name in ("fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad"):
        assert name in str(info.value)


@pytest.mark.parametrize(
    ("name", "kwargs", "key"),
    [
        ("fedavg", {"lr": 0.1}, "strategy.lr"),
        ("fedadagrad", {"server_lr": 0.1, "beta2": 0.99}, "strategy.beta2"),  # Adagrad has no β2
        ("fedadam", {}, "strategy.server_lr"),
        ("fedprox", {}, "strategy.mu"),
    ],
)
def test_make_strategy_rejects_unknown_and_missing_parameters(name, kwargs, key) -> None:
    with pytest.raises(ConfigError) as info:
        make_strategy(name, **kwargs)
    assert info.value.key == key
    assert "accepted: " in str(info.value)


@pytest.mark.parametrize(
    ("name", "kwargs", "param", "interval"),
    [
        ("fedavg", {"server_lr": 0.0}, "server_lr", "(0, inf)"),
        ("fedavg", {"server_lr": -1.0}, "server_lr", "(0, inf)"),
        ("fedavg", {"server_lr": math.nan}, "server_lr", "(0, inf)"),
        ("fedavg", {"server_lr": math.inf}, "server_lr", "(0, inf)"),
        ("fedavg", {"server_lr": "1"}, "server_lr", "(0, inf)"),
        ("fedavg", {"server_lr": 1j}, "server_lr", "(0, inf)"),
        ("fedprox", {"mu": -0.1}, "mu", "[0, inf)"),
        ("fedadam", {"server_lr": 0.0}, "server_lr", "(0, inf)"),
        ("fedadam", {"server_lr": 0.1, "beta1": 1.0}, "beta1", "[0, 1)"),
        ("fedadam", {"server_lr": 0.1, "beta1": -0.1}, "beta1", "[0, 1)"),
        ("fedadam", {"server_lr": 0.1, "beta2": 1.0}, "beta2", "[0, 1)"),
        ("fedyogi", {"server_lr": 0.1, "beta2": -0.5}, "beta2", "[0, 1)"),
        ("fedyogi", {"server_lr": 0.1, "tau": 0.0}, "tau", "(0, inf)"),
        ("fedadagrad", {"server_lr": 0.1, "tau": -1e-3}, "tau", "(0, inf)"),
    ],
)
def test_out_of_range_hyperparameters_raise_config_error(name, kwargs, param, interval) -> None:
    with pytest.raises(ConfigError) as info:
        make_strategy(name, **kwargs)
    assert info.value.key == f"strategy.{param}"
    assert param in str(info.value) and interval in str(info.value)
    with pytest.raises(ConfigError):  # the classes validate too, not only the factory
        STRATEGIES[name](**kwargs)


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("fedadam", {"server_lr": 1e-9, "beta1": 0.0, "beta2": 0.0, "tau": 1e-12}),
        ("fedyogi", {"server_lr": 1e-9, "beta1": 0.0, "beta2": 0.0, "tau": 1e-12}),
        ("fedadagrad", {"server_lr": 1e-9, "beta1": 0.0, "tau": 1e-12}),
        ("fedprox", {"mu": 0.0}),
        ("fedprox", {"mu": 3}),  # an int means the float it equals
    ],
)
def test_boundary_values_are_accepted_and_kept_exactly(name, kwargs) -> None:
    for strategy in (STRATEGIES[name](**kwargs), make_strategy(name, **kwargs)):
        for key, value in kwargs.items():
            kept = getattr(strategy, key)
            assert kept == value and type(kept) is float, (key, kept)


def test_boundary_values_mean_what_they_say() -> None:
    state = ServerState(params=vec(0.0, 0.0), version=0)
    assert FedProx(mu=0.0).client_config(state) == {"mu": 0.0}
    # beta1 = beta2 = 0 keeps no history: m = Δ and v = Δ², so the step is lr * Δ / (|Δ| + τ)
    adam = FedAdam(server_lr=1e-9, beta1=0.0, beta2=0.0, tau=1e-12)
    start = adam.init(vec(0.0, 0.0))
    acc = WeightedMean(start.params.size)
    acc.add(vec(0.5, -2.0), 1.0)
    stepped = adam.apply(start, acc.mean(np.float64))
    expected = 1e-9 * np.array([0.5, -2.0]) / (np.array([0.5, 2.0]) + 1e-12)
    np.testing.assert_allclose(stepped.params, expected.astype(F32), rtol=1e-6)
    np.testing.assert_array_equal(stepped.slots["m"], vec(0.5, -2.0))
    np.testing.assert_array_equal(stepped.slots["v"], vec(0.25, 4.0))


def test_public_api() -> None:
    assert sorted(shoal.strategy.__all__) == sorted(
        [
            "FedAdagrad",
            "FedAdam",
            "FedAvg",
            "FedProx",
            "FedYogi",
            "STRATEGIES",
            "ServerState",
            "Strategy",
            "make_strategy",
        ]
    )
    for name in shoal.strategy.__all__:
        assert hasattr(shoal.strategy, name)
