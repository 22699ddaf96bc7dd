"""mpc_rec.dp.ledger: budget refusal, digests, tamper detection, atomic and locked writes."""

import json
import multiprocessing
import os

import pytest

from mpc_rec import files
from mpc_rec.dp import ledger as L
from mpc_rec.errors import InputError

DATA = "a3f1" * 16  # a 64-hex-digit data set digest
OTHER = "b7c2" * 16
TS = "2026-01-02T03:04:05+00:00"


def reserve(path, run_id, epsilon, delta=1e-6, dataset=DATA, **kw):
    return L.check_and_reserve(path, dataset=dataset, epsilon=epsilon, delta=delta, run_id=run_id,
                               mechanism="distributed-discrete-gaussian/rdp", timestamp=TS, **kw)


@pytest.fixture
def ledger_path(tmp_path):
    path = tmp_path / "budget.json"
    L.create_ledger(path, total_epsilon=1.0, total_delta=1e-5)
    return path


def test_reservations_add_up_until_the_total_then_refuse(ledger_path):
    for i in range(4):
        reserve(ledger_path, f"run-{i}", 0.25)
    before = ledger_path.read_bytes()
    with pytest.raises(L.BudgetExceeded) as info:
        reserve(ledger_path, "run-4", 0.01)
    message = str(info.value)
    assert "\n" not in message and "budget exceeded" in message and "run-4" in message
    assert isinstance(info.value, InputError) and info.value.exit_code == 2
    assert ledger_path.read_bytes() == before  # nothing recorded for the refused run
    assert L.load_ledger(ledger_path).spent(DATA).epsilon == 1.0


def test_delta_is_budgeted_too_and_data_sets_are_separate(ledger_path):
    reserve(ledger_path, "a", 0.1, delta=9e-6)
    with pytest.raises(L.BudgetExceeded, match="delta"):
        reserve(ledger_path, "b", 0.1, delta=2e-6)
    reserve(ledger_path, "b", 0.9, delta=9e-6, dataset=OTHER)  # another data set: its own budget
    led = L.load_ledger(ledger_path)
    assert led.remaining(DATA).epsilon == pytest.approx(0.9)
    assert led.remaining(OTHER).epsilon == pytest.approx(0.1)


def test_parties_recording_the_same_runs_agree_on_the_digest(tmp_path):
    paths = [tmp_path / f"party{i}.json" for i in range(2)]
    for path in paths:
        L.create_ledger(path, total_epsilon=8.0, total_delta=1e-5)
        reserve(path, "run-1", 2.0)
    digests = {L.ledger_digest(p) for p in paths}
    assert len(digests) == 1
    expected = digests.pop()
    reserve(paths[0], "run-2", 1.0, expected_digest=expected)  # party 0 checks the agreed digest
    assert L.ledger_digest(paths[0]) != L.ledger_digest(paths[1])
    with pytest.raises(L.LedgerError, match="differs from the agreed"):
        reserve(paths[1], "run-3", 1.0, expected_digest=L.ledger_digest(paths[0]))
    # A different timestamp is a different history: parties must pass the agreed one.
    other = tmp_path / "party2.json"
    L.create_ledger(other, total_epsilon=8.0, total_delta=1e-5)
    L.check_and_reserve(other, dataset=DATA, epsilon=2.0, delta=1e-6, run_id="run-1",
                        mechanism="distributed-discrete-gaussian/rdp", timestamp="2026-01-02T03:04:06+00:00")
    assert L.ledger_digest(other) != L.ledger_digest(paths[1])


