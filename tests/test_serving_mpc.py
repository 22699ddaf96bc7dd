"""Serving protocols in real party processes over loopback: cold start and hybrid refinement."""

import math

import numpy as np
import pytest
import torch

from mpc_rec.data import partition_users, sort_ids, synthetic_ratings
from mpc_rec.dp.ledger import load_ledger
from mpc_rec.serving.cold_start import bounded_counts, build_popularity
from mpc_rec.serving.processes import run_session
from mpc_rec.serving.refine import SHARES_FILE, model_shares_record, refine_party, save_model_shares


def test_cold_start_opens_only_noised_counts_with_the_planned_noise(tmp_path):
    ratings = synthetic_ratings(n_users=240, n_items=150, seed=6)
    users = sort_ids(set(ratings.users))
    cohort_of = {user: f"c{k % 4}" for k, user in enumerate(users)}
    catalogue = sort_ids(set(ratings.items))
    popularity, record = build_popularity(partition_users(ratings, 2, seed=1), cohort_of, catalogue, epsilon=2.0,
                                          delta=1e-5, max_items=8, like=4.0, trusted_parties=1,
                                          ledger_dir=tmp_path, dataset="ab" * 16)
    plan = popularity.privacy["plan"]
    assert [(r["tag"], r["value"]) for r in record["reveals"]] == [("Noised", "noisy cohort popularity (to all parties)")]
    exact = bounded_counts(ratings, cohort_of, popularity.cohorts, catalogue, max_items=8, like=4.0)
    assert exact.sum() <= 8 * len(users) and exact.max() > 5  # the bound holds and there is signal to hide
    noise = (popularity.counts - exact).ravel()
    # both parties add N_Z(0, V) in units of 2^-16; 600 draws: 5 standard errors on mean and variance
    variance = 2 * plan["party_variance_units"] * 2.0**-32
    assert abs(noise.mean()) < 5 * math.sqrt(variance / noise.size)
    assert abs(noise.var() / variance - 1) < 5 * math.sqrt(2 / noise.size)
    assert not np.any(np.isclose(noise, 0.0, atol=1e-3))  # every count carries noise
    for party in ("party-0", "party-1"):  # booked before the data was read
        ledger = load_ledger(tmp_path / f"{party}.json")
        assert ledger.spent("ab" * 16).epsilon == pytest.approx(plan["epsilon"])
    assert plan["epsilon"] <= 2.0 and plan["derived"]["sensitivity"] == pytest.approx(4.0)


def _save_known_model(session, model, rows, users, catalogue, folder):
    """Share a known model from party 0 and keep each party's own shares, as `run --save-shares` does."""
    import crypten

    from mpc_rec.model import ModelState

    state = ModelState(*(crypten.cryptensor(torch.as_tensor(model[name]), src=0)
                         for name in ("user_factors", "item_factors", "user_bias", "item_bias")))
    record = model_shares_record(session, state, crypten.cryptensor(torch.tensor(3.5), src=0), rows)
    rank = session.endpoint.rank
    save_model_shares(folder / f"party-{rank}" / SHARES_FILE, record["arrays"],
                      {**record["meta"], "users": users[rank], "catalogue": catalogue, "plan": None})
    return rank


def _save_then_refine(session, model, rows, users, catalogue, folder, query):
    """One session for both steps (a session start costs seconds); the refinement reads only the saved files."""
    rank = _save_known_model(session, model, rows, users, catalogue, folder)
    return refine_party(session, str(folder / f"party-{rank}" / SHARES_FILE), query)


def test_refinement_reveals_only_the_top_k_to_the_holder_and_matches_plaintext(tmp_path):
    rng = np.random.default_rng(7)
    rows, n_items, k = [5, 4], 60, 4
    model = {"user_factors": rng.normal(size=(9, 6)), "item_factors": rng.normal(size=(n_items, 6)),
             "user_bias": rng.normal(size=9), "item_bias": rng.normal(size=n_items)}
    users = [[f"a{r}" for r in range(5)], [f"b{r}" for r in range(4)]]
    catalogue = [f"i{j}" for j in range(n_items)]
    candidates = rng.choice(n_items, 12, replace=False).tolist()  # the holder's local candidates
    query = {"row": 2, "positions": candidates, "k": k}  # user b2, party 1's third row
    results = run_session(_save_then_refine, [(model, rows, users, catalogue, tmp_path, None),
                                              (model, rows, users, catalogue, tmp_path, query)])
    assert oct((tmp_path / "party-1" / SHARES_FILE).stat().st_mode & 0o777) == "0o600"
    scores = model["item_factors"][candidates] @ model["user_factors"][5 + 2] + model["item_bias"][candidates]
    assert results[1]["order"] == np.argsort(-scores, kind="stable")[:k].tolist()
    assert "order" not in results[0]  # the other party opens nothing
    for result in results:
        assert [r["value"] for r in result["reveals"]] == ["re-ranked top-k positions (to the asking holder only)"]
