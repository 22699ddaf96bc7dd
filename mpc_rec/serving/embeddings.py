"""User vectors fitted on the holder's side against the released item factors.

For user u with rated items R(u), write each item as q~_i = (q_i, 1) and the target
as t_ui = r_ui - mu - c_i. The user's vector x_u = (p_u, b_u) is the ridge solution

    x_u = A_u^-1 sum_{i in R(u)} q~_i t_ui,   A_u = sum_{i in R(u)} q~_i q~_i^T + lambda n_u I

(the ALS user step, with the per-rating penalty the trainer uses). It needs only the
user's own ratings and the public release. The score of item j is
mu + c_j + q~_j . x_u; ranking needs q_j . p_u + c_j only.

Stored compressed: ``int8`` (one float32 scale per user, symmetric quantisation) or
``float16``; ``float64`` keeps the exact solution. ``embeddings.npz`` also records the
digest of the release and of the ratings and controls it was fitted from, so a stale
file is noticed and refitted.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass

import numpy as np

from mpc_rec.data import Ratings
from mpc_rec.errors import DataError
from mpc_rec.files import write_bytes_atomic
from mpc_rec.holder import ItemRelease

PRECISIONS = ("int8", "float16", "float64")
DEFAULT_REGULARIZATION = 0.1  # as TrainConfig.regularization: lambda = 0.1 per rating


def release_digest(release: ItemRelease) -> str:
    digest = hashlib.sha256()
    digest.update("\n".join(release.item_ids).encode("utf-8"))
    for array in (release.factors, release.biases, np.float64(release.mean)):
        digest.update(np.ascontiguousarray(array, dtype=np.float64).tobytes())
    return digest.hexdigest()


def ratings_digest(ratings: Ratings) -> str:
    digest = hashlib.sha256()
    for user, item, value in sorted(zip(ratings.users, ratings.items, ratings.values.tolist())):
        digest.update(f"{user}\t{item}\t{value!r}\n".encode("utf-8"))
    return digest.hexdigest()


def user_system(release: ItemRelease, items: np.ndarray, values: np.ndarray,
                regularization: float = DEFAULT_REGULARIZATION) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(A_u, Q~_R, t_R) for one user's rated item indices and ratings."""
    rated = np.hstack([release.factors[items], np.ones((len(items), 1))])
    targets = values - release.mean - release.biases[items]
    system = rated.T @ rated + regularization * max(len(items), 1) * np.eye(rated.shape[1])
    return system, rated, targets


def fit_user(release: ItemRelease, items: np.ndarray, values: np.ndarray,
             regularization: float = DEFAULT_REGULARIZATION) -> np.ndarray:
    """x_u = (p_u, b_u) in float64; zeros for a user with no usable ratings."""
    if len(items) == 0:
        return np.zeros(release.factors.shape[1] + 1)
    system, rated, targets = user_system(release, items, values, regularization)
    return np.linalg.solve(system, rated.T @ targets)


@dataclass(frozen=True, eq=False)
class Embeddings:
    """Compressed user vectors: row r of ``codes`` (times ``scales[r]`` for int8) is x_u."""

    users: list[str]
    codes: np.ndarray
    scales: np.ndarray  # per user; 1.0 for float16 and float64
    precision: str
    release: str  # release_digest of the factors they were fitted against
    source: str  # ratings_digest of the (controlled) ratings they were fitted from

    def vector(self, row: int) -> np.ndarray:
        return self.codes[row].astype(np.float64) * float(self.scales[row])

    def row_of(self, user: str) -> int | None:
        try:
            return self.users.index(user)
        except ValueError:
            return None

    @property
    def nbytes(self) -> int:
        return int(self.codes.nbytes + (self.scales.nbytes if self.precision == "int8" else 0))


def compress(vectors: np.ndarray, precision: str) -> tuple[np.ndarray, np.ndarray]:
    if precision == "float64":
        return vectors.astype(np.float64), np.ones(len(vectors), dtype=np.float32)
    if precision == "float16":
        return vectors.astype(np.float16), np.ones(len(vectors), dtype=np.float32)
    if precision == "int8":
        peak = np.abs(vectors).max(axis=1) if vectors.size else np.zeros(len(vectors))
        scales = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
        codes = np.clip(np.rint(vectors / scales[:, None]), -127, 127).astype(np.int8)
        return codes, scales
    raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


def fit_embeddings(release: ItemRelease, ratings: Ratings, *, precision: str = "int8",
                   regularization: float = DEFAULT_REGULARIZATION) -> Embeddings:
    """Every user of ``ratings`` (already filtered by the holder's controls)."""
    index = {item: k for k, item in enumerate(release.item_ids)}
    unknown = sorted({item for item in ratings.items if item not in index})
    if unknown:
        raise DataError(f"item {unknown[0]!r} is rated but not in the released catalogue")
    users = sorted(set(ratings.users))
    row = {user: k for k, user in enumerate(users)}
    order = np.argsort(np.fromiter((row[u] for u in ratings.users), dtype=np.int64, count=len(ratings)), kind="stable")
    owners = np.fromiter((row[u] for u in ratings.users), dtype=np.int64, count=len(ratings))[order]
    items = np.fromiter((index[i] for i in ratings.items), dtype=np.int64, count=len(ratings))[order]
    values = ratings.values[order]
    bounds = np.searchsorted(owners, np.arange(len(users) + 1))
    vectors = np.zeros((len(users), release.factors.shape[1] + 1))
    for k in range(len(users)):
        lo, hi = bounds[k], bounds[k + 1]
        vectors[k] = fit_user(release, items[lo:hi], values[lo:hi], regularization)
    codes, scales = compress(vectors, precision)
    return Embeddings(users, codes, scales, precision, release_digest(release), ratings_digest(ratings))


def write_embeddings_atomic(path, embeddings: Embeddings) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, users=np.asarray(embeddings.users, dtype=str), codes=embeddings.codes, scales=embeddings.scales,
             precision=np.asarray(embeddings.precision), release=np.asarray(embeddings.release),
             source=np.asarray(embeddings.source))
    write_bytes_atomic(path, buffer.getvalue())


def load_embeddings(path) -> Embeddings:
    name = os.fspath(path)
    try:
        with np.load(name, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in ("users", "codes", "scales", "precision", "release", "source")}
    except (OSError, ValueError, EOFError, KeyError) as exc:
        raise DataError(f"{name}: not a readable embeddings file ({exc})") from None
    precision = str(arrays["precision"])
    codes, scales = arrays["codes"], arrays["scales"]
    if (precision not in PRECISIONS or codes.ndim != 2 or codes.dtype != np.dtype(precision)
            or scales.shape != (codes.shape[0],) or len(arrays["users"]) != codes.shape[0]):
        raise DataError(f"{name}: inconsistent embeddings file")
    return Embeddings([str(u) for u in arrays["users"]], codes, scales, precision, str(arrays["release"]),
                      str(arrays["source"]))
