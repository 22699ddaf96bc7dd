"""Federated mode: real holder and party processes over loopback, real Paillier keys, real noise."""

from __future__ import annotations

import dataclasses
import json
import math
import socket
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from conftest import assert_one_line_error, mpc_rec_command, run_cli
from mpc_harness import run_parties
from mpc_rec.config import dump_toml
from mpc_rec.data import Ratings, load_ratings, split_train_test, synthetic_ratings, write_ratings_csv
from mpc_rec.dp.accounting import NoisePlan, epsilon_spent
from mpc_rec.dp.ledger import load_ledger
from mpc_rec.federated.evaluation import evaluation_spec
from mpc_rec.federated.holder import packing_spec
from mpc_rec.federated.model import LocalRatings, initial_items, item_contribution, user_step
from mpc_rec.holder import Controls, ItemRelease, load_release, write_controls_atomic, write_release_atomic
from mpc_rec.ingest.transport import recv_frame, send_frame
from mpc_rec.paillier import _crypto
from mpc_rec.paillier.keys import generate_keypair, save_public_key
from mpc_rec.paillier.messages import Contribution
from mpc_rec.paillier.packing import PackingError, decode_totals, unpack


# --- a whole run -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def federated_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("federated")
    data = root / "ratings.csv"
    write_ratings_csv(synthetic_ratings(n_users=1000, n_items=200, seed=3), data)
    out, ledgers = root / "out", root / "ledgers"
    done = run_cli("run", "--mode", "federated", "--holders", "3", "--parties", "2", "--data", str(data),
                   "--epochs", "5", "--regularization", "5", "--epsilon", "8", "--insecure-1024-bit-key",
                   "--benchmark-exact-rmse", "--out", str(out), "--ledger-dir", str(ledgers), "--timeout", "120",
                   timeout=600)
    return done, out, ledgers


def test_federated_run_learns_with_dp_and_accounts_for_it(federated_run):
    done, out, ledgers = federated_run
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "summary.json").read_text())
    metrics, privacy = summary["metrics"], summary["privacy"]
    assert summary["mode"] == "federated"
    exact_rmse = metrics["rmse_exact_unprotected"]
    assert math.isfinite(exact_rmse) and exact_rmse < metrics["rmse_item_mean_baseline"] - 0.02, metrics
    assert 0 < metrics["recall_exact_unprotected"] < 1 and 0 < metrics["recall_at_10"] < 1
    assert "NOT covered" in metrics["exact_note"] and "NOT covered" in privacy["benchmark_exact_rmse"]
    assert privacy["mode"] == "dp" and 0 < privacy["epsilon"] <= 8 and privacy["delta"] == 1e-5
    assert privacy["rounds"] == 5 and privacy["sigma_total"] > 0 and privacy["clipping"] == {"step": 0.1, "eval": 10.0}
    assert privacy["mechanism"] == "distributed-discrete-gaussian" and "1 of the 2" in privacy["trust"]
    # the only openings: one noised item-side sum per round, each a different step of the plan, then
    # the evaluation sums as the plan's one mean release, and the exact sums asked for by the flag
    assert [(r["tag"], r.get("release"), r.get("index")) for r in summary["reveals"]] == [
        *[("Noised", "step", i) for i in range(5)], ("Noised", "mean", 0), ("DeclaredPublic", None, None)]
    assert "NOT covered" in summary["reveals"][-1]["reason"]
    assert [r["holders_aggregated"] for r in summary["rounds"]] == [3] * 5
    assert summary["evaluation"]["holders_aggregated"] == 3 and summary["evaluation"]["round"] == 5
    # the plan covers the evaluation (one mean release of sensitivity 2 C_eval), and its epsilon,
    # booked by each compute party before the first round, is more than the rounds' alone
    parties = [json.loads((out / f"party-{rank}" / "party.json").read_text()) for rank in range(2)]
    plan = NoisePlan.from_dict(parties[0]["plan"])
    assert plan.mean_releases == 1 and plan.sensitivities["mean"] == 20.0 and plan.epsilon == privacy["epsilon"]
    assert epsilon_spent(dataclasses.replace(plan, mean_releases=0)) < privacy["epsilon"] - 0.1
    for rank in range(2):
        entries = load_ledger(ledgers / f"party-{rank}.json").datasets[privacy["dataset"]]
        assert [e.epsilon for e in entries] == [privacy["epsilon"]]
        assert parties[rank]["evaluation"]["released_sums"] == metrics["released_sums"]  # one opened value
    # the released sums are the clipped sums of an independent computation plus noise of the plan's size
    clipped, exact = _reference_sums(out, [h["id"] for h in summary["holders"]], clip_eval=10.0)
    assert np.allclose(summary["evaluation"]["exact_sums_unprotected"], exact, rtol=0, atol=1e-3)
    assert metrics["rmse_exact_unprotected"] == pytest.approx(math.sqrt(exact[0] / exact[1]), abs=1e-6)
    assert metrics["recall_exact_unprotected"] == pytest.approx(exact[2] / exact[3], abs=1e-6)
    noise = np.array(metrics["released_sums"]) - clipped
    noise_std = math.sqrt(2 * plan.mean_party_variance_units) * 2.0**-16  # both parties add their noise
    assert np.all(noise != 0) and np.all(np.abs(noise) < 6 * noise_std), (noise, noise_std)
    assert metrics["rmse"] == pytest.approx(math.sqrt(metrics["released_sums"][0] / metrics["released_sums"][1]))
    assert metrics["rmse"] != pytest.approx(math.sqrt(clipped[0] / clipped[1]), abs=1e-6)
    assert summary["evaluation"]["noise_sigma"] == pytest.approx(plan.mean_sigma_total)
    users = set()
    for holder in summary["holders"]:
        folder = out / "holders" / holder["id"]
        release = load_release(folder / "items.npz")
        assert release.privacy["round"] == 5 and release.privacy["epsilon"] == privacy["epsilon"]
        with np.load(folder / "users.npz") as state:
            own = set(state["user_ids"].tolist())
            assert state["factors"].shape == (len(own), 4)
        assert not own & users  # disjoint holders
        users |= own
        assert holder["bytes_sent_per_round"] > 0 and holder["ciphertexts_per_round"] > 0
    assert len(users) == 1000


