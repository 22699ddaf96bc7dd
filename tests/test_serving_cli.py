"""The serving commands that need MPC, through the real CLI: run --save-shares, recommend --refine, cold-start."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from conftest import assert_one_line_error, run_cli
from mpc_rec.data import Ratings, load_ratings, synthetic_ratings, write_ratings_csv
from mpc_rec.dp.ledger import load_ledger
from mpc_rec.holder import write_release_atomic
from mpc_rec.model import TrainConfig
from mpc_rec.serving.cold_start import load_popularity, recommend_for_cohort
from mpc_rec.serving.plain import plaintext_release
from mpc_rec.serving.refine import SHARES_FILE, load_model_shares

K, CANDIDATES = 3, 8


def _shared_model(run_dir):
    """The joint model, opened here from every party's share file (the test plays all parties)."""
    files = [load_model_shares(run_dir / f"party-{rank}" / SHARES_FILE) for rank in range(2)]
    total = {name: sum(arrays[name] for arrays, _ in files) for name in ("user_factors", "item_factors", "item_bias")}
    return {name: value.astype(np.float64) / 2**16 for name, value in total.items()}, [meta for _, meta in files]


@pytest.fixture(scope="module")
def joint(tmp_path_factory):
    """One small joint run that keeps its shares, and a holder folder for one party's users."""
    root = tmp_path_factory.mktemp("serving-cli")
    ratings = synthetic_ratings(n_users=24, n_items=30, density=0.3, seed=8)
    write_ratings_csv(ratings, root / "ratings.csv")
    out = root / "run"
    done = run_cli("run", "--parties", "2", "--data", str(root / "ratings.csv"), "--epochs", "3", "--factors", "4",
                   "--no-dp", "--top-k", "0", "--save-shares", "--out", str(out), "--ledger-dir", str(root / "ledgers"),
                   "--timeout", "120", timeout=900)
    assert done.returncode == 0, done.stderr
    model, metas = _shared_model(out)
    holder_rank = 1
    users = metas[holder_rank]["users"]
    folder = root / "holder"
    folder.mkdir()
    write_ratings_csv(ratings.subset(np.isin(ratings.users, users)), folder / "ratings.csv")
    (folder / "serving.toml").write_text("allow_refine = true\n")
    write_release_atomic(root / "items.npz", plaintext_release(ratings, TrainConfig(epochs=10)))
    return {"root": root, "out": out, "folder": folder, "ratings": ratings, "model": model, "metas": metas,
            "holder_rank": holder_rank}


def _recommend(joint, user, *extra, folder=None):
    return run_cli("recommend", "--release", str(joint["root"] / "items.npz"), "--holder",
                   str(folder or joint["folder"]), "--user", user, "--json", *extra, timeout=900)


def test_save_shares_writes_each_partys_own_random_shares(joint):
    for rank, meta in enumerate(joint["metas"]):
        path = joint["out"] / f"party-{rank}" / SHARES_FILE
        assert oct(path.stat().st_mode & 0o777) == "0o600"
        assert meta["rank"] == rank and meta["model_id"] == joint["metas"][0]["model_id"] and meta["plan"] is None
    # one party's file alone says nothing: its item factors are far from the model's
    alone, _ = load_model_shares(joint["out"] / "party-0" / SHARES_FILE)
    assert np.abs(alone["item_factors"].astype(np.float64) / 2**16).mean() > 1e6
    assert np.abs(joint["model"]["item_factors"]).max() < 10


def test_refine_returns_the_shared_models_top_k_among_the_local_candidates(joint):
    ratings, metas, holder_rank = joint["ratings"], joint["metas"], joint["holder_rank"]
    user = metas[holder_rank]["users"][2]
    rated = set(ratings.items[ratings.users == user])
    local = _recommend(joint, user, "--k", str(CANDIDATES))
    assert local.returncode == 0, local.stderr
    gift = json.loads(local.stdout)["items"][0]  # the user hides the local favourite (a gift)
    assert run_cli("controls", "--holder", str(joint["folder"]), "--exclude", user, gift).returncode == 0
    candidates = json.loads(_recommend(joint, user, "--k", str(CANDIDATES)).stdout)["items"]
    assert gift not in candidates and not set(candidates) & rated

    done = _recommend(joint, user, "--k", str(K), "--candidates", str(CANDIDATES), "--refine", str(joint["out"]))
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["source"].startswith("hybrid") and len(result["items"]) == K
    assert set(result["items"]) <= set(candidates) and gift not in result["items"] and not set(result["items"]) & rated
    record = result["refinement"]
    assert (record["holder_rank"], record["candidates"], record["k"]) == (holder_rank, CANDIDATES, K)
    assert [r["value"] for r in record["reveals"]] == ["re-ranked top-k positions (to the asking holder only)"]
    # the order is the shared model's: x_u . q_j + c_j over the candidates, from the summed shares
    # (up to fixed-point error: the k scores shown are the k best, best first)
    model, catalogue = joint["model"], metas[0]["catalogue"]
    row = sum(len(m["users"]) for m in metas[:holder_rank]) + metas[holder_rank]["users"].index(user)
    score = {item: model["item_factors"][catalogue.index(item)] @ model["user_factors"][row]
             + model["item_bias"][catalogue.index(item)] for item in candidates}
    best = sorted(score.values(), reverse=True)[:K]
    assert np.allclose([score[item] for item in result["items"]], best, atol=1e-3), (score, result["items"])


