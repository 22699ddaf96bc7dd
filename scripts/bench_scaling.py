#!/usr/bin/env python3
"""Secure epoch time against data size (users x items) and against the number of parties.

Synthetic data sets shaped like MovieLens (ML-100K 943 x 1682 up to ML-1M 6040 x 3706,
about 4-6% dense) from mpc-rec's own generator; each point is one `mpc-rec run` (real
party processes and the TTP dealer on loopback, no scoring), measured by
``bench_training.measure``. Fits: the exponent of time ~ (users x items)^a by least
squares in log-log, and time ~ a + b N over party counts. The last line printed is all
figures as one JSON object.

    .venv/bin/python scripts/bench_scaling.py [--epochs 2] [--parties-at-size 2 3 4]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_training import measure  # noqa: E402

from mpc_rec.data import synthetic_ratings, write_ratings_csv  # noqa: E402

SIZES = [(943, 1682, 0.063), (2000, 2400, 0.05), (4000, 3000, 0.045), (6040, 3706, 0.045)]


def _fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares intercept and slope."""
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)
    return mean_y - slope * mean_x, slope


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--size-parties", type=int, default=2, help="party count for the size sweep")
    parser.add_argument("--parties-at-size", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--sizes", type=int, default=len(SIZES), help="how many of the sizes to run (smallest first)")
    args = parser.parse_args()
    figures: dict = {"epochs": args.epochs, "by_size": [], "by_parties": []}
    with tempfile.TemporaryDirectory() as folder:
        paths = []
        for users, items, density in SIZES[: args.sizes]:
            path = Path(folder) / f"synthetic-{users}x{items}.csv"
            write_ratings_csv(synthetic_ratings(n_users=users, n_items=items, density=density, seed=1), path)
            paths.append((users, items, path))
        for users, items, path in paths:
            run = measure(path, args.size_parties, args.epochs)
            point = {"users": users, "items": items, "parties": args.size_parties, **run}
            figures["by_size"].append(point)
            print(f"{users} x {items}, {args.size_parties} parties: secure epoch {run['secure_epoch_s']:.3f} s "
                  f"(median {run['secure_median_epoch_s']:.3f}), "
                  f"plaintext {run['plaintext_epoch_s']:.4f} s ({run['ratio']}x), peak MB {run['peak_memory_mb_per_party']}",
                  flush=True)
        users, items, path = paths[0]
        for parties in args.parties_at_size:
            run = measure(path, parties, args.epochs)
            figures["by_parties"].append({"users": users, "items": items, "parties": parties, **run})
            print(f"{users} x {items}, {parties} parties: secure epoch {run['secure_epoch_s']:.3f} s "
                  f"(median {run['secure_median_epoch_s']:.3f}; {run['ratio']}x plaintext)", flush=True)
    if len(figures["by_size"]) >= 2:
        xs = [math.log(p["users"] * p["items"]) for p in figures["by_size"]]
        ys = [math.log(p["secure_epoch_s"]) for p in figures["by_size"]]
        figures["size_exponent"] = round(_fit_line(xs, ys)[1], 3)
        print(f"fit: secure epoch ~ (users x items)^{figures['size_exponent']}")
    if len(figures["by_parties"]) >= 2:
        intercept, slope = _fit_line([p["parties"] for p in figures["by_parties"]],
                                     [p["secure_epoch_s"] for p in figures["by_parties"]])
        figures["parties_fit_s"] = {"intercept": round(intercept, 4), "per_party": round(slope, 4)}
        print(f"fit: secure epoch ~ {intercept:.3f} s + {slope:.3f} s per party")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
