#!/usr/bin/env python3
"""Secure vs plaintext training speed, side by side in one run.

For each party count, runs `mpc-rec run` (real party processes and the TTP dealer on
loopback) without scoring, and reads the figures from its summary:
seconds per secure epoch (rank 0's mean; its first and median epoch beside it), seconds
per plaintext epoch of the same algorithm in the same command, their ratio, bytes sent
per party per epoch, and peak memory per party. The default length is the product's
(``TrainConfig.epochs``): the first secure epoch is slower (caches, the dealer's first
bundle), so short runs read higher. The last line printed is all figures as one JSON object.

    .venv/bin/python scripts/bench_training.py [--data PATH] [--parties 2 3] [--epochs 30]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from mpc_rec.model import TrainConfig  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "datasets" / "ml-100k" / "ml-100k.inter"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="ratings file [ML-100K]")
    parser.add_argument("--parties", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    parser.add_argument("--factors", type=int, default=16)
    parser.add_argument("--dealer", choices=["ttp", "insecure-tfp"], default="ttp")
    parser.add_argument("--dp-epsilon", type=float, default=None,
                        help="measure the differentially private step at this epsilon (default: --no-dp)")
    args = parser.parse_args()
    if not args.data.exists():
        sys.exit(f"bench_training: data file {args.data} not found (pass --data)")
    figures = {"data": str(args.data), "epochs": args.epochs, "factors": args.factors, "dealer": args.dealer,
               "dp_epsilon": args.dp_epsilon, "runs": {}}
    for parties in args.parties:
        run = measure(args.data, parties, args.epochs, args.factors, args.dealer, args.dp_epsilon)
        figures["runs"][f"{parties}_parties"] = run
        print(f"{parties} parties: secure epoch {run['secure_epoch_s']:.3f} s (first {run['secure_first_epoch_s']:.3f}, "
              f"median {run['secure_median_epoch_s']:.3f}), plaintext {run['plaintext_epoch_s']:.4f} s, "
              f"ratio {run['ratio']}x; bytes/party/epoch {run['bytes_per_party_per_epoch']}; "
              f"peak MB/party {run['peak_memory_mb_per_party']}", flush=True)
    print(json.dumps(figures))


def measure(data: Path, parties: int, epochs: int, factors: int = 16, dealer: str = "ttp",
            dp_epsilon: float | None = None) -> dict:
    """One `mpc-rec run` without scoring; the figures of its summary."""
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "mpc_rec", "run", "--data", str(data), "--parties", str(parties),
                   "--epochs", str(epochs), "--factors", str(factors), "--top-k", "0",
                   "--out", out, "--timeout", "300", "--no-progress"]
        if dealer == "insecure-tfp":
            command.append("--insecure-tfp-dealer")
        if dp_epsilon is None:
            command.append("--no-dp")
        else:
            command += ["--epsilon", str(dp_epsilon), "--ledger-dir", str(Path(out) / "ledger")]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"bench: {parties}-party run on {data} failed: {done.stderr.strip()}")
        summary = json.loads((Path(out) / "summary.json").read_text())
        epoch_seconds = json.loads((Path(out) / "party-0" / "party.json").read_text())["timing"]["epoch_s"]
    timing = summary["timing"]
    return {
        "secure_epoch_s": round(timing["secure_epoch_s"], 4),
        "secure_first_epoch_s": round(epoch_seconds[0], 4),
        "secure_median_epoch_s": round(statistics.median(epoch_seconds), 4),
        "plaintext_epoch_s": round(timing["plaintext_epoch_s"], 5),
        "ratio": round(timing["secure_over_plaintext"], 1),
        "bytes_per_party_per_epoch": [int(p["training_bytes_per_epoch"]) for p in summary["parties"]],
        "rounds_per_epoch": [p["training_rounds_per_epoch"] for p in summary["parties"]],
        "peak_memory_mb_per_party": [round(p["peak_memory_mb"], 1) for p in summary["parties"]],
        "rmse_secure": round(summary["metrics"]["rmse_secure"], 4),
        "rmse_plaintext": round(summary["metrics"]["rmse_plaintext"], 4),
    }


if __name__ == "__main__":
    main()