def _user_figures(train: Ratings, test: Ratings, user: str, p, b, release, top_k=10):
    """(SSE, count, recall, has a relevant item) of one user: a slow reference, one user at a time."""
    items = {item: k for k, item in enumerate(release.item_ids)}
    rows = test.users.astype(str) == user
    rated = [items[i] for i in test.items[rows]]
    predicted = np.clip(release.mean + b + release.biases[rated] + release.factors[rated] @ p, 1.0, 5.0)
    sse = float(((predicted - test.values[rows]) ** 2).sum())
    relevant = {items[i] for i, v in zip(test.items[rows], test.values[rows]) if v >= 4}
    if not relevant:
        return sse, float(rows.sum()), 0.0, 0.0
    seen = {items[i] for i in train.items[train.users.astype(str) == user]}
    order = [i for i in np.argsort(-(release.factors @ p + release.biases), kind="stable") if i not in seen]
    return sse, float(rows.sum()), len(relevant & set(order[:top_k])) / len(relevant), 1.0


def _clipped_units(sse, count, recall, flag, clip_eval):
    scale = min(1.0, (clip_eval - math.sqrt(2) * 2.0**-17) / math.hypot(sse, count)) if count else 1.0
    side = math.floor(clip_eval * 2**16)
    return np.rint([scale * sse * 2**16, scale * count * 2**16, recall * side, flag * side])


def _reference_sums(out: Path, holder_ids, *, clip_eval):
    """(clipped sums, exact sums) over every holder's users, from the files each holder keeps."""
    clipped, exact = np.zeros(4), np.zeros(4)
    for hid in holder_ids:
        folder = out / "holders" / hid
        release = load_release(folder / "items.npz")
        train, test = load_ratings(folder / "train.csv"), load_ratings(folder / "test.csv")
        with np.load(folder / "users.npz") as state:
            for user, p, b in zip(state["user_ids"].tolist(), state["factors"], state["biases"]):
                figures = _user_figures(train, test, user, p, float(b), release)
                exact += figures
                clipped += _clipped_units(*figures, clip_eval)
    return clipped / 2**16, exact


