#!/usr/bin/env python3
"""Precision@10 / recall@10 of the release policies on MovieLens 100K.

Runs `mpc-rec run` once (real parties, TTP dealer, --release exact, top-10): each party's
recommendations.csv is then exactly the ranked top-10 that MPC revealed to it. The
threshold policy is a local step of the holder on that list (protocols/release.md), so
the script applies the holder's own code (mpc_rec.release) to those lists at each
epsilon, drawing from the OS CSPRNG, averaged over --draws releases per user. Relevant
items: the user's held-out test ratings >= 4 (the run's own split, re-made from its
seed). Users with no relevant test item are left out. The last line printed is one JSON
object.

    .venv/bin/python scripts/release_eval.py [--data PATH] [--epsilons 1 2 4 8 16 32] [-- RUN OPTIONS]
"""

from __future__ import annotations

import argparse
import csv
import json
import secrets
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEFAULT_DATA = REPO.parent / "shared" / "datasets" / "ml-100k" / "ml-100k.inter"
K = 10


def secure_run(args: argparse.Namespace) -> Path:
    out = args.out / "run"
    command = [sys.executable, "-m", "mpc_rec", "run", "--data", str(args.data), "--parties", str(args.parties),
               "--top-k", str(K), "--release", "exact", "--out", str(out), "--timeout", "600", "--no-progress",
               "--ledger-dir", str(args.out / "ledger"), "--budget-epsilon", "1000", *args.run_options]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"release_eval: the secure run failed: {done.stderr.strip()}")
    print(done.stdout.strip(), flush=True)
    return out


def shown_lists(run: Path, summary: dict) -> dict[str, list[str]]:
    lists: dict[str, list[str]] = defaultdict(list)
    for party in summary["parties"]:
        with open(run / party["name"] / "recommendations.csv", newline="") as handle:
            for row in csv.DictReader(handle):
                lists[row["user"]].append(row["item"])  # written in rank order
    return lists


def scores(hits: float, relevant: int) -> tuple[float, float]:
    return hits / K, hits / relevant


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--parties", type=int, default=3)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0, 16.0, 32.0])
    parser.add_argument("--draws", type=int, default=20, help="threshold releases per user and epsilon")
    parser.add_argument("--out", type=Path, default=Path("release-eval"))
    parser.add_argument("run_options", nargs=argparse.REMAINDER, help="passed to mpc-rec run (after --)")
    args = parser.parse_args()
    args.run_options = [a for a in args.run_options if a != "--"]
    if not args.data.exists():
        sys.exit(f"release_eval: data file {args.data} not found (pass --data)")
    from mpc_rec.data import load_ratings, split_train_test
    from mpc_rec.release import draw_threshold, threshold_plan

    run = secure_run(args)
    summary = json.loads((run / "summary.json").read_text())
    config = summary["config"]
    ratings = load_ratings(args.data, rating_range=tuple(config["rating_range"]))
    train, test = split_train_test(ratings, test_fraction=config["test_fraction"], seed=config["train"]["seed"])
    catalogue = ratings.item_ids()
    rated, relevant = defaultdict(set), defaultdict(set)
    for user, item in zip(train.users, train.items):
        rated[user].add(item)
    for user, item, value in zip(test.users, test.items, test.values):
        if value >= 4:
            relevant[user].add(item)
    lists = shown_lists(run, summary)
    users = sorted(u for u in relevant if u in lists)
    rng = secrets.SystemRandom()
    totals = {"exact": [0.0, 0.0]}
    uniform = [0.0, 0.0]
    for eps in args.epsilons:
        totals[f"threshold eps={eps:g}"] = [0.0, 0.0]
    priority = {}
    for user in users:
        ranked = lists[user]
        taken = rated[user] | set(ranked)
        others = [i for i in catalogue if i not in taken]
        n = len(ranked) + len(others)
        rel = relevant[user]
        p, r = scores(len(set(ranked) & rel), len(rel))
        totals["exact"][0] += p
        totals["exact"][1] += r
        p, r = scores(K * len(rel) / n, len(rel))  # expected hits of a uniformly random list
        uniform[0] += p
        uniform[1] += r
        for eps in args.epsilons:
            plan = threshold_plan(n, K, eps, len(ranked))
            priority.setdefault(eps, []).append(plan.priority)
            hits = sum(len(set(draw_threshold(ranked, others, plan, rng)) & rel) for _ in range(args.draws)) / args.draws
            p, r = scores(hits, len(rel))
            totals[f"threshold eps={eps:g}"][0] += p
            totals[f"threshold eps={eps:g}"][1] += r
    rows = {name: {"precision_at_10": t[0] / len(users), "recall_at_10": t[1] / len(users)} for name, t in totals.items()}
    rows["uniform random (epsilon -> 0)"] = {"precision_at_10": uniform[0] / len(users), "recall_at_10": uniform[1] / len(users)}
    for eps in args.epsilons:
        sizes = priority[eps]
        rows[f"threshold eps={eps:g}"]["median_priority_set"] = sorted(sizes)[len(sizes) // 2]
    print(f"{'policy':32s} {'P@10':>8s} {'R@10':>8s}")
    for name, row in rows.items():
        print(f"{name:32s} {row['precision_at_10']:8.4f} {row['recall_at_10']:8.4f}")
    figures = {
        "data": str(args.data), "parties": args.parties, "run_options": args.run_options, "users_evaluated": len(users),
        "relevant": "held-out test ratings >= 4", "draws_per_user": args.draws,
        "run_privacy": summary["privacy"]["mode"] if summary["privacy"]["mode"] != "dp" else
        f"({summary['privacy']['epsilon']:.3g}, {summary['privacy']['delta']:g})-DP training",
        "rmse_secure": summary["metrics"]["rmse_secure"], "policies": rows,
    }
    (args.out / "release-eval.json").write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
