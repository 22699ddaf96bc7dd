"""The real console script: the whole run, bad input, and failing parties."""

import json
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import mpc_rec_command, run_cli
from mpc_rec.data import partition_users, split_train_test, synthetic_ratings, write_ratings_csv
from mpc_rec.launch import RunOptions, write_deployment
from mpc_rec.model import TrainConfig


@pytest.fixture
def small_data(tmp_path) -> Path:
    path = tmp_path / "small.csv"
    write_ratings_csv(synthetic_ratings(n_users=45, n_items=24, density=0.3, seed=2), path)
    return path


@pytest.mark.parametrize("parties", [2, 3])
def test_run_end_to_end(small_data, tmp_path, parties):
    out = tmp_path / "out"
    done = run_cli("run", "--parties", str(parties), "--data", str(small_data), "--epochs", "8",
                   "--top-k", "3", "--out", str(out), "--learning-rate", "0.01", "--no-dp")
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "summary.json").read_text())
    metrics = summary["metrics"]
    assert abs(metrics["rmse_secure"] - metrics["rmse_plaintext"]) < 0.01
    assert metrics["top_k_agreement"] > 0.9
    assert summary["dealer"] == "ttp"
    assert summary["config"]["train"]["epochs"] == 8
    assert len(summary["parties"]) == parties
    assert all(p["bytes_sent"] > 0 and p["rounds"] > 0 for p in summary["parties"])
    for rank in range(parties):
        lines = (out / f"party-{rank}" / "recommendations.csv").read_text().splitlines()
        assert lines[0] == "user,rank,item" and len(lines) > 1
    assert not list(out.glob(".staging-*"))
    assert "test RMSE: secure" in done.stdout
    assert summary["privacy"]["mode"] == "no-dp" and "NO DIFFERENTIAL PRIVACY" in done.stdout
    assert {r["tag"] for r in summary["reveals"]} == {"DeclaredPublic"}


def test_dp_run_reports_privacy_and_books_the_ledger(small_data, tmp_path):
    ledger = tmp_path / "ledger"
    args = ["run", "--parties", "2", "--data", str(small_data), "--epochs", "3", "--top-k", "2",
            "--epsilon", "3", "--ledger-dir", str(ledger), "--budget-epsilon", "5"]
    first = run_cli(*args, "--out", str(tmp_path / "a"), "--benchmark-exact-rmse")
    assert first.returncode == 0, first.stderr
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    privacy = summary["privacy"]
    assert privacy["mode"] == "dp" and privacy["epsilon"] <= 3.0 + 1e-9 and privacy["delta"] == 1e-5
    assert privacy["sigma_total"] > 0 and privacy["clipping"]["step"] == 0.3  # the DP schedule at epsilon 3
    assert "all but" in privacy["trust"] or "at least 1" in privacy["trust"]
    # every reveal is noised, except the exact metric this benchmarking flag asked for, labelled as such
    exact = [r for r in summary["reveals"] if r["tag"] == "DeclaredPublic"]
    assert len(exact) == 1 and "NOT covered by the DP guarantee" in exact[0]["reason"]
    assert {r["tag"] for r in summary["reveals"]} == {"Noised", "DeclaredPublic"}
    assert 0 < summary["metrics"]["rmse_exact_unprotected"] != summary["metrics"]["rmse_secure"]
    assert "NOT covered" in privacy["benchmark_exact_rmse"] and "NOT DP" in first.stdout
    assert sorted(p.name for p in ledger.iterdir() if p.suffix == ".json") == ["party-0.json", "party-1.json"]
    # a second run of epsilon 3 would exceed the total of 5: refused before any data is read
    second = run_cli(*args, "--out", str(tmp_path / "b"))
    assert second.returncode == 2
    assert "budget" in second.stderr.lower() and len(second.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "b" / "summary.json").exists()
    shown = run_cli("budget", str(ledger / "party-0.json"))
    assert shown.returncode == 0 and "left epsilon 2" in shown.stdout

