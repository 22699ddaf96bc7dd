#!/usr/bin/env python3
"""Privacy/utility sweep: secure test RMSE against epsilon, as a table, JSON and a PNG.

Runs `mpc-rec run` (real parties, TTP dealer) once per epsilon and once with --no-dp,
all with the same data, split and seed, and plots the secure test RMSE against epsilon
with the non-private plaintext reference as a line. Each run books its epsilon in a
fresh ledger inside the output folder. The last line printed is one JSON object.

    .venv/bin/python scripts/dp_sweep.py [--data PATH] [--epsilons 1 2 4 8] [--out DIR] [-- RUN OPTIONS]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "datasets" / "ml-100k" / "ml-100k.inter"


def run_once(args: argparse.Namespace, out: Path, extra: list[str]) -> dict:
    command = [sys.executable, "-m", "mpc_rec", "run", "--data", str(args.data), "--parties", str(args.parties),
               "--top-k", "0", "--out", str(out), "--timeout", "120", "--no-progress",
               "--ledger-dir", str(args.out / "ledger"), "--budget-epsilon", "1000", *args.run_options, *extra]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"dp_sweep: run {' '.join(extra)} failed: {done.stderr.strip()}")
    return json.loads((out / "summary.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--parties", type=int, default=3)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0])
    parser.add_argument("--out", type=Path, default=Path("dp-sweep"))
    parser.add_argument("run_options", nargs=argparse.REMAINDER, help="passed to mpc-rec run (after --)")
    args = parser.parse_args()
    args.run_options = [a for a in args.run_options if a != "--"]
    if not args.data.exists():
        sys.exit(f"dp_sweep: data file {args.data} not found (pass --data)")
    args.out.mkdir(parents=True, exist_ok=True)
    points = []
    for epsilon in args.epsilons:
        # --benchmark-exact-rmse: the noised metric is a user-clipped, user-weighted estimate,
        # so the curve plots the exact RMSE of each DP model (revealed for this benchmark only)
        summary = run_once(args, args.out / f"eps-{epsilon:g}", ["--epsilon", f"{epsilon:g}", "--benchmark-exact-rmse"])
        points.append({"epsilon": summary["privacy"]["epsilon"], "target_epsilon": epsilon,
                       "rmse_exact": summary["metrics"]["rmse_exact_unprotected"],
                       "rmse_noised_release": summary["metrics"]["rmse_secure"],
                       "sigma_total": summary["privacy"]["sigma_total"]})
        print(f"epsilon {epsilon:g}: exact test RMSE of the DP model {points[-1]['rmse_exact']:.4f}, its noised "
              f"release {points[-1]['rmse_noised_release']:.4f} (noise sigma {points[-1]['sigma_total']:.3g})", flush=True)
    exact = run_once(args, args.out / "no-dp", ["--no-dp"])
    figures = {
        "data": str(args.data), "parties": args.parties, "run_options": args.run_options, "points": points,
        "rmse_secure_no_dp": exact["metrics"]["rmse_secure"],
        "rmse_plaintext_no_dp": exact["metrics"]["rmse_plaintext"],
        "delta": 1e-5 if "--delta" not in args.run_options else float(args.run_options[args.run_options.index("--delta") + 1]),
    }
    print(f"no DP: secure test RMSE {figures['rmse_secure_no_dp']:.4f}, plaintext {figures['rmse_plaintext_no_dp']:.4f}")
    figures["plot"] = str(_plot(args.out / "rmse-vs-epsilon.png", points, figures))
    (args.out / "sweep.json").write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures))


def _plot(path: Path, points: list[dict], figures: dict) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([p["epsilon"] for p in points], [p["rmse_exact"] for p in points], "o-", label="secure, user-level DP")
    ax.axhline(figures["rmse_secure_no_dp"], color="tab:green", linestyle=":", label="secure, no DP")
    ax.axhline(figures["rmse_plaintext_no_dp"], color="tab:gray", linestyle="--", label="plaintext, no DP")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("epsilon (delta 1e-5)")
    ax.set_ylabel("test RMSE")
    ax.set_title("mpc-rec: privacy vs. utility")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
