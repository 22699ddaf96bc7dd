#!/usr/bin/env bash
# Creates .venv in the repository root and installs mpc-rec with pinned dependencies.
# Safe to re-run: an up-to-date environment is left as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
# Pin torch first: an unpinned torch pulls the multi-GB CUDA build.
"${pip[@]}" torch==2.13.0
# CrypTen's declared dependencies are broken on torch 2.13 (see pyproject.toml).
"${pip[@]}" --no-deps crypten==0.4.1
"${pip[@]}" -e ".[test,report]"
.venv/bin/python -c "import mpc_rec.compat as c; c.import_crypten()" >/dev/null
echo "mpc-rec environment ready in .venv" >&2