# --- what leaves a holder ---------------------------------------------------------------


class _Recorder:
    """Plays the aggregator: records every byte each connection brings, answers 'accepted'."""

    def __init__(self):
        self.connections: list[list[bytes]] = []
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with conn:
                frames = [recv_frame(conn, 1 << 30)]
                if json.loads(frames[0]).get("body"):
                    frames.append(recv_frame(conn, 1 << 30))
                conn.settimeout(1.0)
                try:  # anything more on this connection is recorded too
                    extra = conn.recv(1 << 16)
                except OSError:
                    extra = b""
                if extra:
                    frames.append(extra)
                self.connections.append(frames)
                send_frame(conn, json.dumps({"status": "accepted", "body": False}).encode())

    def wait_for(self, count, timeout=60.0):
        end = time.monotonic() + timeout
        while len(self.connections) < count:
            assert time.monotonic() < end, "the holder sent nothing"
            time.sleep(0.05)


def _local(ratings: Ratings, users: list[str], catalogue: list[str]) -> LocalRatings:
    """Independent, slow reference indexing (dicts, a loop): not the holder's code path."""
    u = {x: k for k, x in enumerate(users)}
    i = {x: k for k, x in enumerate(catalogue)}
    return LocalRatings(np.array([u[x] for x in ratings.users]), np.array([i[x] for x in ratings.items]),
                        ratings.values, len(users))


def _decrypt(private_key, contribution: Contribution, spec) -> np.ndarray:
    plaintexts = [private_key.decrypt_raw(c) for c in contribution.ciphertexts]
    return np.array(decode_totals(unpack(plaintexts, contribution.length, spec), 1, spec), dtype=np.int64)


