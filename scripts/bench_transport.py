#!/usr/bin/env python3
"""Seconds per secure epoch over the TLS transport vs plain gloo, side by side in one run.

Runs `mpc-rec run` (real party processes and the TTP dealer on loopback, no scoring,
--no-dp) alternately with `--transport gloo` and `--transport tls`, `--repeats` times
each, and compares the median seconds per secure epoch (rank 0's mean over the run's
epochs). Data: MovieLens 100K from ../shared/datasets, or `--data PATH`; when neither
exists, a synthetic set of the same shape (943 users x 1682 items, ~100K ratings) made
by mpc_rec.data.synthetic_ratings, and the output says so. The last line printed is all
figures as one JSON object, with `tls_over_gloo` (target: at most 1.3).

    .venv/bin/python scripts/bench_transport.py [--data PATH] [--parties 3] [--epochs 3] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "datasets" / "ml-100k" / "ml-100k.inter"


def _synthetic(folder: Path) -> Path:
    from mpc_rec.data import synthetic_ratings, write_ratings_csv

    path = folder / "synthetic-ml100k-shape.csv"
    write_ratings_csv(synthetic_ratings(n_users=943, n_items=1682, density=0.063, seed=0), path)
    return path


def _run(data: Path, transport: str, args: argparse.Namespace, out: Path) -> dict:
    command = [sys.executable, "-m", "mpc_rec", "run", "--data", str(data), "--parties", str(args.parties),
               "--epochs", str(args.epochs), "--factors", str(args.factors), "--top-k", "0", "--no-dp",
               "--out", str(out), "--timeout", "300", "--no-progress", "--transport", transport]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(command, capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        sys.exit(f"bench_transport: {transport} run failed: {done.stderr.strip()}")
    summary = json.loads((out / "summary.json").read_text())
    return {"secure_epoch_s": summary["timing"]["secure_epoch_s"],
            "bytes_per_party_per_epoch": [int(p["training_bytes_per_epoch"]) for p in summary["parties"]],
            "rmse_secure": summary["metrics"]["rmse_secure"],
            # CPU seconds of the whole run (all processes, set-up and evaluation included):
            # less sensitive than wall time to other load on a shared machine.
            "cpu_s": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="ratings file [ML-100K]")
    parser.add_argument("--parties", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--factors", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2, help="runs per transport, interleaved")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        data, source = args.data, str(args.data)
        if not data.exists():
            data = _synthetic(scratch)
            source = f"synthetic stand-in for ML-100K ({args.data} absent): 943 users x 1682 items, density 0.063"
            print(f"bench_transport: {source}", flush=True)
        runs: dict[str, list[dict]] = {"gloo": [], "tls": []}
        for repeat in range(args.repeats):
            for transport in ("gloo", "tls"):
                result = _run(data, transport, args, scratch / f"{transport}-{repeat}")
                runs[transport].append(result)
                print(f"{transport} run {repeat + 1}: {result['secure_epoch_s']:.3f} s per secure epoch, "
                      f"{result['cpu_s']:.1f} CPU s for the whole run, "
                      f"bytes/party/epoch {result['bytes_per_party_per_epoch']}", flush=True)
    median = {t: statistics.median(r["secure_epoch_s"] for r in runs[t]) for t in runs}
    figures = {
        "data": source, "parties": args.parties, "epochs": args.epochs, "factors": args.factors,
        "repeats": args.repeats,
        "gloo_epoch_s": round(median["gloo"], 4), "tls_epoch_s": round(median["tls"], 4),
        "tls_over_gloo": round(median["tls"] / median["gloo"], 3),
        "bytes_per_party_per_epoch": {t: runs[t][0]["bytes_per_party_per_epoch"] for t in runs},
        "epoch_s_each_run": {t: [round(r["secure_epoch_s"], 4) for r in runs[t]] for t in runs},
        "run_cpu_s_each_run": {t: [round(r["cpu_s"], 1) for r in runs[t]] for t in runs},
        "tls_over_gloo_run_cpu": round(statistics.median(r["cpu_s"] for r in runs["tls"])
                                       / statistics.median(r["cpu_s"] for r in runs["gloo"]), 3),
        "target_tls_over_gloo": 1.3,
    }
    print(f"median secure epoch: gloo {median['gloo']:.3f} s, tls {median['tls']:.3f} s, "
          f"tls/gloo {figures['tls_over_gloo']}x (target <= 1.3x)")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
