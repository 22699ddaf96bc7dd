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
"${pip[@]}" -e ".[test,report,ann]"
.venv/bin/python -c "import mpc_rec.compat as c; c.import_crypten()" >/dev/null
# Headless Chromium for the dashboard test (Debian's package); skipped where it is
# present already or where apt-get is not available (the test then skips, saying why).
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    sudo_cmd=(); [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && sudo_cmd=(sudo -n)
    { "${sudo_cmd[@]}" apt-get update -qq && "${sudo_cmd[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >/dev/null 2>&1 \
        || echo "setup: could not install chromium; the dashboard browser test will be skipped" >&2
fi
echo "mpc-rec environment ready in .venv" >&2
