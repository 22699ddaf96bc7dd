"""Federated matrix factorization: the maths of one round, vectorised numpy, no processes.

A data holder keeps its users' ratings and user factors; the item side (Q, c) is public
after every round (it is only ever the noised, released item model). Per round:

1. ``user_step``: each user's (p_u, b_u) by ridge regression on the user's own ratings
   against the released items (closed form, one (K+1) x (K+1) solve per user);
2. ``item_contribution``: each user's item-side gradient at that point,
   g_u = (e_ui p_u, e_ui) for the items i the user rated, e_ui = pred_ui - r_ui, clipped
   to L2 norm C' in the clear (the holder sees only its own users), rounded to the
   2^-16 fixed-point grid, and summed over the holder's users: an I x (K+1) integer
   matrix (protocols/federated.md proves the sensitivity bound);
3. ``item_update``: the compute parties' public step on the noised total (momentum SGD
   with a data-independent penalty): post-processing of the noised release.

Prediction: mu + b_u + c_i + p_u . q_i, with mu the public midpoint of the rating scale
(as in the joint mode: the biases absorb the rest, and no budget is spent on a mean).
Every per-rating quantity is a numpy array over ratings; nothing loops per rating.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

FRAC_BITS = 16
SCALE = float(1 << FRAC_BITS)
_SOLVE_CHUNK = 50_000  # users per batched solve: bounds the (users, K+1, K+1) temporaries


@dataclass(frozen=True, eq=False)
class LocalRatings:
    """A holder's ratings as indices: user u (0..n_users-1) rated catalogue item i with r."""

    user: np.ndarray  # int64, one per rating
    item: np.ndarray  # int64, index into the public catalogue
    value: np.ndarray  # float64
    n_users: int

    def __post_init__(self) -> None:
        if not (self.user.shape == self.item.shape == self.value.shape) or self.user.ndim != 1:
            raise ValueError("user, item and value must be 1-D arrays of one length")

    def __len__(self) -> int:
        return int(self.value.shape[0])

    def subset(self, keep: np.ndarray) -> "LocalRatings":
        return LocalRatings(self.user[keep], self.item[keep], self.value[keep], self.n_users)


def _augmented(items: np.ndarray, factors: np.ndarray) -> np.ndarray:
    """x_i = (q_i, 1) for each rating's item: the features of the per-user ridge problem."""
    return np.concatenate([factors[items], np.ones((len(items), 1))], axis=1)


def user_step(ratings: LocalRatings, factors: np.ndarray, biases: np.ndarray, mean: float,
              regularization: float) -> tuple[np.ndarray, np.ndarray]:
    """(P, b): argmin_w sum_i (r_ui - mu - c_i - w . (q_i, 1))^2 + lambda |w|^2 per user.

    A user without ratings gets p_u = 0, b_u = 0 (the ridge solution with no data).
    """
    if regularization <= 0:
        raise ValueError("regularization must be positive (it makes every user's system solvable)")
    k1 = factors.shape[1] + 1
    n = ratings.n_users
    x = _augmented(ratings.item, factors)
    target = ratings.value - mean - biases[ratings.item]
    gram = np.empty((n, k1, k1))
    for a in range(k1):
        for b in range(a, k1):
            column = np.bincount(ratings.user, weights=x[:, a] * x[:, b], minlength=n)
            gram[:, a, b] = column
            gram[:, b, a] = column
    rhs = np.stack([np.bincount(ratings.user, weights=x[:, a] * target, minlength=n) for a in range(k1)], axis=1)
    gram += regularization * np.eye(k1)
    solution = np.empty((n, k1))
    for start in range(0, n, _SOLVE_CHUNK):
        stop = min(n, start + _SOLVE_CHUNK)
        solution[start:stop] = np.linalg.solve(gram[start:stop], rhs[start:stop, :, None])[:, :, 0]
    return solution[:, :-1], solution[:, -1]


def predict(ratings: LocalRatings, user_factors: np.ndarray, user_biases: np.ndarray, factors: np.ndarray,
            biases: np.ndarray, mean: float) -> np.ndarray:
    u, i = ratings.user, ratings.item
    return mean + user_biases[u] + biases[i] + np.einsum("rk,rk->r", user_factors[u], factors[i])


