"""Serving on the holder's side: matching, compression, explanations, controls, the CLI."""

import json

import numpy as np
import pytest

from conftest import run_cli
from mpc_rec.data import synthetic_ratings, write_ratings_csv
from mpc_rec.holder import ItemRelease, write_release_atomic
from mpc_rec.model import TrainConfig
from mpc_rec.serving.cold_start import Popularity, write_popularity_atomic
from mpc_rec.serving.embeddings import compress, fit_embeddings, fit_user
from mpc_rec.serving.explain import contributions
from mpc_rec.serving.index import ExactIndex, HnswIndex
from mpc_rec.serving.plain import plaintext_release


def random_release(n_items=400, k=8, seed=0):
    rng = np.random.default_rng(seed)
    return ItemRelease([f"i{j}" for j in range(n_items)], rng.normal(size=(n_items, k)), rng.normal(size=n_items), 3.5)


def brute_force(release, vector, k, exclude):
    scores = release.factors @ vector + release.biases
    order = [int(j) for j in np.argsort(-scores, kind="stable") if j not in exclude]
    return order[:k]


def test_exact_matching_equals_brute_force_and_skips_excluded():
    release = random_release()
    index = ExactIndex(release.factors, release.biases)
    rng = np.random.default_rng(1)
    for _ in range(20):
        vector = rng.normal(size=8)
        best = brute_force(release, vector, 30, set())
        exclude = set(rng.choice(best, 10, replace=False).tolist()) | set(rng.choice(400, 20).tolist())
        got = index.top_k(vector, 10, np.array(sorted(exclude)))
        assert got.tolist() == brute_force(release, vector, 10, exclude)
        assert not set(got.tolist()) & exclude
    # a user who excluded all but three items gets those three
    assert sorted(index.top_k(rng.normal(size=8), 10, np.arange(3, 400)).tolist()) == [0, 1, 2]


def test_hnsw_index_finds_nearly_the_exact_top_k_and_never_excluded(tmp_path):
    pytest.importorskip("faiss", reason="faiss-cpu not installed (the hnsw index is optional)")
    release = random_release(n_items=3000)
    cache = tmp_path / "hnsw.faiss"
    exact, hnsw = ExactIndex(release.factors, release.biases), HnswIndex(release.factors, release.biases, cache=cache)
    reloaded = HnswIndex(release.factors, release.biases, cache=cache)  # read back, not rebuilt
    probe = np.random.default_rng(9).normal(size=8)
    assert cache.exists() and reloaded.top_k(probe, 10).tolist() == hnsw.top_k(probe, 10).tolist()
    rng = np.random.default_rng(2)
    hits = 0
    for _ in range(30):
        vector = rng.normal(size=8)
        exclude = np.array(exact.top_k(vector, 5))  # hide the five best: the index must skip them
        got = hnsw.top_k(vector, 10, exclude)
        assert not set(got.tolist()) & set(exclude.tolist())
        hits += len(set(got.tolist()) & set(exact.top_k(vector, 10, exclude).tolist()))
    assert hits / 300 >= 0.9


def test_int8_and_float16_embeddings_keep_the_vector_and_shrink_it():
    vectors = np.random.default_rng(3).normal(size=(200, 17))
    for precision, most_error, width in (("int8", 0.01, 1), ("float16", 0.001, 2)):
        codes, scales = compress(vectors, precision)
        restored = codes.astype(np.float64) * scales[:, None]
        error = np.abs(restored - vectors).max(axis=1) / np.abs(vectors).max(axis=1)
        assert error.max() < most_error
        assert codes.itemsize == width


def test_explanation_contributions_sum_to_the_score():
    ratings = synthetic_ratings(n_users=40, n_items=60, seed=4)
    release = plaintext_release(ratings, TrainConfig(epochs=20))
    index = {item: j for j, item in enumerate(release.item_ids)}
    mine = ratings.subset(ratings.users == "u7")
    items = np.array([index[i] for i in mine.items])
    vector = fit_user(release, items, mine.values)
    for item in (0, 17, 59):
        score, baseline, parts = contributions(release, items, mine.values, item)
        assert len(parts) == len(items)
        assert baseline + parts.sum() == pytest.approx(score, abs=1e-12)
        direct = release.mean + release.biases[item] + np.append(release.factors[item], 1.0) @ vector
        assert score == pytest.approx(direct, abs=1e-9)
    embeddings = fit_embeddings(release, ratings, precision="float64")
    assert np.allclose(embeddings.vector(embeddings.row_of("u7")), vector)