def test_tampered_or_broken_files_are_refused(ledger_path):
    reserve(ledger_path, "run-1", 0.5)
    doc = json.loads(ledger_path.read_text())
    doc["datasets"][DATA][0]["epsilon"] = 0.05  # someone lowers what was spent
    ledger_path.write_text(json.dumps(doc))
    with pytest.raises(L.LedgerError, match="does not match its digest"):
        L.load_ledger(ledger_path)
    with pytest.raises(L.LedgerError):
        reserve(ledger_path, "run-2", 0.1)  # and no run can reserve against it
    ledger_path.write_text("{not json")
    with pytest.raises(L.LedgerError, match="not valid JSON"):
        L.load_ledger(ledger_path)
    ledger_path.write_text(json.dumps({**doc, "total": {"epsilon": float("nan"), "delta": 0}}))
    with pytest.raises(L.LedgerError):
        L.load_ledger(ledger_path)
    ledger_path.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(L.LedgerError, match="not a budget ledger"):
        L.load_ledger(ledger_path)
    with pytest.raises(L.LedgerError, match="no budget ledger"):
        L.load_ledger(ledger_path.with_name("missing.json"))


def test_digest_recomputed_over_an_overspent_ledger_is_still_refused(ledger_path):
    led = L.Ledger(L.Budget(1.0, 1e-5), {DATA: (L.LedgerEntry("r", 2.0, 1e-6, "m", TS),)})
    ledger_path.write_text(L._render(led))  # digest is right, content is impossible
    with pytest.raises(L.LedgerError, match="past the total"):
        L.load_ledger(ledger_path)


def test_create_never_overwrites_and_requests_are_validated(ledger_path):
    with pytest.raises(L.LedgerError, match="already exists"):
        L.create_ledger(ledger_path, total_epsilon=100.0, total_delta=1e-5)
    with pytest.raises(InputError):
        L.create_ledger(ledger_path.with_name("x.json"), total_epsilon=-1.0, total_delta=1e-5)
    with pytest.raises(InputError, match="invalid budget request"):
        reserve(ledger_path, "bad id with spaces", 0.1)
    with pytest.raises(InputError, match="invalid budget request"):
        reserve(ledger_path, "r", 0.1, dataset="not-a-digest")
    with pytest.raises(InputError, match="invalid budget request"):
        reserve(ledger_path, "r", float("inf"))
    reserve(ledger_path, "r", 0.1)
    with pytest.raises(L.LedgerError, match="already recorded"):
        reserve(ledger_path, "r", 0.1)


def test_a_failed_write_leaves_the_old_ledger_whole(ledger_path, monkeypatch):
    reserve(ledger_path, "run-1", 0.25)
    before = ledger_path.read_bytes()

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "replace", broken_replace)
    with pytest.raises(InputError, match="cannot write"):
        reserve(ledger_path, "run-2", 0.25)
    monkeypatch.undo()
    assert ledger_path.read_bytes() == before
    assert not [p for p in os.listdir(ledger_path.parent) if p.endswith(".part")]
    assert L.load_ledger(ledger_path).spent(DATA).epsilon == 0.25


def _try_reserve(args):
    path, run_id = args
    try:
        reserve(path, run_id, 0.4)
        return True
    except L.BudgetExceeded:
        return False


def test_concurrent_reservations_cannot_overspend(ledger_path):
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(2) as pool:
        results = pool.map(_try_reserve, [(str(ledger_path), f"run-{i}") for i in range(6)])
    assert sum(results) == 2  # 2 x 0.4 fits in 1.0, a third does not
    assert L.load_ledger(ledger_path).spent(DATA).epsilon == pytest.approx(0.8)


def test_format_ledger_summarises_spending(ledger_path):
    assert "no runs recorded" in L.format_ledger(L.load_ledger(ledger_path))
    reserve(ledger_path, "run-1", 0.25)
    text = L.format_ledger(L.load_ledger(ledger_path))
    assert DATA[:16] in text and "run-1" in text
    assert "spent epsilon 0.25" in text and "left epsilon 0.75" in text
    assert text.endswith("\n")


def test_reserve_for_plan_records_the_plans_epsilon(ledger_path):
    from test_dp import make_plan

    plan = make_plan(40.0, epsilon=0.3)
    led = L.reserve_for_plan(ledger_path, plan, dataset=DATA, run_id="run-9", timestamp=TS)
    (entry,) = led.datasets[DATA]
    assert entry.epsilon == 0.3 and entry.delta == plan.delta
    assert entry.mechanism == "distributed-discrete-gaussian/rdp"