def test_holder_sends_only_ciphertexts_and_controls_change_the_next_round(tmp_path):
    # ids with letters outside hexadecimal and JSON keys: any leak of them is visible in the bytes
    raw = synthetic_ratings(n_users=30, n_items=40, seed=5)
    ratings = Ratings(np.array([f"person-{u}" for u in raw.users], dtype=object),
                      np.array([f"film-{i}" for i in raw.items], dtype=object), raw.values)
    catalogue = sorted(set(ratings.items))
    users = sorted(set(ratings.users))
    train, held_out = split_train_test(ratings, test_fraction=0.2, seed=1)
    write_ratings_csv(train, tmp_path / "train.csv")
    write_ratings_csv(held_out, tmp_path / "test.csv")
    public_key, private_key = generate_keypair(1024, allow_insecure_size=True)
    _, other_key = generate_keypair(1024, allow_insecure_size=True)
    save_public_key(tmp_path / "public.json", public_key)
    recorder = _Recorder()
    release_path, holder_dir, k, clip, run_id = tmp_path / "release" / "items.npz", tmp_path / "holder", 3, 0.5, "run-x"
    release_path.parent.mkdir()
    config = {"holder": {"id": "h001", "dir": str(holder_dir), "workers": 1},
              "data": {"train": "train.csv", "test": "test.csv"},
              "federated": {"release": str(release_path), "aggregator": recorder.address, "rounds": 2,
                            "regularization": 5.0, "clip": clip, "max_users": 30, "max_holders": 4, "run_id": run_id,
                            "wait_s": 60.0},
              "key": {"public_key": "public.json", "fingerprint": public_key.fingerprint}}
    (tmp_path / "holder.toml").write_text(dump_toml(config))
    rng = np.random.default_rng(0)
    releases = [ItemRelease(catalogue, *initial_items(len(catalogue), k, scale=0.1, seed=1), 3.0,
                            {"run_id": run_id, "round": r}) for r in range(3)]
    releases[1] = ItemRelease(catalogue, rng.normal(0, 0.3, (len(catalogue), k)), rng.normal(0, 0.2, len(catalogue)),
                              3.0, {"run_id": run_id, "round": 1})
    write_release_atomic(release_path, releases[0])
    holder = subprocess.Popen([*mpc_rec_command(), "holder", "--config", str(tmp_path / "holder.toml")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        recorder.wait_for(1)
        # between rounds, user 3 excludes one rated item (a gift) and user 7 deletes their history
        excluded_user, forgotten = users[3], users[7]
        excluded_item = train.items[train.users == excluded_user][0]
        holder_dir.mkdir(exist_ok=True)
        write_controls_atomic(holder_dir / "controls.json",
                              Controls({excluded_user: frozenset({excluded_item})}, frozenset({forgotten})))
        write_release_atomic(release_path, releases[1])
        recorder.wait_for(2)
        write_release_atomic(release_path, releases[2])
        _, stderr = holder.communicate(timeout=60)
    finally:
        holder.kill()
    assert holder.returncode == 0, stderr
    assert len(recorder.connections) == 3  # two rounds, then the evaluation round
    spec = packing_spec(public_key.bits, clip=clip, max_users=30, max_holders=4)
    without = np.array([not (u == forgotten or (u == excluded_user and i == excluded_item))
                        for u, i in zip(train.users, train.items)])
    for round_id, (frames, data) in enumerate(zip(recorder.connections, [train, train.subset(without)])):
        assert len(frames) == 2  # one header, one body, nothing else
        assert json.loads(frames[0]) == {"kind": "contribution", "round": round_id, "body": True}
        document = json.loads(frames[1])
        assert set(document) == {"type", "version", "contributor", "round", "fingerprint", "spec", "length",
                                 "ciphertexts"}
        message = Contribution.from_bytes(frames[1])
        assert (message.contributor, message.round, message.fingerprint) == ("h001", round_id, public_key.fingerprint)
        assert message.length == len(catalogue) * (k + 1)
        assert all(_crypto.is_valid_ciphertext(public_key.n, c) for c in message.ciphertexts)
        everything = b"".join(frames)
        assert not any(name.encode() in everything for name in (*users, *catalogue, "person", "film"))
        # what is inside: exactly the clipped sum over the holder's users, with the controls of
        # this round applied as if the excluded and forgotten ratings had never existed
        release = releases[round_id]
        local = _local(data, users, catalogue)
        p, b = user_step(local, release.factors, release.biases, release.mean, 5.0)
        expected = item_contribution(local, p, b, release.factors, release.biases, release.mean, clip).units
        assert np.array_equal(_decrypt(private_key, message, spec), expected.reshape(-1))
        try:  # another key gives no usable plaintext
            wrong = _decrypt(other_key, message, spec)
        except PackingError:
            wrong = None
        assert wrong is None or not np.array_equal(wrong, expected.reshape(-1))
    first, second = (Contribution.from_bytes(frames[1]) for frames in recorder.connections[:2])
    assert set(first.ciphertexts).isdisjoint(second.ciphertexts)
    # the evaluation round: one more contribution of the same form, one ciphertext, holding only
    # the sum of the users' clipped test figures (this round's controls applied)
    frames = recorder.connections[2]
    assert len(frames) == 2 and json.loads(frames[0]) == {"kind": "contribution", "round": 2, "body": True}
    assert set(json.loads(frames[1])) == {"type", "version", "contributor", "round", "fingerprint", "spec", "length",
                                          "ciphertexts"}
    message = Contribution.from_bytes(frames[1])
    assert (message.contributor, message.round, message.length, len(message.ciphertexts)) == ("h001", 2, 4, 1)
    assert _crypto.is_valid_ciphertext(public_key.n, message.ciphertexts[0])
    assert not any(name.encode() in b"".join(frames) for name in (*users, *catalogue, "person", "film"))
    release = releases[2]
    p, b = user_step(_local(train.subset(without), users, catalogue), release.factors, release.biases, release.mean, 5.0)
    kept_test = held_out.subset(held_out.users != forgotten)
    expected = sum(_clipped_units(*_user_figures(train, kept_test, user, p[k], float(b[k]), release), 10.0)
                   for k, user in enumerate(users))
    decrypted = _decrypt(private_key, message, evaluation_spec(public_key.bits, max_holders=4))
    assert np.array_equal(decrypted, expected.astype(np.int64)) and expected[1] > 0 and expected[3] > 0
    record = json.loads((holder_dir / "holder.json").read_text())  # what the launcher reads: no metric
    assert set(record) == {"holder", "users", "train_ratings", "rounds", "evaluation", "peak_memory_mb"}
    assert set(record["evaluation"]) == {"round", "compute_s", "encrypt_s", "ciphertexts", "bytes_sent"}
    with np.load(holder_dir / "users.npz") as state:
        assert forgotten not in state["user_ids"].tolist() and len(state["user_ids"]) == len(users) - 1


# --- the noise of the federated reveal ----------------------------------------------------

SIZE = 20_000


def _reveal_known_total(session, plan, values):
    from mpc_rec.dp.reveal import RevealLog
    from mpc_rec.federated.compute import reveal_round_total
    from mpc_rec.paillier.party import shares_to_mpc

    rank = session.endpoint.rank
    total = shares_to_mpc(values if rank == 0 else None, length=SIZE)
    log = RevealLog(plan_digest=plan.digest())
    noisy = reveal_round_total(total, plan, 1, log)
    exact = reveal_round_total(total, None, 1, RevealLog())
    return noisy, exact, [type(tag).__name__ for _, tag in log.entries]


def test_federated_reveal_adds_the_planned_noise():
    parties, trusted = 2, 1  # every trust setting of the shared mechanism: tests/test_dp_protocol.py
    from mpc_rec.dp.accounting import calibrate
    from mpc_rec.dp.clipping import ClipBounds

    plan = calibrate(target_epsilon=50.0, delta=1e-5, steps=3, clip=ClipBounds(step=0.01, mean=0.01),
                     dimension=SIZE, parties=parties, trusted_parties=trusted, mean_releases=0)
    values = np.random.default_rng(2).integers(-2**30, 2**30, SIZE).astype(np.int64)
    noisy, exact, tags = run_parties(_reveal_known_total, parties, plan, values, timeout_s=120.0)[0]
    assert tags == ["Noised"]
    assert np.array_equal(exact * 2**16, values)  # exact, and no noise without a plan
    noise = (noisy * 2**16).astype(np.int64) - values
    expected_variance = parties * plan.party_variance_units  # every party adds its own sample
    chi2 = (SIZE - 1) * noise.var(ddof=1) / expected_variance
    assert 0.0005 < stats.chi2.cdf(chi2, SIZE - 1) < 0.9995, (noise.var(), expected_variance)
    assert abs(noise.mean()) < 5 * np.sqrt(expected_variance / SIZE)
    assert stats.kstest(noise / np.sqrt(expected_variance), "norm").pvalue > 1e-4


def _reveal_evaluations(session, plan, values):
    """A --no-dp evaluation of the exact part, then a DP one with the exact part: one session."""
    from mpc_rec.dp.reveal import RevealLog
    from mpc_rec.federated.evaluation import reveal_evaluation
    from mpc_rec.paillier.party import shares_to_mpc

    out = []
    for run_plan, kind, vector in ((None, "exact", values[4:]), (plan, "clipped+exact", values)):
        total = shares_to_mpc(vector if session.endpoint.rank == 0 else None, length=len(vector))
        log = RevealLog(plan_digest=None if run_plan is None else run_plan.digest())
        released = reveal_evaluation(total, run_plan, kind, log)
        out.append((released, [(type(tag).__name__, getattr(tag, "release", None)) for _, tag in log.entries]))
    return out


def test_the_evaluation_release_is_exact_without_dp_and_noised_with_a_tiny_epsilon():
    from mpc_rec.dp.accounting import calibrate
    from mpc_rec.dp.clipping import ClipBounds

    # clipped sums (SSE, count, 10 x recall sum, 10 x users with a relevant item), then the exact ones
    values = np.rint(np.array([1500.25, 1400.5, 61.0, 700.0, 1900.75, 2100.0, 6.5, 70.0]) * 2**16).astype(np.int64)
    plan = calibrate(target_epsilon=0.05, delta=1e-5, steps=1, clip=ClipBounds(step=0.1, mean=10.0), dimension=10,
                     parties=2, trusted_parties=1, mean_releases=1)
    (exact, tags), (noisy, noisy_tags) = run_parties(_reveal_evaluations, 2, plan, values, timeout_s=120.0)[0]
    assert tags == [("DeclaredPublic", None)]
    assert exact["released_sums"] == [1900.75, 2100.0, 6.5, 70.0]  # every fixed-point unit kept
    assert exact["rmse"] == exact["rmse_exact_unprotected"] == pytest.approx(math.sqrt(1900.75 / 2100.0), abs=1e-12)
    assert exact["recall"] == pytest.approx(6.5 / 70.0, abs=1e-12)
    assert noisy_tags == [("Noised", "mean"), ("DeclaredPublic", None)]
    assert noisy["rmse_exact_unprotected"] == exact["rmse"] and noisy["noise_sigma"] == plan.mean_sigma_total > 1000
    assert noisy["released_sums"] != [1500.25, 1400.5, 61.0, 700.0]
    assert noisy["rmse"] != pytest.approx(math.sqrt(1500.25 / 1400.5), abs=1e-3)
    assert noisy["recall"] is None or 0 <= noisy["recall"] <= 1  # post-processing keeps it a proportion


# --- bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize("args,words", [
    (["--mode", "federated"], ["--holders"]),
    (["--mode", "federated", "--holders", "0"], ["--holders"]),
    (["--mode", "federated", "--holders", "5000"], ["5000 holders"]),
])
def test_bad_federated_options_are_one_line_errors(tmp_path, args, words):
    assert_one_line_error(run_cli("run", *args, "--out", str(tmp_path / "out"), timeout=60), 2, *words)