def test_insecure_dealer_is_labelled(small_data, tmp_path):
    out = tmp_path / "out"
    done = run_cli("run", "--parties", "2", "--data", str(small_data), "--epochs", "2", "--top-k", "2",
                   "--out", str(out), "--insecure-tfp-dealer", "--no-dp")
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dealer"] == "insecure-tfp" and summary["security"].startswith("INSECURE")
    assert "INSECURE" in done.stdout


@pytest.mark.parametrize("content,problem", [
    (None, "no such file"),
    ("", "no ratings"),
    ("user,item\n1,2\n", "rating column"),
    ("user,item,rating\n1,2,x\n", ":2: "),
    ("user,item,rating\n1,2,9\n", "out of range"),
    ("user,item,rating\n1,2,3\n1,2,4\n", "duplicate"),
])
def test_bad_data_is_one_clear_line(tmp_path, content, problem):
    path = tmp_path / "ratings.csv"
    if content is not None:
        path.write_text(content)
    out = tmp_path / "out"
    done = run_cli("run", "--data", str(path), "--out", str(out), "--ledger-dir", str(tmp_path / "l"), timeout=60)
    assert done.returncode == 2
    message = done.stderr.strip().splitlines()
    assert len(message) == 1 and "ratings.csv" in message[0] and problem in message[0], done.stderr
    assert not out.exists() or not any(out.iterdir())


def test_bad_party_config(tmp_path):
    config = tmp_path / "p.toml"
    config.write_text('[party]\nrank = 0\nworld_size = 2\nnmae = "x"\n')
    done = run_cli("party", "--config", str(config), timeout=60)
    assert done.returncode == 2 and "unknown setting party.nmae" in done.stderr


def _deployment(tmp_path, timeout_s=8.0, epochs=200):
    ratings = synthetic_ratings(n_users=40, n_items=20, density=0.3, seed=4)
    train, test = split_train_test(ratings, seed=0)
    options = RunOptions(parties=2, train=TrainConfig(epochs=epochs), timeout_s=timeout_s, top_k=2, privacy=None)
    staging = tmp_path / "staging"
    parties, _ = write_deployment(options, tmp_path, staging, train, test,
                                  partition_users(ratings, 2), ratings.item_ids())
    return parties, staging


def _start(party, tmp_path):
    log = open(tmp_path / f"{party.name}.err", "w")
    return subprocess.Popen([*mpc_rec_command(), "party", "--config", str(party.config)],
                            stdout=subprocess.DEVNULL, stderr=log, stdin=subprocess.DEVNULL)


def _wait_for_training(process, log, epochs=3, limit_s=180):
    """Until the party has trained a few epochs (start-up time depends on machine load)."""
    deadline = time.monotonic() + limit_s
    while f"epoch {epochs}/" not in log.read_text():
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.2)


def test_killed_party_makes_the_others_abort(tmp_path):
    parties, staging = _deployment(tmp_path)
    processes = {p.name: _start(p, tmp_path) for p in parties}
    _wait_for_training(processes["party-0"], tmp_path / "party-0.err")
    processes["party-1"].send_signal(signal.SIGKILL)
    started = time.monotonic()
    code = processes["party-0"].wait(timeout=60)
    elapsed = time.monotonic() - started
    processes["dealer"].wait(timeout=60)
    assert code == 3
    assert elapsed < 8.0 + 15
    error = (tmp_path / "party-0.err").read_text().strip().splitlines()[-1]
    assert error.startswith("mpc-rec: error: party 'party-0' lost contact"), error
    assert not staging.exists() or not any(staging.rglob("*"))


def test_party_that_never_connects(tmp_path):
    parties, staging = _deployment(tmp_path, timeout_s=5.0, epochs=2)
    started = time.monotonic()
    lonely = _start(parties[0], tmp_path)
    code = lonely.wait(timeout=60)
    assert code == 3 and time.monotonic() - started < 5.0 + 20
    assert "mpc-rec: error:" in (tmp_path / "party-0.err").read_text()
    assert not staging.exists()
