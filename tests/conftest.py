import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ML100K = REPO.parent / "shared" / "datasets" / "ml-100k" / "ml-100k.inter"


def mpc_rec_command() -> list[str]:
    """The installed console script when present, so tests exercise the real entry point."""
    script = Path(sys.executable).with_name("mpc-rec")
    return [str(script)] if script.exists() else [sys.executable, "-m", "mpc_rec"]


def run_cli(*args: str, timeout: float = 300, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*mpc_rec_command(), *args], capture_output=True, text=True, timeout=timeout, cwd=cwd,
        stdin=subprocess.DEVNULL,
    )


def assert_one_line_error(done: subprocess.CompletedProcess, code: int, *words: str) -> None:
    """``done`` failed with exit ``code`` and one line on stderr, naming each of ``words``."""
    lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
    assert done.returncode == code, done.stderr
    assert len(lines) == 1 and lines[0].startswith("mpc-rec: error:"), done.stderr
    for word in words:
        assert word in lines[0], lines[0]


@pytest.fixture
def ml100k() -> Path:
    if not ML100K.exists():
        pytest.skip(f"MovieLens 100K not present at {ML100K} (shared datasets folder absent)")
    return ML100K