def test_refine_needs_the_holders_consent(joint, tmp_path):
    folder = tmp_path / "holder"
    folder.mkdir()
    (folder / "ratings.csv").write_text((joint["folder"] / "ratings.csv").read_text())
    user = joint["metas"][joint["holder_rank"]]["users"][0]
    (folder / "serving.toml").write_text("allow_refine = false\n")
    assert_one_line_error(_recommend(joint, user, "--refine", str(joint["out"]), folder=folder), 2, "allow_refine = true")
    assert not (folder / "embeddings.npz").exists()  # refused before anything was computed


@pytest.mark.parametrize("case", ["missing shares folder", "user outside the shared model", "malformed serving.toml",
                                  "mistyped serving.toml"])
def test_bad_refine_input_is_one_line(joint, tmp_path, case):
    folder = tmp_path / "holder"
    folder.mkdir()
    user = joint["metas"][joint["holder_rank"]]["users"][0]
    own = load_ratings(joint["folder"] / "ratings.csv")
    (folder / "serving.toml").write_text("allow_refine = true\n")
    run_dir, words = joint["out"], []
    if case == "missing shares folder":
        run_dir, words = tmp_path / "no-such-run", ["no model-shares.npz", "--save-shares"]
    elif case == "user outside the shared model":  # a user of this holder who was not in the joint run
        user, words = "newcomer", ["'newcomer' is in no party's part of the shared model"]
        own = Ratings(np.append(own.users, ["newcomer"] * 2), np.append(own.items, own.items[:2]),
                            np.append(own.values, [5.0, 4.0]))
    elif case == "malformed serving.toml":
        (folder / "serving.toml").write_text("allow_refine = \n")
        words = ["serving.toml", "invalid TOML"]
    else:
        (folder / "serving.toml").write_text('allow_refine = "yes"\n')
        words = ["allow_refine must be true or false"]
    write_ratings_csv(own, folder / "ratings.csv")
    assert_one_line_error(_recommend(joint, user, "--refine", str(run_dir), folder=folder), 2, *words)


def test_cold_start_publishes_noisy_cohort_lists_and_books_epsilon(joint, tmp_path):
    data, ratings = joint["root"] / "ratings.csv", joint["ratings"]
    users = sorted(set(ratings.users))
    cohort_of = {user: ("early" if k % 2 else "late") for k, user in enumerate(users)}
    cohorts = tmp_path / "cohorts.csv"
    cohorts.write_text("user,cohort\n" + "".join(f"{u},{c}\n" for u, c in cohort_of.items()))
    release, ledgers = tmp_path / "popularity.npz", tmp_path / "ledgers"
    done = run_cli("cold-start", "--data", str(data), "--cohorts", str(cohorts), "--out", str(release),
                   "--epsilon", "2", "--max-items", "5", "--ledger-dir", str(ledgers), timeout=900)
    assert done.returncode == 0, done.stderr
    popularity = load_popularity(release)
    assert popularity.cohorts == ["early", "late"] and popularity.item_ids == sorted(set(ratings.items))
    plan = popularity.privacy["plan"]
    assert 0 < plan["epsilon"] <= 2 and plan["derived"]["sigma_total"] > 0
    dataset = hashlib.sha256(data.read_bytes()).hexdigest()
    for rank in range(2):  # each party booked the release's epsilon for this data set
        assert [e.epsilon for e in load_ledger(ledgers / f"party-{rank}.json").datasets[dataset]] == [plan["epsilon"]]
    # a new user of cohort "late" is shown that cohort's list, minus what the user hid
    expected = recommend_for_cohort(popularity, "late", 4, set())
    shown = _recommend(joint, "someone-new", "--k", "4", "--cohort", "late", "--popularity", str(release))
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["items"] == expected


@pytest.mark.parametrize("case", ["user without cohort", "missing cohorts file", "more trusted than parties",
                                  "output folder missing"])
def test_bad_cold_start_input_is_one_line(joint, tmp_path, case):
    cohorts, extra = tmp_path / "cohorts.csv", []
    users = sorted(set(joint["ratings"].users))
    cohorts.write_text("user,cohort\n" + "".join(f"{u},c\n" for u in users[1:]))
    words = {"user without cohort": [f"user {users[0]!r} has no cohort"],
             "missing cohorts file": ["cohorts file not found"],
             "more trusted than parties": ["--dp-trust"],
             "output folder missing": ["cannot write the release there"]}[case]
    out = tmp_path / "p.npz"
    if case == "missing cohorts file":
        cohorts = tmp_path / "absent.csv"
    elif case == "more trusted than parties":
        extra = ["--dp-trust", "3"]
    elif case == "output folder missing":  # refused before the MPC: no epsilon spent on a release never written
        cohorts.write_text("user,cohort\n" + "".join(f"{u},c\n" for u in users))
        out = tmp_path / "absent" / "p.npz"
    done = run_cli("cold-start", "--data", str(joint["root"] / "ratings.csv"), "--cohorts", str(cohorts),
                   "--out", str(out), "--ledger-dir", str(tmp_path / "ledgers"), *extra, timeout=900)
    assert_one_line_error(done, 2, *words)
    assert not out.exists() and not (tmp_path / "ledgers").exists()