def test_malformed_controls_stop_a_holder_with_one_line(tmp_path):
    write_ratings_csv(synthetic_ratings(n_users=5, n_items=6, seed=1), tmp_path / "train.csv")
    public_key, _ = generate_keypair(1024, allow_insecure_size=True)
    save_public_key(tmp_path / "public.json", public_key)
    (tmp_path / "holder").mkdir()
    (tmp_path / "holder" / "controls.json").write_text('{"version": 1, "exclude": ["not", "a", "map"]}')
    config = {"holder": {"id": "h001", "dir": "holder"}, "data": {"train": "train.csv"},
              "federated": {"release": "items.npz", "aggregator": "127.0.0.1:9", "rounds": 1, "clip": 0.1,
                            "max_users": 10, "max_holders": 1, "run_id": "r", "wait_s": 5.0},
              "key": {"public_key": "public.json", "fingerprint": public_key.fingerprint}}
    (tmp_path / "holder.toml").write_text(dump_toml(config))
    assert_one_line_error(run_cli("holder", "--config", str(tmp_path / "holder.toml"), timeout=60), 2, "controls.json", "exclude")


def test_a_holder_sending_garbage_ends_the_run_with_one_line(tmp_path):
    done = run_cli("run", "--mode", "federated", "--holders", "2", "--parties", "2", "--epochs", "1",
                   "--insecure-1024-bit-key", "--holder-faults", "h002:garbage", "--out", str(tmp_path / "out"),
                   "--ledger-dir", str(tmp_path / "ledgers"), "--timeout", "120", timeout=600)
    assert_one_line_error(done, 3, "h002", "refused")
    assert not (tmp_path / "out" / "summary.json").exists()
    assert not list((tmp_path / "out").glob("party-*"))


