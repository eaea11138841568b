"""The canary scenario of the lifecycle docs, end to end.

Train a production model, then a candidate from it -- on the clients' true labels (a better
model) or on corrupted labels (a worse one) -- commit both to a real model store, and run a
canary between them with the simulator's evaluation-only clients
(:func:`shoal.sim.rollout.run_canary`).
"""

from __future__ import annotations

from shoal import seeds
from shoal.config import Config
from shoal.data import FederatedData
from shoal.experiment import Experiment
from shoal.lifecycle.audit import AuditLog
from shoal.lifecycle.canary import Canary, CanaryRule
from shoal.sim.evaluation import LocalEvaluator, holdout_split
from shoal.sim.rollout import CanaryRun, corrupt_labels, run_canary
from shoal.store import ModelStore

__all__ = ["canary_scenario", "train_pair"]


def train_pair(cfg: Config, data: FederatedData, store: ModelStore, *, corrupt: bool,
               candidate_rounds: int, holdout: float = 0.2, production: int | None = None,
               ) -> tuple[int, int, Experiment, dict[int, float]]:
    """Commit a production model trained for ``cfg.rounds`` (or take the store's
    ``production`` version) and a candidate trained ``candidate_rounds`` more from it (on
    corrupted labels if ``corrupt``), each client keeping a ``holdout`` share of its
    examples out of training (:func:`~shoal.sim.evaluation.holdout_split`, the split a
    deployed device evaluates on with ``shoal client --holdout``).

    Returns:
        ``(production version, candidate version, the production's experiment, version ->
        central test accuracy)``.
    """
    train_parts, _ = holdout_split(data.client_indices, holdout, cfg.seed)
    fed = FederatedData(data.train, data.test, tuple(train_parts))
    exp = Experiment(cfg, fed)
    if production is None:
        prod = exp.run()
        p = store.commit(exp.checkpoint(prod.state), round=prod.state.version,
                         rounds=(1, prod.state.version),
                         metrics=prod.records[-1].eval, now=0.0, status="production")
        prod_state, prod_acc = prod.state, prod.records[-1].eval["accuracy"]
    else:
        p = store.get(production)
        prod_state, prod_acc = exp.restore(store.load(p.id)), p.metrics.get("accuracy", 0.0)
    cand_cfg = cfg.with_overrides({"rounds": prod_state.version + candidate_rounds})
    train = corrupt_labels(data.train, seeds.generator(cfg.seed, "corrupt")) if corrupt \
        else data.train
    cand_exp = Experiment(cand_cfg, FederatedData(train, data.test, tuple(train_parts)))
    cand = cand_exp.run(state=prod_state)
    c = store.commit(cand_exp.checkpoint(cand.state), round=cand.state.version,
                     rounds=(prod_state.version + 1, cand.state.version),
                     metrics=cand.records[-1].eval, now=1.0, parent=p.id)
    return p.id, c.id, exp, {p.id: prod_acc, c.id: cand.records[-1].eval["accuracy"]}


def canary_scenario(cfg: Config, data: FederatedData, store_root: str, *, corrupt: bool,
                    candidate_rounds: int, fraction: float, rule: CanaryRule, cohort: int,
                    holdout: float = 0.2, audit: AuditLog | None = None) -> CanaryRun:
    """Production trained for ``cfg.rounds``, a candidate trained ``candidate_rounds`` more
    from it (on corrupted labels if ``corrupt``), then a canary between them
    (:func:`train_pair`).

    Each client keeps a ``holdout`` share of its examples out of training; the canary's
    evaluations use it (with the true labels).
    """
    _, held = holdout_split(data.client_indices, holdout, cfg.seed)
    with ModelStore(store_root) as store:
        p, c, exp, accuracy = train_pair(cfg, data, store, corrupt=corrupt,
                                         candidate_rounds=candidate_rounds, holdout=holdout)
        canary = Canary(store, c, fraction, now=2.0, rule=rule,
                        audit=audit if audit is not None else AuditLog())
        evaluator = LocalEvaluator(exp.eval_model, data.train, held)
        params = {v: store.load(v).state.params for v in (p, c)}
        devices = [f"device-{i:06d}" for i in range(data.num_clients)]
        run = run_canary(canary, evaluator, params.__getitem__, devices, cohort=cohort,
                         seed=cfg.seed, now=2.0)
    run.accuracy = accuracy
    return run
