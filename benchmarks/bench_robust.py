"""Every attack x every defense on Fashion-MNIST (Dirichlet 0.5, 100 clients, 20 per round).

One JSON line per cell: final clean accuracy, backdoor accuracy (the stamped test images of
other labels classified as the target), and the difference to the no-attack FedAvg baseline
of the same run. Cells already in ``--out`` are skipped, so an interrupted run resumes;
``--plot`` draws the heat map (clean accuracy minus the baseline, per fraction) from it.

    .venv/bin/python benchmarks/bench_robust.py --out benchmarks/results/robust.jsonl
    .venv/bin/python benchmarks/bench_robust.py --out benchmarks/results/robust.jsonl \\
        --plot docs/robust_matrix.png

Setting: 2NN, 1 local epoch, batch 32, lr 0.05, FedAvg server (lr 1), 30 rounds, seed 0;
the attackers are a fixed ``fraction`` of the 100 clients (so a round's cohort of 20 holds
a hypergeometric number of them, 2 or 4 on average); every defense assumes that fraction
(``robust.byzantine_fraction``). Defense settings: the norm bound is adaptive (the median
norm of the previous round, starting at 1.0); centered clipping uses tau = 0.5 (the median
honest update norm is about 0.75 in round 1 and shrinks).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from shoal.build import load_data
from shoal.config import load_config
from shoal.experiment import Experiment
from shoal.sim.attacks import ATTACKS, backdoor_testset
from shoal.training import evaluate

DEFENSES = {
    "fedavg": {},
    "norm_bound": {"robust.norm_bound": 1.0, "robust.norm_adaptive": True},
    "median": {"robust.rule": "median"},
    "trimmed_mean": {"robust.rule": "trimmed_mean"},
    "krum": {"robust.rule": "krum"},
    "multi_krum": {"robust.rule": "multi_krum"},
    "bulyan": {"robust.rule": "bulyan"},
    "centered_clip": {"robust.rule": "centered_clip", "robust.cc_tau": 0.5},
}
BASE = {"data.clients": 100, "data.partition": "dirichlet", "data.alpha": 0.5,
        "sampling.per_round": 20, "eval.every": 1000}


def cell(data, attack: str, defense: str, fraction: float, rounds: int, seed: int) -> dict:
    overrides = {**BASE, "rounds": rounds, "seed": seed, **DEFENSES[defense],
                 "robust.byzantine_fraction": fraction or 0.1}
    if attack != "none":
        overrides.update({"attack.kind": attack, "attack.fraction": fraction})
    cfg = load_config(overrides=overrides)
    t0 = time.perf_counter()
    exp = Experiment(cfg, data)
    result = exp.run()
    s = result.summary()
    target = cfg["attack"]["target_label"]
    bd = backdoor_testset(data.test, target)
    bd_acc = evaluate(exp.eval_model, result.state.params, torch.from_numpy(bd.x),
                      torch.from_numpy(bd.y))["accuracy"]
    aborted = sum(1 for r in result.records if r.privacy.get("aborted"))
    return {"attack": attack, "defense": defense, "fraction": fraction, "seed": seed,
            "rounds": s["rounds"], "clean_accuracy": s["final_accuracy"],
            "backdoor_accuracy": bd_acc, "aborted_rounds": aborted,
            "stopped": s.get("stopped", ""), "seconds": time.perf_counter() - t0}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = next(r["clean_accuracy"] for r in rows
                if r["attack"] == "none" and r["defense"] == "fedavg")
    fractions = sorted({r["fraction"] for r in rows if r["attack"] != "none"})
    attacks = ["none", *[a for a in ATTACKS if any(r["attack"] == a for r in rows)]]
    defenses = [d for d in DEFENSES if any(r["defense"] == d for r in rows)]
    fig, axes = plt.subplots(1, len(fractions), figsize=(6.5 * len(fractions), 5.5),
                             squeeze=False)
    for ax, frac in zip(axes[0], fractions):
        grid = np.full((len(attacks), len(defenses)), np.nan)
        for r in rows:
            if r["defense"] in defenses and (r["fraction"] == frac or r["attack"] == "none"):
                grid[attacks.index(r["attack"]), defenses.index(r["defense"])] = \
                    100 * (r["clean_accuracy"] - base)
        im = ax.imshow(grid, cmap="RdYlGn", vmin=-30, vmax=5, aspect="auto")
        for (i, j), v in np.ndenumerate(grid):
            if np.isfinite(v):
                ax.text(j, i, f"{v:+.0f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(defenses)), defenses, rotation=40, ha="right")
        ax.set_yticks(range(len(attacks)), attacks)
        ax.set_title(f"{int(frac * 100)} % malicious\nclean accuracy minus no-attack FedAvg "
                     f"({100 * base:.1f} %), points", fontsize=9)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
    fig.savefig(path, dpi=110, bbox_inches="tight")


def markdown(rows: list[dict]) -> str:
    """Per fraction, a table: attacks down, defenses across, clean accuracy in points
    relative to no-attack FedAvg (backdoor accuracy in brackets for the backdoor row), and
    the best defense of each attack."""
    base = next(r["clean_accuracy"] for r in rows
                if r["attack"] == "none" and r["defense"] == "fedavg")
    defenses = [d for d in DEFENSES if any(r["defense"] == d for r in rows)]
    out = [f"No-attack FedAvg: {100 * base:.1f} %.", ""]
    for frac in sorted({r["fraction"] for r in rows if r["attack"] != "none"}):
        out += [f"**{int(100 * frac)} % malicious** (points vs. no-attack FedAvg; "
                f"backdoor accuracy in brackets)", "",
                "| attack | " + " | ".join(defenses) + " | best |",
                "|---" * (len(defenses) + 2) + "|"]
        for attack in ["none", *ATTACKS]:
            cells, best = [], None
            for d in defenses:
                r = next((r for r in rows if r["attack"] == attack and r["defense"] == d
                          and (r["fraction"] == frac or attack == "none")), None)
                if r is None:
                    cells.append("")
                    continue
                diff = 100 * (r["clean_accuracy"] - base)
                cell = f"{diff:+.1f}"
                if attack == "backdoor":
                    cell += f" [{100 * r['backdoor_accuracy']:.0f}]"
                if r.get("aborted_rounds"):
                    cell += f" ({r['aborted_rounds']} refused)"
                cells.append(cell)
                if best is None or diff > best[0]:
                    best = (diff, d)
            if any(cells):
                label = "" if best is None else f"{best[1]} ({best[0]:+.1f})"
                out.append(f"| {attack} | " + " | ".join(cells) + f" | {label} |")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/robust.jsonl")
    p.add_argument("--attacks", default=",".join(ATTACKS))
    p.add_argument("--defenses", default=",".join(DEFENSES))
    p.add_argument("--fractions", default="0.1,0.2")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", help="write the heat map PNG here from --out and stop")
    p.add_argument("--markdown", action="store_true",
                   help="print the tables for the docs from --out and stop")
    args = p.parse_args(argv)
    out = Path(args.out)
    done = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    if args.plot:
        plot(done, Path(args.plot))
        return 0
    if args.markdown:
        print(markdown(done))
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    have = {(r["attack"], r["defense"], r["fraction"], r["seed"]) for r in done}
    todo = [("none", d, 0.0) for d in args.defenses.split(",")]
    todo += [(a, d, float(f)) for f in args.fractions.split(",")
             for a in args.attacks.split(",") for d in args.defenses.split(",")]
    data = load_data(load_config(overrides=BASE))
    with out.open("a") as sink:
        for attack, defense, frac in todo:
            if (attack, defense, frac, args.seed) in have:
                continue
            row = cell(data, attack, defense, frac, args.rounds, args.seed)
            line = json.dumps(row)
            print(line, flush=True)
            sink.write(line + "\n")
            sink.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