# --- the maths of a round ----------------------------------------------------------------


def _random_ratings(rng, users, items, per_user):
    user = np.repeat(np.arange(users), per_user)
    item = np.concatenate([rng.choice(items, per_user, replace=False) for _ in range(users)])
    return LocalRatings(user, item, rng.integers(1, 6, len(user)).astype(float), users)


def test_one_user_moves_the_holder_sum_by_at_most_the_accounted_sensitivity():
    rng = np.random.default_rng(4)
    items, k, clip = 50, 3, 0.05
    factors, biases = rng.normal(0, 2.0, (items, k)), rng.normal(0, 1.0, items)
    base = _random_ratings(rng, 40, items, 12)
    worst = 0.0
    for trial in range(20):
        # user 0's ratings replaced by anything (here: extreme values on other items, or none)
        other = base.subset(base.user != 0)
        if trial % 4:
            extra = LocalRatings(np.zeros(30, dtype=np.int64), rng.choice(items, 30, replace=False),
                                 rng.normal(0, 1e4, 30), 40)
            other = LocalRatings(np.concatenate([other.user, extra.user]), np.concatenate([other.item, extra.item]),
                                 np.concatenate([other.value, extra.value]), 40)
        sums = []
        for data in (base, other):
            p, b = user_step(data, factors, biases, 3.0, 1.0)
            p[0] *= 1 + 50 * trial  # any user-side state: only clipping bounds the contribution
            sums.append(item_contribution(data, p, b, factors, biases, 3.0, clip).units)
        worst = max(worst, np.linalg.norm((sums[0] - sums[1]).astype(float)))
    assert clip * 2**16 < worst <= 2 * clip * 2**16  # users at the bound, never above 2C


