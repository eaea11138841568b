"""Short complete runs on real data: the simulator learns, and the seeds mean something."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest

from shoal.config import load_config
from shoal.experiment import Experiment


def test_short_fmnist_run_beats_chance_clearly(fmnist):
    from shoal.data import FederatedData
    from shoal.data.partition import partition

    train, test = fmnist
    cfg = load_config(None, {"rounds": 4, "data.clients": 50, "sampling.per_round": 5})
    parts = partition(train.y, 50, "dirichlet", alpha=0.5, seed=0)
    exp = Experiment(cfg, FederatedData(train, test, tuple(parts)))
    result = exp.run()
    s = result.summary()
    assert s["initial_accuracy"] < 0.2
    assert s["final_accuracy"] > 0.55  # chance is 0.10
    assert result.records[-1].committed and result.state.version == 4
    # the same config and seed reproduce the run exactly
    again = Experiment(cfg, exp.data).run()
    np.testing.assert_array_equal(again.state.params, result.state.params)


def test_synthetic_fedprox_with_logistic_regression_learns():
    cfg = load_config(None, {"rounds": 8, "data.dataset": "synthetic", "data.clients": 30,
                             "sampling.per_round": 10, "model.name": "logreg",
                             "strategy.name": "fedprox", "strategy.mu": 1.0,
                             "client.lr": 0.01, "client.batch_size": 10, "client.epochs": 5})
    s = Experiment(cfg).run().summary()
    assert s["final_accuracy"] > s["initial_accuracy"] + 0.15


def test_adaptive_server_optimizer_runs_and_learns(fmnist):
    from shoal.data import FederatedData
    from shoal.data.partition import partition

    train, test = fmnist
    cfg = load_config(None, {"rounds": 4, "data.clients": 50, "sampling.per_round": 5,
                             "strategy.name": "fedadam", "strategy.server_lr": 0.03,
                             "data.partition": "iid"})
    parts = partition(train.y, 50, "iid", seed=0)
    s = Experiment(cfg, FederatedData(train, test, tuple(parts))).run().summary()
    assert s["final_accuracy"] > 0.55  # chance is 0.10


@pytest.fixture
def restore_torch_threads():
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [1, os.cpu_count() or 1])
def test_run_threads_follow_sim_threads_and_numpy_blas_stays_single_threaded(
        threads, restore_torch_threads):
    """Every thread of a run uses ``sim.threads`` PyTorch threads, and numpy's BLAS one.

    OpenMP's thread count is per OS thread: a thread the run starts begins with one per core
    unless it sets its own. Too many threads on two cores (or OpenBLAS workers busy-waiting
    between folds) slowed config S by a third. threadpoolctl asks each library from the
    calling thread, so it sees what that thread would really use. Evaluation overlaps
    training only when training leaves a core free; otherwise it runs in line.
    """
    import torch
    from threadpoolctl import threadpool_info

    def home(module) -> tuple[str, ...]:
        d = os.path.dirname(os.path.abspath(module.__file__))
        return d + os.sep, d + ".libs" + os.sep  # the package, and its wheel's bundled libs

    def pools() -> dict[str, int]:
        # PyTorch's own OpenMP and numpy's own BLAS, as this thread sees them (other packages,
        # e.g. scipy, may bundle another OpenBLAS, which the run leaves alone)
        owner = {"openmp": home(torch), "openblas": home(np), "blis": home(np)}
        return {i["internal_api"]: i["num_threads"] for i in threadpool_info()
                if os.path.abspath(i["filepath"]).startswith(owner.get(i["internal_api"], ()))}

    before = pools()
    cfg = load_config(None, {"rounds": 2, "data.dataset": "synthetic", "data.clients": 10,
                             "sampling.per_round": 3, "model.name": "logreg",
                             "sim.threads": threads})
    exp = Experiment(cfg)
    seen: list[dict[str, int]] = []
    eval_threads: list[bool] = []
    evaluate = exp.evaluate

    def spy(params):
        seen.append(pools())
        eval_threads.append(threading.current_thread() is threading.main_thread())
        return evaluate(params)

    exp.evaluate = spy
    result = exp.run(on_commit=lambda state, rec: seen.append(pools()))
    assert len(seen) == 5  # 3 evaluations (rounds 0-2), 2 commits on the main thread
    assert all(r.eval for r in result.records) and len(result.records) == 3
    for p in seen:
        assert p.get("openmp", threads) == threads, p
        assert p.get("openblas", 1) == 1 and p.get("blis", 1) == 1, p
    assert pools().get("openblas") == before.get("openblas")  # restored after the run
    in_line = threads >= (os.cpu_count() or 1)
    assert eval_threads == [in_line] * 3