@pytest.fixture(scope="module")
def holder(tmp_path_factory):
    root = tmp_path_factory.mktemp("serving")
    ratings = synthetic_ratings(n_users=30, n_items=50, seed=5)
    write_release_atomic(root / "items.npz", plaintext_release(ratings, TrainConfig(epochs=20)))
    folder = root / "holder"
    folder.mkdir()
    write_ratings_csv(ratings.subset(np.isin(ratings.users, [f"u{i}" for i in range(1, 11)])), folder / "ratings.csv")
    (folder / "cohorts.csv").write_text("user,cohort\nu1,young\nu2,old\nu99,young\n")
    catalogue = [f"i{j}" for j in range(1, 51)]
    counts = np.tile(np.arange(50, 0, -1, dtype=float), (2, 1))  # i1 most popular in both cohorts
    write_popularity_atomic(root / "popularity.npz", Popularity(["old", "young"], catalogue, counts, {"note": "test"}))
    return root, folder, ratings


def recommend(root, folder, user, *extra):
    return run_cli("recommend", "--release", str(root / "items.npz"), "--holder", str(folder), "--user", user, *extra)


def test_recommend_controls_forget_and_cold_start_through_the_cli(holder):
    root, folder, ratings = holder
    rated = set(ratings.items[ratings.users == "u1"])
    first = recommend(root, folder, "u1", "--k", "5", "--explain", "--json")
    assert first.returncode == 0, first.stderr
    result = json.loads(first.stdout)
    assert len(result["items"]) == 5 and not set(result["items"]) & rated
    for explained in result["explanations"]:
        assert explained["baseline"] + sum(explained["contributions"].values()) == pytest.approx(explained["score"])
        assert set(explained["contributions"]) == rated

    gift = result["items"][0]
    changed = run_cli("controls", "--holder", str(folder), "--exclude", "u1", gift)
    assert changed.returncode == 0, changed.stderr
    again = json.loads(recommend(root, folder, "u1", "--k", "5", "--json").stdout)
    assert gift not in again["items"] and len(again["items"]) == 5 and not set(again["items"]) & rated

    assert run_cli("controls", "--holder", str(folder), "--forget", "u2").returncode == 0
    refused = recommend(root, folder, "u2")
    assert refused.returncode == 2 and "cold-start" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    cold = json.loads(recommend(root, folder, "u2", "--k", "3", "--popularity", str(root / "popularity.npz"), "--json").stdout)
    assert cold["items"] == ["i1", "i2", "i3"] and cold["source"].startswith("cold start")
    new_user = json.loads(recommend(root, folder, "u99", "--k", "2", "--popularity", str(root / "popularity.npz"), "--json").stdout)
    assert new_user["items"] == ["i1", "i2"]


@pytest.mark.parametrize("case", ["unknown user", "malformed controls", "malformed release", "controls unknown user",
                                  "refine not allowed", "refine without shares"])
def test_bad_input_gives_one_line_and_exit_2(holder, tmp_path, case):
    root, folder, _ = holder
    if case == "unknown user":
        done = recommend(root, folder, "nobody")
    elif case == "malformed controls":
        broken = tmp_path / "holder"
        broken.mkdir()
        (broken / "ratings.csv").write_text((folder / "ratings.csv").read_text())
        (broken / "controls.json").write_text('{"exclude": {"u1": "i3"}}')
        done = recommend(root, broken, "u1")
    elif case == "malformed release":
        (tmp_path / "items.npz").write_bytes(b"not an archive")
        done = recommend(tmp_path, folder, "u1")
    elif case == "controls unknown user":
        before = (folder / "controls.json").read_text() if (folder / "controls.json").exists() else None
        done = run_cli("controls", "--holder", str(folder), "--forget", "nobody")
        assert ((folder / "controls.json").read_text() if before is not None else None) == before
    elif case == "refine not allowed":
        done = recommend(root, folder, "u1", "--refine", str(tmp_path))
    else:
        allowed = tmp_path / "holder"
        allowed.mkdir()
        (allowed / "ratings.csv").write_text((folder / "ratings.csv").read_text())
        (allowed / "serving.toml").write_text("allow_refine = true\n")
        done = recommend(root, allowed, "u1", "--refine", str(tmp_path))
        assert "--save-shares" in done.stderr
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mpc-rec: error:"), done.stderr
