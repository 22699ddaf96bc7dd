#!/usr/bin/env python3
"""Federated mode against the joint mode on MovieLens 100K, and a synthetic 100,000-user run.

For each epsilon (delta 1e-5, user level): `mpc-rec run --mode federated` (H holders,
N compute parties, TTP dealer, 2048-bit Paillier) and `mpc-rec run` (joint mode, same
data, same seed, same 80/20 split), both from this checkout, one after the other, both
with --benchmark-exact-rmse. Test RMSE from each summary: the noised release (DP) and
the exact one (NOT covered by the DP guarantee); recall@10 for the federated mode from
its evaluation round (noised release and exact sums, as for the RMSE), for the joint
mode from its recommendations.csv against the same held-out split
(relevant: held-out ratings >= 4; users without a relevant item left out), as
scripts/release_eval.py computes it. Then a synthetic run with --synthetic-users users
(vectorised generator, mpc_rec.federated.model.synthetic_local): time per round and peak
memory per holder and per compute party. The last line printed is one JSON object.

    nice -n 19 .venv/bin/python scripts/bench_federated.py [--epsilons 1 4 8] [--joint-epsilons 1 4 8]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEFAULT_DATA = REPO.parent / "shared" / "datasets" / "ml-100k" / "ml-100k.inter"


def mpc_rec(args: list[str]) -> None:
    done = subprocess.run([sys.executable, "-m", "mpc_rec", "run", *args], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"bench_federated: mpc-rec run {' '.join(args)} failed: {done.stderr.strip().splitlines()[-1:]}")


def joint_recall(out: Path, data: Path, seed: int) -> float:
    from mpc_rec.data import load_ratings, split_train_test

    train, test = split_train_test(load_ratings(data), test_fraction=0.2, seed=seed)
    relevant = defaultdict(set)
    for user, item, value in zip(test.users, test.items, test.values):
        if value >= 4:
            relevant[user].add(item)
    shown = defaultdict(list)
    for folder in out.glob("party-*"):
        for line in (folder / "recommendations.csv").read_text().splitlines()[1:]:
            user, _, item = line.split(",")
            shown[user].append(item)
    users = [u for u in relevant if u in shown]
    return float(np.mean([len(set(shown[u][:10]) & relevant[u]) / len(relevant[u]) for u in users]))


def federated_row(summary: dict) -> dict:
    holders = summary["holders"]
    metrics = summary["metrics"]
    return {"rmse": metrics.get("rmse_exact_unprotected"), "rmse_noised_release": metrics["rmse"],
            "recall_at_10": metrics.get("recall_exact_unprotected"), "recall_noised_release": metrics["recall_at_10"],
            "epsilon": summary["privacy"].get("epsilon"), "round_s_mean": summary["timing"]["round_s_mean"],
            "run_s": summary["timing"]["run_s"],
            "bytes_per_holder_per_round": float(np.mean([h["bytes_sent_per_round"] for h in holders])),
            "ciphertexts_per_holder_per_round": holders[0]["ciphertexts_per_round"],
            "holder_encrypt_s": float(np.mean([h["encrypt_s"] for h in holders])),
            "holder_peak_mb": max(h["peak_memory_mb"] for h in holders),
            "party_peak_mb": max(p["peak_memory_mb"] for p in summary["parties"]),
            "item_mean_baseline": summary["metrics"]["rmse_item_mean_baseline"]}


def _figure(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def write_synthetic(path: Path, users: int, items: int, per_user: int, seed: int) -> int:
    from mpc_rec.federated.model import synthetic_local

    u, i, r = synthetic_local(users, items, ratings_per_user=per_user, seed=seed)
    table = np.stack([u + 1, i + 1, r.astype(np.int64)], axis=1)
    np.savetxt(path, table, fmt="%d", delimiter=",", header="user,item,rating", comments="")
    return len(r)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--epsilons", type=float, nargs="*", default=[1.0, 4.0, 8.0])
    parser.add_argument("--joint-epsilons", type=float, nargs="*", default=[1.0, 4.0, 8.0])
    parser.add_argument("--holders", type=int, default=4)
    parser.add_argument("--parties", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--synthetic-users", type=int, default=100_000)
    parser.add_argument("--synthetic-items", type=int, default=1000)
    parser.add_argument("--synthetic-rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-federated-"))
    out.mkdir(parents=True, exist_ok=True)
    ledger = out / "ledger"
    common = ["--parties", str(args.parties), "--budget-epsilon", "1000", "--ledger-dir", str(ledger), "--timeout", "120"]
    result: dict = {"ml100k": {}, "joint": {}, "holders": args.holders, "parties": args.parties, "rounds": args.rounds}
    if args.data.exists():
        for eps in args.epsilons:
            run = out / f"fed-eps{eps:g}"
            mpc_rec(["--mode", "federated", "--holders", str(args.holders), "--data", str(args.data), "--epochs",
                     str(args.rounds), "--epsilon", str(eps), "--out", str(run), "--benchmark-exact-rmse", *common])
            row = federated_row(json.loads((run / "summary.json").read_text()))
            result["ml100k"][f"{eps:g}"] = row
            print(f"federated eps={eps:g}: RMSE {row['rmse']:.4f} (noised release {_figure(row['rmse_noised_release'])}) "
                  f"recall@10 {row['recall_at_10']:.4f} (noised release {_figure(row['recall_noised_release'])}) "
                  f"round {row['round_s_mean']:.1f} s, {row['bytes_per_holder_per_round'] / 1024:.0f} KiB/holder/round",
                  flush=True)
        for eps in args.joint_epsilons:
            run = out / f"joint-eps{eps:g}"
            started = time.perf_counter()
            # the joint mode's own RMSE output is a noised, user-weighted release; compare exact with exact
            mpc_rec(["--data", str(args.data), "--epsilon", str(eps), "--out", str(run), "--benchmark-exact-rmse", *common])
            summary = json.loads((run / "summary.json").read_text())
            row = {"rmse": summary["metrics"]["rmse_exact_unprotected"], "rmse_noised_release": summary["metrics"]["rmse_secure"],
                   "recall_at_10": joint_recall(run, args.data, 0),
                   "epsilon": summary["privacy"]["epsilon"], "run_s": time.perf_counter() - started,
                   "epochs": summary["config"]["train"]["epochs"]}
            result["joint"][f"{eps:g}"] = row
            print(f"joint eps={eps:g}: RMSE {row['rmse']:.4f} recall@10 {row['recall_at_10']:.4f} ({row['run_s']:.0f} s)",
                  flush=True)
    else:
        print(f"bench_federated: {args.data} not found; ML-100K part skipped")
    if args.synthetic_users:
        data = out / "synthetic.csv"
        ratings = write_synthetic(data, args.synthetic_users, args.synthetic_items, 20, seed=1)
        run = out / "synthetic"
        mpc_rec(["--mode", "federated", "--holders", str(args.holders), "--data", str(data), "--epochs",
                 str(args.synthetic_rounds), "--epsilon", "8", "--out", str(run), "--benchmark-exact-rmse", *common])
        row = federated_row(json.loads((run / "summary.json").read_text()))
        row.update(users=args.synthetic_users, items=args.synthetic_items, ratings=ratings)
        result["synthetic"] = row
        print(f"synthetic {args.synthetic_users} users x {args.synthetic_items} items ({ratings} ratings): round "
              f"{row['round_s_mean']:.1f} s, peak memory holder {row['holder_peak_mb']:.0f} MB, compute party "
              f"{row['party_peak_mb']:.0f} MB, RMSE {row['rmse']:.4f} (item mean {row['item_mean_baseline']:.4f})",
              flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