def clip_target(bound: float, dimension: int) -> float:
    """The L2 bound C' each user's real-valued contribution is clipped to.

    Rounding a vector to the 2^-16 grid moves each coordinate by at most half a unit, so
    two users' rounded contributions differ by at most 2 C' 2^16 + sqrt(d) units; with
    C' = C - sqrt(d) 2^-17 that is at most 2 C 2^16, the sensitivity the accountant uses
    (protocols/federated.md, "Sensitivity").
    """
    target = bound - math.sqrt(dimension) / (2.0 * SCALE)
    if target <= 0.5 * bound:
        raise ValueError(f"clip bound {bound} is too small for the 2^-16 grid over {dimension} coordinates")
    return target


@dataclass(frozen=True, eq=False)
class Contribution:
    """A holder's summed, clipped item-side update in ring units, and what went into it."""

    units: np.ndarray  # int64 (I, K+1): sum_u round(2^16 s_u e_ui (p_u, 1))
    scales: np.ndarray  # s_u per user (1: not clipped)
    norms: np.ndarray  # ||g_u|| before clipping

    def values(self) -> np.ndarray:
        """The flat vector the holder encrypts (exact: integers over 2^16)."""
        return self.units.reshape(-1).astype(np.float64) / SCALE


def item_contribution(ratings: LocalRatings, user_factors: np.ndarray, user_biases: np.ndarray,
                      factors: np.ndarray, biases: np.ndarray, mean: float, bound: float) -> Contribution:
    """sum over this holder's users of round(2^16 clip_C'(g_u)), as an exact integer matrix.

    g_u has entries e_ui (p_u, 1) at the items u rated, so ||g_u||^2 =
    (sum_i e_ui^2)(|p_u|^2 + 1) and one scale s_u = min(1, C'/||g_u||) clips it.
    """
    n_items, k = factors.shape
    limit = clip_target(bound, n_items * (k + 1))
    error = predict(ratings, user_factors, user_biases, factors, biases, mean) - ratings.value
    squared = np.bincount(ratings.user, weights=error * error, minlength=ratings.n_users)
    norms = np.sqrt(squared * ((user_factors * user_factors).sum(axis=1) + 1.0))
    scales = np.minimum(1.0, limit / np.where(norms > 0, norms, 1.0))
    weight = scales[ratings.user] * error * SCALE
    columns = np.concatenate([user_factors[ratings.user], np.ones((len(ratings), 1))], axis=1)
    # Per-rating entries rounded to the grid; a user's rounded vector is the rounding of its
    # clipped vector (each coordinate belongs to one rating), and the sums are exact integers.
    entries = np.rint(weight[:, None] * columns)
    units = np.stack([np.bincount(ratings.item, weights=entries[:, a], minlength=n_items) for a in range(k + 1)], axis=1)
    if np.abs(units).max(initial=0.0) >= 2.0**53:
        raise ValueError("an item sum left the exactly representable range")
    return Contribution(np.rint(units).astype(np.int64), scales, norms)


@dataclass(frozen=True)
class ItemStep:
    """The compute parties' public update of the item side from a noised gradient sum."""

    learning_rate: float = 0.05
    momentum: float = 0.5
    regularization: float = 1.0  # data-independent penalty lambda_I |Q|^2 (a count-weighted one would leak)


