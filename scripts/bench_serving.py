#!/usr/bin/env python3
"""Serving figures: local matching latency (exact and HNSW), embedding compression,
hybrid refinement in MPC, and cold-start recall on MovieLens 100K.

1. Item release: the plaintext reference trained on an 80/20 rating split of ML-100K,
   wrapped in ItemRelease (mpc_rec.serving.plain; not private, a stand-in for the
   federated release). User vectors are fitted on the holder's side from the training
   ratings (float64, float16, int8): bytes per user, score error, top-10 overlap with
   float64, and recall@10 on held-out ratings >= 4.
2. Latency per query: exact (numpy) and HNSW (faiss, when importable) on the ML-100K
   catalogue and on a large synthetic catalogue (--large-items, K = 16), with the
   HNSW recall@10 against exact search and its build time.
3. Hybrid refinement: the ML-100K model shared by real CrypTen processes (2 parties +
   TTP dealer), each party's shares saved and reloaded, then --queries refinements of
   C = --candidates local candidates to the top 10; seconds and bytes per query
   (session start-up reported apart: a serving session stays up between queries).
4. Cold start: users split 80/20; the held-out users are "new". Noisy per-cohort
   popularity in MPC (2 parties) from the other users at --epsilons; recall@10 of the
   held-out users' liked items (>= 4) against noisy global popularity (the same
   release summed over cohorts), exact global popularity and exact cohort popularity
   (both non-private references), and the shipped rule (cohort counts plus the average
   cohort's, mpc_rec.serving.cold_start.cohort_scores). ML-100K in the shared folder
   has no u.user, so the cohort is a coarse public account attribute: the calendar
   quarter of the user's first rating (sign-up quarter).

Each figure is measured in this run, side by side. The last line is one JSON object.

    .venv/bin/python scripts/bench_serving.py [--data PATH] [--large-items 1000000] [--epsilons 1 4]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEFAULT_DATA = REPO.parent / "shared" / "datasets" / "ml-100k" / "ml-100k.inter"
K = 10
PARTS = ("compression", "matching", "cold_start", "refinement")

from mpc_rec.data import load_ratings, partition_users, sort_ids, split_train_test  # noqa: E402
from mpc_rec.holder import ItemRelease  # noqa: E402
from mpc_rec.model import TrainConfig  # noqa: E402
from mpc_rec.serving.embeddings import fit_embeddings  # noqa: E402
from mpc_rec.serving.index import ExactIndex, HnswIndex  # noqa: E402
from mpc_rec.serving.plain import plaintext_model  # noqa: E402


def liked_by_user(ratings, like=4.0) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for user, item, value in zip(ratings.users, ratings.items, ratings.values):
        if value >= like:
            out.setdefault(user, set()).add(item)
    return out


def rated_by_user(ratings) -> dict[str, set[int]]:
    out: dict[str, set[str]] = {}
    for user, item in zip(ratings.users, ratings.items):
        out.setdefault(user, set()).add(item)
    return out


def latency(index, vectors: np.ndarray, excludes: list[np.ndarray], repeat: int = 1) -> dict[str, float]:
    times = []
    for _ in range(repeat):
        for vector, exclude in zip(vectors, excludes):
            started = time.perf_counter()
            index.top_k(vector, K, exclude)
            times.append(time.perf_counter() - started)
    times = np.asarray(times) * 1e6
    return {"median_us": float(np.median(times)), "p95_us": float(np.percentile(times, 95)), "queries": len(times)}


def hnsw_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def compression(release, train, test) -> dict:
    index = ExactIndex(release.factors, release.biases)
    item_of = {item: j for j, item in enumerate(release.item_ids)}
    rated, liked = rated_by_user(train), liked_by_user(test)
    out, lists = {}, {}
    exact = fit_embeddings(release, train, precision="float64")
    for precision in ("float64", "float16", "int8"):
        emb = exact if precision == "float64" else fit_embeddings(release, train, precision=precision)
        vectors = np.array([emb.vector(r) for r in range(len(emb.users))])
        error = np.abs(vectors - np.array([exact.vector(r) for r in range(len(exact.users))]))
        hits, relevant, tops = 0, 0, {}
        for row, user in enumerate(emb.users):
            exclude = np.array(sorted(item_of[i] for i in rated[user]))
            tops[user] = index.top_k(vectors[row, :-1], K, exclude).tolist()
            if user in liked:
                hits += len({release.item_ids[j] for j in tops[user]} & liked[user])
                relevant += len(liked[user])
        lists[precision] = tops
        out[precision] = {"bytes_per_user": emb.nbytes / len(emb.users), "bytes_total": emb.nbytes,
                          "max_abs_vector_error": float(error.max()), "recall_at_10": hits / relevant}
    for precision in ("float16", "int8"):
        overlap = np.mean([len(set(lists[precision][u]) & set(lists["float64"][u])) / K for u in lists["float64"]])
        out[precision]["top10_overlap_with_float64"] = float(overlap)
    return out


def matching(release, train, large_items: int, hnsw: bool) -> dict:
    item_of = {item: j for j, item in enumerate(release.item_ids)}
    emb = fit_embeddings(release, train, precision="int8")
    rated = rated_by_user(train)
    vectors = np.array([emb.vector(r)[:-1] for r in range(len(emb.users))])
    excludes = [np.array(sorted(item_of[i] for i in rated[u])) for u in emb.users]
    out = {"ml100k": {"items": len(release.item_ids), "exact": latency(ExactIndex(release.factors, release.biases),
                                                                      vectors, excludes, repeat=3)}}
    if hnsw:
        started = time.perf_counter()
        index = HnswIndex(release.factors, release.biases)
        out["ml100k"]["hnsw"] = {"build_s": time.perf_counter() - started, **latency(index, vectors, excludes, repeat=3)}
    # Large synthetic catalogue: item factors drawn like the trained ones (same per-coordinate scale).
    rng = np.random.default_rng(0)
    k = release.factors.shape[1]
    factors = rng.normal(0, release.factors.std(), size=(large_items, k))
    biases = rng.normal(0, release.biases.std(), size=large_items)
    queries = vectors[rng.choice(len(vectors), 200, replace=False)]
    query_excludes = [rng.choice(large_items, len(e), replace=False) for e in excludes[:200]]
    exact = ExactIndex(factors, biases)
    large = {"items": large_items, "factors": k, "exact": latency(exact, queries, query_excludes)}
    if hnsw:
        started = time.perf_counter()
        index = HnswIndex(factors, biases)
        build = time.perf_counter() - started
        found = [index.top_k(q, K, e) for q, e in zip(queries, query_excludes)]
        truth = [exact.top_k(q, K, e) for q, e in zip(queries, query_excludes)]
        recall = np.mean([len(set(a.tolist()) & set(b.tolist())) / K for a, b in zip(found, truth)])
        large["hnsw"] = {"build_s": build, "recall_at_10_vs_exact": float(recall), **latency(index, queries, query_excludes)}
        large["exact_over_hnsw_latency"] = large["exact"]["median_us"] / large["hnsw"]["median_us"]
    out["large"] = large
    return out


def _share_and_refine(session, model, rows, users, catalogue, folder, queries, candidates):
    import crypten
    import torch

    from mpc_rec.model import ModelState
    from mpc_rec.serving.refine import SHARES_FILE, model_shares_record, refine_party, save_model_shares

    rank = session.endpoint.rank
    state = ModelState(*(crypten.cryptensor(torch.as_tensor(model[n]), src=0)
                         for n in ("user_factors", "item_factors", "user_bias", "item_bias")))
    record = model_shares_record(session, state, crypten.cryptensor(torch.tensor(model["mean"]), src=0), rows)
    path = Path(folder) / f"party-{rank}" / SHARES_FILE
    save_model_shares(path, record["arrays"], {**record["meta"], "users": users[rank], "catalogue": catalogue, "plan": None})
    del state, record
    out = []
    for query in queries:  # the holder (party 1) asks each time
        before = session.traffic()
        result = refine_party(session, str(path), query if rank == 1 else None)
        after = session.traffic()
        out.append({"seconds": result["seconds"], "bytes": after["bytes"] - before["bytes"],
                    "rounds": after["rounds"] - before["rounds"], "order": result.get("order")})
    return out


def refinement(trained, n_queries: int, n_candidates: int) -> dict:
    from mpc_rec.serving.processes import run_session

    users, catalogue, state, mean = trained
    model = {"user_factors": state.user_factors.numpy(), "item_factors": state.item_factors.numpy(),
             "user_bias": state.user_bias.numpy(), "item_bias": state.item_bias.numpy(), "mean": mean}
    half = len(users) // 2
    rows, blocks = [half, len(users) - half], [users[:half], users[half:]]
    rng = np.random.default_rng(1)
    queries, truth = [], []
    for _ in range(n_queries):
        row = int(rng.integers(rows[1]))
        positions = rng.choice(len(catalogue), n_candidates, replace=False).tolist()
        scores = model["item_factors"][positions] @ model["user_factors"][half + row] + model["item_bias"][positions]
        queries.append({"row": row, "positions": positions, "k": K})
        truth.append(np.argsort(-scores, kind="stable")[:K].tolist())
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        results = run_session(_share_and_refine, [(model, rows, blocks, catalogue, folder, queries, n_candidates)] * 2,
                              timeout_s=600)
        wall = time.perf_counter() - started
    holder = results[1]
    seconds = [r["seconds"] for r in holder]
    agree = np.mean([len(set(r["order"]) & set(t)) / K for r, t in zip(holder, truth)])
    return {"users": len(users), "items": len(catalogue), "candidates": n_candidates, "k": K, "queries": n_queries,
            "seconds_per_query_median": float(np.median(seconds)), "seconds_per_query": seconds,
            "bytes_per_query_per_party": [float(np.mean([r["bytes"] for r in party])) for party in results],
            "rounds_per_query": float(np.mean([r["rounds"] for r in holder])),
            "top10_agreement_with_plaintext": float(agree), "session_wall_s_incl_startup_and_sharing": wall}


def cold_start(ratings, epsilon: float, max_items: int, timestamps: dict[str, float]) -> dict:
    from mpc_rec.serving.cold_start import bounded_counts, build_popularity, cohort_scores

    users = sort_ids(set(ratings.users))
    def quarter(stamp: float) -> str:
        day = datetime.fromtimestamp(stamp, timezone.utc)
        return f"{day.year}-Q{(day.month - 1) // 3 + 1}"

    cohort_of = {u: quarter(timestamps[u]) for u in users}
    rng = np.random.default_rng(2)
    new = set(rng.choice(users, len(users) // 5, replace=False).tolist())
    known = ratings.subset(np.array([u not in new for u in ratings.users]))
    catalogue = sort_ids(set(ratings.items))
    with tempfile.TemporaryDirectory() as ledger:
        popularity, record = build_popularity(partition_users(known, 2, seed=3), cohort_of, catalogue, epsilon=epsilon,
                                              delta=1e-5, max_items=max_items, like=4.0, trusted_parties=1,
                                              ledger_dir=Path(ledger), dataset="0" * 64, timeout_s=600)
    cohorts = popularity.cohorts
    exact = bounded_counts(known, cohort_of, cohorts, catalogue, max_items=max_items, like=4.0)
    raw_global = np.zeros(len(catalogue))
    item_of = {item: j for j, item in enumerate(catalogue)}
    for item, value in zip(known.items, known.values):
        raw_global[item_of[item]] += value >= 4.0
    liked = liked_by_user(ratings.subset(np.array([u in new for u in ratings.users])))

    def recall(score_of) -> float:
        hits, relevant = 0, 0
        for user, items in liked.items():
            top = np.lexsort((np.arange(len(catalogue)), -score_of(cohort_of[user])))[:K]
            hits += len({catalogue[j] for j in top} & items)
            relevant += len(items)
        return hits / relevant

    row = {c: k for k, c in enumerate(cohorts)}
    noisy_global = popularity.counts.sum(0)
    return {
        "epsilon": popularity.privacy["plan"]["epsilon"], "delta": 1e-5, "max_items_per_user": max_items,
        "sigma_per_count": popularity.privacy["plan"]["derived"]["sigma_total"], "cohorts": len(cohorts),
        "cohort": "calendar quarter of the user's first rating", "new_users": len(liked), "mpc_seconds": record["seconds"],
        "bytes_per_party": record["bytes_per_party"],
        "recall_at_10": {
            "shipped_rule_cohort_plus_average_cohort": recall(lambda c: cohort_scores(popularity, c)),
            "noisy_cohort_popularity": recall(lambda c: popularity.counts[row[c]]),
            "noisy_global_popularity": recall(lambda c: noisy_global),
            "exact_global_popularity_nonprivate": recall(lambda c: raw_global),
            "exact_cohort_popularity_nonprivate": recall(lambda c: exact[row[c]]),
        },
    }


def first_rating_times(path: Path) -> dict[str, float]:
    first: dict[str, float] = {}
    with open(path, encoding="utf-8") as handle:
        header = handle.readline().rstrip("\n").split("\t")
        user_col, time_col = header.index("user_id:token"), header.index("timestamp:float")
        for line in handle:
            fields = line.rstrip("\n").split("\t")
            user, stamp = fields[user_col], float(fields[time_col])
            first[user] = min(stamp, first.get(user, stamp))
    return first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="ML-100K ml-100k.inter (needs its timestamps)")
    parser.add_argument("--large-items", type=int, default=1_000_000)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 4.0])
    parser.add_argument("--max-items", type=int, default=20)
    parser.add_argument("--queries", type=int, default=5)
    parser.add_argument("--candidates", type=int, default=50)
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="what to measure (default: all)")
    args = parser.parse_args()
    if not args.data.exists():
        sys.exit(f"bench_serving: {args.data} not found (pass --data)")
    ratings = load_ratings(args.data)
    train, test = split_train_test(ratings, test_fraction=0.2, seed=0)
    started = time.perf_counter()
    trained = plaintext_model(train, TrainConfig(epochs=100, learning_rate=0.002))
    users, catalogue, state, mean = trained
    release = ItemRelease(catalogue, state.item_factors.numpy(), state.item_bias.numpy(), mean, {"mode": "no-dp"})
    print(f"release: {len(catalogue)} items, K={release.factors.shape[1]}, trained in {time.perf_counter() - started:.1f} s", flush=True)
    figures = {"hnsw_library": "faiss-cpu " + __import__("faiss").__version__ if hnsw_available() else None}
    if "compression" in args.parts:
        figures["compression"] = compression(release, train, test)
        print("compression:", json.dumps(figures["compression"]), flush=True)
    if "matching" in args.parts:
        figures["matching"] = matching(release, train, args.large_items, hnsw_available())
        print("matching:", json.dumps(figures["matching"]), flush=True)
    if "cold_start" in args.parts:
        figures["cold_start"] = [cold_start(ratings, e, args.max_items, first_rating_times(args.data)) for e in args.epsilons]
        print("cold start:", json.dumps(figures["cold_start"]), flush=True)
    if "refinement" in args.parts:
        figures["refinement"] = refinement(trained, args.queries, args.candidates)
        print("refinement:", json.dumps({k: v for k, v in figures["refinement"].items() if k != "seconds_per_query"}), flush=True)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
