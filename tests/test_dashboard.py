"""The run dashboard: figures equal the run files, strings are escaped, it renders in Chromium.

The fixture (tests/fixtures/dashboard/) is the output of real tiny runs, kept as produced:
    small.csv = synthetic_ratings(n_users=45, n_items=24, density=0.3, seed=2) with item
    i19 renamed to '<img src=x onerror=alert(1)>&"x"'; levels.csv = u1 at 1.0, u2 at 0.5;
    three times: mpc-rec run --data small.csv --epochs 4 --top-k 3 --learning-rate 0.01
      --release threshold --release-epsilon 2 --release-users levels.csv --release-budget 5
      --ledger-dir L --out runN   (run/ is the third: its users have spent their budget)
    sweep.json: scripts/dp_sweep.py --data small.csv --epsilons 1 4 -- --epochs 4 --learning-rate 0.01
"""

import json
import shutil
import subprocess
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import pytest

from conftest import mpc_rec_command, run_cli
from mpc_rec.dashboard import format_bytes, format_value, write_dashboard

FIXTURE = Path(__file__).parent / "fixtures" / "dashboard"
EVIL = '<img src=x onerror=alert(1)>&"x"'
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars"]


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """A copy of the fixture laid out as a run inside a sweep folder."""
    shutil.copytree(FIXTURE, tmp_path / "sweep")
    return tmp_path / "sweep" / "run"


class _Figures(HTMLParser):
    """Collects every figure (data-key, data-value, shown text), the tags seen, and body attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.figures, self.tags, self.body, self._open = [], [], {}, None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        if tag == "body":
            self.body = attrs
        if tag == "span" and attrs.get("class") == "fig":
            self._open = [attrs["data-key"], attrs["data-value"], ""]

    def handle_data(self, data):
        if self._open is not None:
            self._open[2] += data

    def handle_endtag(self, tag):
        if tag == "span" and self._open is not None:
            self.figures.append(tuple(self._open))
            self._open = None


def _parse(page: str) -> _Figures:
    parser = _Figures()
    parser.feed(page)
    return parser


def _source(run_dir: Path, key: str):
    """The value a data-key names, read from the run's files (never from the page)."""
    parts = key.split(".")
    if parts[0] == "sweep":
        node, parts = json.loads((run_dir.parent / "sweep.json").read_text()), parts[1:]
    elif (run_dir / parts[0] / "party.json").exists():
        node, parts = json.loads((run_dir / parts[0] / "party.json").read_text()), parts[1:]
    else:
        node = json.loads((run_dir / "summary.json").read_text())
    for part in parts:
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def _check_figures(parser: _Figures, run_dir: Path) -> set[str]:
    keys = set()
    for key, value, text in parser.figures:
        expected = _source(run_dir, key)
        assert value == repr(expected), key
        if isinstance(expected, (int, float)) and not isinstance(expected, bool):
            assert text in {format_value(expected), format_bytes(expected), f"{expected:.1%}"}, (key, text)
        else:
            assert text == format_value(expected), key
        keys.add(key)
    summary = json.loads((run_dir / "summary.json").read_text())
    names = [p["name"] for p in summary["parties"]]
    required = {"metrics.rmse_secure", "metrics.rmse_plaintext", "metrics.rmse_difference", "metrics.top_k_agreement",
                "timing.secure_epoch_s", "timing.secure_run_s", "privacy.epsilon", "release.epsilon",
                "sweep.points.0.rmse_secure", "sweep.points.1.epsilon"}
    required |= {f"parties.{i}.bytes_sent" for i in range(len(names))}
    required |= {f"budget.ledgers.{n}.{k}" for n in names for k in ("spent_epsilon", "left_epsilon")}
    required |= {f"release.parties.{n}.releases.{k}" for n in names for k in ("new", "repeated")}
    assert required <= keys, required - keys
    assert any(k.startswith(f"{names[0]}.release.users.") and k.endswith(".left") for k in keys)
    return keys


def _check_escaping(parser: _Figures, page: str) -> None:
    assert not [attrs for tag, attrs in parser.tags if tag == "img"], "an item name became an element"
    assert not [attrs for tag, attrs in parser.tags if any(a.startswith("on") for a in attrs)]
    assert EVIL not in page and "&lt;img src=x onerror=alert(1)&gt;" in page


def test_page_figures_equal_the_run_files_and_strings_are_escaped(run_dir):
    page = write_dashboard(run_dir).read_text()
    parser = _parse(page)
    _check_figures(parser, run_dir)
    _check_escaping(parser, page)
    # self-contained: nothing to fetch, and the page forbids fetching
    assert "default-src 'none'" in page
    assert not [a for tag, a in parser.tags for name in ("src", "href") if a.get(name)]


def test_fixture_run_spent_its_users_budget():
    """The fixture is the third run on one ledger: budgets of 5 at 2 a release stop new draws."""
    summary = json.loads((FIXTURE / "run" / "summary.json").read_text())
    counts = summary["release"]["parties"]["party-0"]["releases"]
    assert counts["repeated"] > 0 and counts["new"] > 0  # u1 and u2 chose smaller epsilons


def test_cli_writes_the_page_and_refuses_a_folder_without_a_run(run_dir, tmp_path):
    done = run_cli("dashboard", str(run_dir), timeout=60)
    assert done.returncode == 0, done.stderr
    assert (run_dir / "dashboard.html").exists()
    (tmp_path / "empty").mkdir()
    done = run_cli("dashboard", str(tmp_path / "empty"), timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip() == f"mpc-rec: error: {tmp_path / 'empty' / 'summary.json'}: not found (is this an mpc-rec run folder?)"


def test_serve_answers_on_localhost_only(run_dir):
    server = subprocess.Popen([*mpc_rec_command(), "dashboard", str(run_dir), "--serve", "--port", "0"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        server.stdout.readline()  # "dashboard: PATH"
        announced = server.stdout.readline().split()[1]
        assert announced.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(announced, timeout=10) as response:
            assert response.read() == (run_dir / "dashboard.html").read_bytes()
    finally:
        server.terminate()
        server.wait(timeout=10)


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("chromium is not installed (scripts/setup.sh installs Debian's chromium where apt-get exists)")
    return path


def test_chromium_renders_the_figures_of_the_run(run_dir, tmp_path):
    chromium = _chromium()
    page = write_dashboard(run_dir)
    common = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*common, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    parser = _parse(dom.stdout)
    _check_figures(parser, run_dir)
    _check_escaping(parser, dom.stdout)
    assert parser.body.get("data-ready") == str(len(parser.figures))  # the page's script ran to its end
    shot = tmp_path / "dashboard.png"
    done = subprocess.run([*common, "--window-size=1400,2600", f"--screenshot={shot}", page.as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 50_000  # a rendered page, not a blank one
