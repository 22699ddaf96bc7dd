"""Top-k over the released item factors, on the holder's side.

Ranking key of item j for user vector (p_u, b_u): q_j . p_u + c_j (mu and b_u are the
same for every item). Both indexes return item indices best first and never an index
in ``exclude`` (the user's rated items and the items the user hid).

- ``ExactIndex``: one matrix-vector product and a partial sort (numpy, float64).
- ``HnswIndex``: faiss's HNSW graph over (q_j, c_j) with inner product, queried with
  (p_u, 1). Approximate: it over-fetches by the number of excluded items (widening the
  search beam to match), filters, and falls back to exact search when too few remain
  or the user excluded more than MAX_FETCH items. faiss is optional (``pip install
  faiss-cpu``); the benchmark (scripts/bench_serving.py) says when it pays.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from mpc_rec.errors import ConfigError


class ExactIndex:
    name = "exact"

    def __init__(self, factors: np.ndarray, biases: np.ndarray):
        self.factors = np.ascontiguousarray(factors, dtype=np.float64)
        self.biases = np.asarray(biases, dtype=np.float64)

    def __len__(self) -> int:
        return len(self.biases)

    def scores(self, user_factors: np.ndarray) -> np.ndarray:
        return self.factors @ np.asarray(user_factors, dtype=np.float64) + self.biases

    def top_k(self, user_factors: np.ndarray, k: int, exclude=()) -> np.ndarray:
        scores = self.scores(user_factors)
        excluded = np.fromiter(exclude, dtype=np.int64) if not isinstance(exclude, np.ndarray) else exclude.astype(np.int64)
        scores[excluded] = -np.inf
        k = min(k, len(scores) - len(np.unique(excluded)))
        if k <= 0:
            return np.zeros(0, dtype=np.int64)
        # argpartition picks the k best in O(I); ties resolved by item index, as in a stable full sort
        best = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
        cut = scores[best].min()
        best = np.flatnonzero(scores >= cut)  # everything tied at the boundary, then the stable order
        order = np.lexsort((best, -scores[best]))
        return best[order][:k].astype(np.int64)


class HnswIndex:
    name = "hnsw"
    MAX_FETCH = 4096  # beyond this a graph search costs about as much as the exact one

    def __init__(self, factors: np.ndarray, biases: np.ndarray, *, neighbours: int = 32, ef_construction: int = 80,
                 ef_search: int = 128, cache: Path | None = None):
        try:
            import faiss
        except ImportError:
            raise ConfigError("the hnsw index needs faiss: pip install faiss-cpu==1.15.1") from None
        self.faiss = faiss
        self.ef_search = ef_search
        self.exact = ExactIndex(factors, biases)
        if cache is not None and cache.exists():  # built for this release before: building is the slow part
            self.index = faiss.read_index(str(cache))
            if self.index.ntotal == len(self.exact):
                return
        items = np.hstack([factors, np.asarray(biases)[:, None]]).astype(np.float32)
        self.index = faiss.IndexHNSWFlat(items.shape[1], neighbours, faiss.METRIC_INNER_PRODUCT)
        self.index.hnsw.efConstruction = ef_construction
        self.index.add(items)
        if cache is not None:
            staged = cache.with_name(f".{cache.name}.{os.getpid()}.part")
            faiss.write_index(self.index, str(staged))
            os.replace(staged, cache)

    def __len__(self) -> int:
        return len(self.exact)

    def top_k(self, user_factors: np.ndarray, k: int, exclude=()) -> np.ndarray:
        excluded = set(int(i) for i in exclude)
        fetch = k + len(excluded)
        if fetch > self.MAX_FETCH or 2 * fetch >= len(self):
            return self.exact.top_k(user_factors, k, np.fromiter(excluded, dtype=np.int64))
        query = np.append(np.asarray(user_factors, dtype=np.float32), np.float32(1.0))[None, :]
        beam = self.faiss.SearchParametersHNSW(efSearch=max(self.ef_search, fetch))
        _, found = self.index.search(query, fetch, params=beam)
        kept = [int(i) for i in found[0] if i >= 0 and int(i) not in excluded]
        if len(kept) < k:
            return self.exact.top_k(user_factors, k, np.fromiter(excluded, dtype=np.int64))
        return np.asarray(kept[:k], dtype=np.int64)


INDEXES = {"exact": ExactIndex, "hnsw": HnswIndex}


def build_index(kind: str, factors: np.ndarray, biases: np.ndarray, *, cache: Path | None = None):
    """``cache``: where the HNSW graph of this release is kept between answers (unused by exact search)."""
    if kind not in INDEXES:
        raise ConfigError(f"unknown index {kind!r}; expected one of {sorted(INDEXES)}")
    return HnswIndex(factors, biases, cache=cache) if kind == "hnsw" else ExactIndex(factors, biases)