def item_update(step: ItemStep, factors: np.ndarray, biases: np.ndarray, noised: np.ndarray,
                velocity: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(Q, c, velocity) after one momentum step on noised = sum of clipped g_u plus noise."""
    k = factors.shape[1]
    gradient = np.asarray(noised, dtype=np.float64).reshape(factors.shape[0], k + 1)
    gradient = gradient + step.regularization * np.concatenate([factors, np.zeros((factors.shape[0], 1))], axis=1)
    velocity = gradient if velocity is None else step.momentum * velocity + gradient
    moved = np.concatenate([factors, biases[:, None]], axis=1) - step.learning_rate * velocity
    return moved[:, :k].copy(), moved[:, k].copy(), velocity


def initial_items(n_items: int, factors: int, *, scale: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The public starting point: small Gaussian factors from the run's seed, zero biases."""
    rng = np.random.default_rng([seed, 7])
    return rng.normal(0.0, scale, size=(n_items, factors)), np.zeros(n_items)


# --- evaluation on a holder's own users (released through MPC: federated/evaluation.py) ---


@dataclass(frozen=True, eq=False)
class UserMetrics:
    """Per-user test figures of one holder's users (index = the holder's user index)."""

    squared_error: np.ndarray  # sum over the user's held-out ratings (predictions clamped to the scale)
    test_ratings: np.ndarray  # held-out ratings per user
    recall: np.ndarray  # hits / relevant held-out items, 0 for a user without a relevant item
    has_relevant: np.ndarray  # 1.0 where the user has a relevant held-out item


def user_metrics(train: LocalRatings, test: LocalRatings, user_factors: np.ndarray, user_biases: np.ndarray,
                 factors: np.ndarray, biases: np.ndarray, mean: float, *, top_k: int = 10,
                 rating_range: tuple[float, float] = (1.0, 5.0), relevant_from: float = 4.0,
                 hidden: LocalRatings | None = None, chunk: int = 4096) -> UserMetrics:
    """Each user's test SSE (predictions clamped to the rating scale) and recall@k: relevant =
    held-out ratings >= ``relevant_from``; the top-k is over items the user did not rate in
    training (nor ``hidden``: excluded items)."""
    predicted = np.clip(predict(test, user_factors, user_biases, factors, biases, mean), *rating_range)
    error = predicted - test.value
    squared = np.bincount(test.user, weights=error * error, minlength=test.n_users)
    counts = np.bincount(test.user, minlength=test.n_users).astype(np.float64)
    relevant = test.subset(test.value >= relevant_from)
    per_user = np.bincount(relevant.user, minlength=test.n_users)
    users = np.flatnonzero(per_user)
    recall = np.zeros(test.n_users)
    for start in range(0, len(users), chunk):
        block = users[start:start + chunk]
        position = np.full(test.n_users, -1)
        position[block] = np.arange(len(block))
        scores = user_factors[block] @ factors.T + biases[None, :]  # b_u and mu do not change a user's order
        for seen in (train, hidden):
            if seen is not None:
                rows = position[seen.user]
                scores[rows[rows >= 0], seen.item[rows >= 0]] = -np.inf
        top = np.argpartition(-scores, min(top_k, scores.shape[1] - 1), axis=1)[:, :top_k]
        chosen = np.zeros_like(scores, dtype=bool)
        np.put_along_axis(chosen, top, True, axis=1)
        rows = position[relevant.user]
        inside = rows >= 0
        hit = chosen[rows[inside], relevant.item[inside]]
        hits = np.bincount(rows[inside], weights=hit.astype(np.float64), minlength=len(block))
        recall[block] = hits / per_user[block]
    return UserMetrics(squared, counts, recall, (per_user > 0).astype(np.float64))


# --- a vectorised synthetic data set (100,000+ users without per-rating Python) ------


def synthetic_local(n_users: int, n_items: int, *, ratings_per_user: int = 20, factors: int = 4,
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(user, item, rating) index arrays from a noisy low-rank model with biases, as
    ``mpc_rec.data.synthetic_ratings`` draws them, but sparse: each user rates a
    popularity-weighted sample of ``ratings_per_user`` distinct items."""
    if not 0 < ratings_per_user <= n_items:
        raise ValueError("ratings_per_user must be in 1..n_items")
    rng = np.random.default_rng(seed)
    scale = math.sqrt(0.9) / factors**0.25
    p = rng.normal(0.0, scale, size=(n_users, factors))
    q = rng.normal(0.0, scale, size=(n_items, factors))
    user_bias, item_bias = rng.normal(0.0, 0.4, size=n_users), rng.normal(0.0, 0.4, size=n_items)
    popularity = rng.gamma(0.7, size=n_items)
    # Gumbel top-k draws distinct items per user with popularity weights, vectorised in chunks.
    items = np.empty((n_users, ratings_per_user), dtype=np.int64)
    logits = np.log(popularity / popularity.sum())
    for start in range(0, n_users, 8192):
        stop = min(n_users, start + 8192)
        keys = logits[None, :] + rng.gumbel(size=(stop - start, n_items))
        items[start:stop] = np.argpartition(-keys, ratings_per_user - 1, axis=1)[:, :ratings_per_user]
    users = np.repeat(np.arange(n_users), ratings_per_user)
    items = items.reshape(-1)
    raw = 3.5 + user_bias[users] + item_bias[items] + np.einsum("rk,rk->r", p[users], q[items])
    raw += rng.normal(0.0, 0.3, size=raw.shape)
    return users, items, np.clip(np.rint(raw), 1.0, 5.0)
