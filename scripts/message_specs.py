"""Regenerate (or check) the ``messages`` blocks in protocols/*.md from a real run.

    python scripts/message_specs.py            # run, print the blocks, report differences
    python scripts/message_specs.py --write    # run and rewrite the blocks in protocols/
    python scripts/message_specs.py --transcripts DIR   # use an existing capture of the spec run

The run is the small spec configuration of ``mpc_rec.audit.spec.SPEC_RUN`` with every
party's received messages recorded. After a protocol change, run with --write, read
the diff of protocols/*.md (it is the change in what goes over the wire), and commit it.
Ends with a JSON object on its last line: {"differences": N, "written": bool}.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from mpc_rec.audit import spec
from mpc_rec.audit.runner import ground_truth
from mpc_rec.audit.transcript import Transcript
from mpc_rec.data import write_ratings_csv
from mpc_rec.launch import DEFAULT_PRIVACY, RunOptions, run_local
from mpc_rec.model import TrainConfig

PROTOCOLS = Path(__file__).resolve().parents[1] / "protocols"


def capture_spec_run(folder: Path) -> Path:
    run = spec.SPEC_RUN
    data = folder / "spec.csv"
    write_ratings_csv(spec.spec_ratings(), data)
    options = RunOptions(
        parties=run["parties"], data=data, train=TrainConfig(epochs=run["epochs"], factors=run["factors"]),
        top_k=run["top_k"], out=folder / "out", dealer=run["dealer"], progress=False,
        privacy=dict(DEFAULT_PRIVACY, budget_epsilon=1e9) if run["dp"] == "on" else None,
        ledger_dir=folder / "ledger", transcript_dir=folder / "transcript",
    )
    run_local(options)
    return folder / "transcript"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="rewrite the blocks in protocols/*.md")
    parser.add_argument("--transcripts", type=Path, help="transcript folder of an earlier spec run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mpc-rec-spec-") as tmp:
        folder = args.transcripts or capture_spec_run(Path(tmp))
        run = spec.SPEC_RUN
        truth = ground_truth(spec.spec_ratings(), run["parties"], seed=0)
        symbols = spec.symbols_for(truth.rows, len(truth.catalogue), run["factors"], run["top_k"])
        transcripts = [Transcript(folder, rank) for rank in range(run["parties"])]
        blocks = spec.render_protocol_blocks(transcripts, symbols)
        for name, block in blocks.items():
            print(f"--- protocols/{name}\n{block}\n")
            if args.write:
                spec.replace_block(PROTOCOLS / name, block)
        problems = spec.check_protocol_files(PROTOCOLS, transcripts, symbols)
    for problem in problems:
        print("differs:", problem)
    print(json.dumps({"differences": len(problems), "written": args.write}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
