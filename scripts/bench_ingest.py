"""End to end: users' rows from M contributors through Paillier ingest vs the ordinary run.

Runs `mpc-rec run` twice on the same data, split, partition and settings, one after the
other from the same code: once with each compute party holding its own users' rows, once
with the rows coming from --contributors M simulated data holders. Prints the test RMSE
of both, their difference (target: within 0.01), and the ingest figures: time,
ciphertexts and bytes per contributor. The last line is all figures as one JSON object.

    python scripts/bench_ingest.py [--data PATH] [--contributors 100] [--parties 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "ml-100k" / "ml-100k.inter"


def run(args: list[str], out: Path) -> tuple[dict, float]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "mpc_rec", "run", *args, "--out", str(out), "--no-progress"],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"bench_ingest: run failed (exit {done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
    return json.loads((out / "summary.json").read_text()), wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--contributors", type=int, default=100)
    parser.add_argument("--parties", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=None)
    options = parser.parse_args()
    if not options.data.exists():
        sys.exit(f"bench_ingest: {options.data} not found (pass --data)")
    common = ["--data", str(options.data), "--parties", str(options.parties), "--no-dp", "--top-k", "0"]
    if options.epochs:
        common += ["--epochs", str(options.epochs)]
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as folder:
        ordinary, ordinary_wall = run(common, Path(folder) / "ordinary")
        print(f"ordinary run: secure RMSE {ordinary['metrics']['rmse_secure']:.4f}, wall {ordinary_wall:.0f} s", flush=True)
        ingest, ingest_wall = run(common + ["--contributors", str(options.contributors), "--ingest-deadline", "3000"],
                                  Path(folder) / "ingest")
    facts = ingest["ingest"]
    figures = {
        "data": str(options.data),
        "parties": options.parties,
        "contributors": options.contributors,
        "contributors_aggregated": facts["contributors_aggregated"],
        "users_aggregated": facts["users_aggregated"],
        "rmse_ordinary": ordinary["metrics"]["rmse_secure"],
        "rmse_contributors": ingest["metrics"]["rmse_secure"],
        "rmse_difference": abs(ordinary["metrics"]["rmse_secure"] - ingest["metrics"]["rmse_secure"]),
        "rmse_plaintext": ingest["metrics"]["rmse_plaintext"],
        "key_bits": facts["paillier"]["key_bits"],
        "slots_per_ciphertext": facts["paillier"]["slots_per_ciphertext"],
        "ciphertexts_total": facts["ciphertexts_total"],
        "ciphertexts_per_contributor": facts["ciphertexts_per_contributor"],
        "bytes_per_contributor": facts["bytes_per_contributor"],
        "contributor_encrypt_s_mean": facts["contributor_encrypt_s_mean"],
        "ingest_s_aggregator": facts["aggregator_phase_s"],
        "ingest_s_contributors_wall": facts["contributors_wall_s"],
        "key_holder_decrypt_s": facts["key_holder_decrypt_s"],
        "wall_s_ordinary": ordinary_wall,
        "wall_s_contributors": ingest_wall,
        "secure_epoch_s_ordinary": ordinary["timing"]["secure_epoch_s"],
        "secure_epoch_s_contributors": ingest["timing"]["secure_epoch_s"],
    }
    print(f"contributors run: secure RMSE {figures['rmse_contributors']:.4f} "
          f"(difference {figures['rmse_difference']:.5f}; target 0.01), wall {ingest_wall:.0f} s")
    print(f"ingest: {figures['contributors_aggregated']} contributors, {figures['ciphertexts_total']} ciphertexts "
          f"({figures['ciphertexts_per_contributor']:.1f} and {figures['bytes_per_contributor'] / 1024:.0f} KiB per "
          f"contributor), aggregator phase {figures['ingest_s_aggregator']:.0f} s, key holder decryption "
          f"{figures['key_holder_decrypt_s']:.0f} s")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
