"""The lifecycle scenarios, measured: the canary (a corrupted and a better candidate) and
drift (a label shift over simulated days, detection and continual training), on
Fashion-MNIST; writes the drift plot to ``docs/lifecycle_drift.png``.

* ``canary``: production is config S's data and model (100 clients, Dirichlet 0.5, 2NN)
  trained ``--rounds`` rounds; the candidate is trained 20 more rounds from it, on corrupted
  labels (every label replaced by another class) or on the true ones. Canary: 30 % of the
  devices, cohorts of 15 per arm per evaluation, rule: one-sided tests at 0.05 on trimmed
  means (Yuen; the default trim 0.1 and loss cap 10), at least 20 clients per arm, margin
  0.02 in loss. One JSON line per candidate: the verdict,
  evaluation rounds, the figures, devices the candidate reached (all inside the canary), and
  the central test accuracy of both versions (not used by the rule).
* ``drift``: :func:`shoal.scenarios.drift.drift_scenario` with its defaults (the label mix
  moves from classes 0-4 to 5-9 between hours 72 and 96; evaluations every 2 hours on 20
  clients; Page-Hinkley delta 0.01, lambda 0.5; PSI > 0.25; 20 rounds of continual training
  deployed 10 simulated minutes a round after the alarm). One JSON line: detection delay,
  false alarms, retrainings, accuracy before / during / after and without a response.

    .venv/bin/python benchmarks/bench_lifecycle.py [--only canary|drift]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from shoal.config import load_config
from shoal.data import FederatedData, load_fashion_mnist, partition
from shoal.lifecycle.canary import CanaryRule
from shoal.scenarios.canary import canary_scenario
from shoal.scenarios.drift import drift_scenario

DOCS = Path(__file__).resolve().parents[1] / "docs"


def plot(report, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hours = [p.hour for p in report.points]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    ax.plot(hours, [p.accuracy for p in report.points], label="served model", lw=1.8)
    ax.plot(hours, [p.accuracy_without_response for p in report.points],
            label="first model, no response", lw=1.2, ls="--")
    s = report.shift
    ax.axvspan(s.shift_hour, s.shift_hour + s.ramp_hours, color="0.9",
               label="label mix shifting")
    ax.axvline(report.first_alarm_hour, color="tab:red", lw=1, label="first alarm")
    for h in sorted({p.hour for p, q in zip(report.points[1:], report.points)
                     if p.version != q.version}):
        ax.axvline(h, color="tab:green", lw=1, ls=":")
    ax.plot([], [], color="tab:green", ls=":", label="retrained model deployed")
    ax.set_xlabel("simulated hours")
    ax.set_ylabel("federated accuracy (fresh data)")
    ax.set_ylim(0.3, 1.0)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--only", choices=("canary", "drift"),
                   help="run one scenario (drift rewrites docs/lifecycle_drift.png)")
    args = p.parse_args(argv)
    train, test = load_fashion_mnist(os.environ.get("SHOAL_FASHION_MNIST") or None,
                                     flatten=True)
    cfg = load_config(overrides={"rounds": args.rounds})
    data = FederatedData(train, test, tuple(partition(train.y, 100, "dirichlet", alpha=0.5,
                                                      seed=0)))
    for corrupt in (True, False) if args.only != "drift" else ():
        with tempfile.TemporaryDirectory() as root:
            run = canary_scenario(cfg, data, root, corrupt=corrupt, candidate_rounds=20,
                                  fraction=0.3, rule=CanaryRule(min_clients=20, margin=0.02),
                                  cohort=15)
        v = run.verdict
        print(json.dumps({"bench": "canary", "candidate": "corrupted" if corrupt else "clean",
                          "verdict": v.decision, "evaluation_rounds": run.rounds,
                          "loss_candidate": round(v.mean_candidate, 4),
                          "loss_production": round(v.mean_production, 4),
                          "n_candidate": v.n_candidate, "n_production": v.n_production,
                          "z": round(v.z, 2), "canary_devices": len(run.canary_clients),
                          "candidate_reached": len(run.sent_candidate),
                          "reached_outside_canary": len(run.sent_candidate
                                                        - run.canary_clients),
                          "central_accuracy": {str(k): round(a, 4)
                                               for k, a in run.accuracy.items()}}),
              flush=True)
    if args.only == "canary":
        return
    with tempfile.TemporaryDirectory() as root:
        report = drift_scenario(load_config(overrides={"rounds": 20}), train, test, root)
    plot(report, DOCS / "lifecycle_drift.png")
    retrains = sum(1 for e in report.audit.entries if e["action"] == "retrain")
    print(json.dumps({"bench": "drift", "shift_hour": report.shift.shift_hour,
                      "first_alarm_hour": report.first_alarm_hour,
                      "detection_delay_hours": report.detection_delay_hours,
                      "first_deployed_hour": report.deployed_hour,
                      "false_alarms": report.false_alarms, "retrainings": retrains,
                      "alarms_by_detector": {d: sum(1 for a in report.alarms if a[1] == d)
                                             for d in ("page_hinkley", "psi")},
                      "accuracy": {k: round(v, 4) for k, v in
                                   report.phase_accuracy().items()},
                      "accuracy_without_response": {
                          k: round(v, 4) for k, v in
                          report.phase_accuracy("accuracy_without_response").items()}}),
          flush=True)


if __name__ == "__main__":
    main()