def test_one_user_moves_the_evaluation_sums_by_at_most_the_accounted_sensitivity():
    from mpc_rec.federated.evaluation import clipped_user_units
    from mpc_rec.federated.model import UserMetrics

    rng = np.random.default_rng(8)
    clip_eval = 3.3  # not on the 2^-16 grid: the recall and flag entries must still stay within it
    n = 400
    counts = rng.integers(0, 60, n).astype(float)
    figures = UserMetrics(counts * rng.uniform(0, 16, n) * rng.integers(0, 2, n), counts,
                          rng.uniform(0, 1, n) * (counts > 0), (counts > 0).astype(float))
    # extreme users: all error and no count, all count and no error, nothing at all
    figures.squared_error[:3], figures.test_ratings[:3] = [1e6, 0.0, 0.0], [0.0, 1e6, 0.0]
    figures.recall[:3], figures.has_relevant[:3] = [1.0, 0.0, 0.0], [1.0, 0.0, 0.0]
    units = clipped_user_units(figures, clip_eval).astype(float)
    assert units.min() >= 0 and units.max() <= clip_eval * 2**16
    assert np.hypot(units[:, 0], units[:, 1]).max() <= clip_eval * 2**16
    # replacing one user's data by another's changes the sum by the difference of their vectors
    worst = max(np.linalg.norm(units[:, None, :] - units[None, k, :], axis=2).max() for k in range(n))
    assert 1.99 * clip_eval * 2**16 < worst <= 2 * clip_eval * 2**16


def test_evaluation_sums_outside_the_public_range_are_refused_before_encryption():
    from mpc_rec.paillier.contributor import make_contribution
    from mpc_rec.paillier.errors import ContributionInputError

    public_key, _ = generate_keypair(1024, allow_insecure_size=True)
    spec = evaluation_spec(public_key.bits, max_holders=4)
    assert len(make_contribution(public_key, spec, "h001", 5, [2.0**30 - 1, 1e6, 0.5, 3.0]).ciphertexts) == 1
    with pytest.raises(ContributionInputError, match="h001"):
        make_contribution(public_key, spec, "h001", 5, [2.0**31, 1e6, 0.5, 3.0])


def test_user_step_is_each_users_ridge_solution():
    rng = np.random.default_rng(6)
    data = _random_ratings(rng, 5, 30, 8)
    factors, biases = rng.normal(0, 1, (30, 4)), rng.normal(0, 0.5, 30)
    p, b = user_step(data, factors, biases, 3.0, 2.0)
    for u in range(5):
        rows = data.user == u
        x = np.concatenate([factors[data.item[rows]], np.ones((rows.sum(), 1))], axis=1)
        y = data.value[rows] - 3.0 - biases[data.item[rows]]
        w = np.linalg.solve(x.T @ x + 2.0 * np.eye(5), x.T @ y)
        assert np.allclose(np.append(p[u], b[u]), w)
