"""Membership inference against what training releases, with and without DP.

The game: a canary user (one extra row) either rated a set of rarely rated items with
the top rating (IN) or rated nothing (OUT: the replace-one neighbour that the DP
guarantee covers). The attacker sees the trained model's item side, or the top-k lists
of all other users, and guesses IN or OUT. Its advantage TPR - FPR is measured over many
independent runs of the mechanism and compared with the bound every (epsilon, delta)-DP
mechanism obeys: TPR <= e^eps FPR + delta and 1 - FPR <= e^eps (1 - TPR) + delta give
advantage <= (e^eps - 1 + 2 delta) / (e^eps + 1).

The runs are the plaintext mechanism, not MPC (hundreds of secure runs would take days):
``model.train_epoch`` as in the secure run, with the same clipping bound, the public item
weight and midpoint mean, and Gaussian noise of the plan's honest standard deviation
sigma_total per coordinate and step (the coalition covered by the guarantee subtracts its
own noise; the discrete Gaussian on the 2^-16 grid with sigma >> 2^-16 behaves as this).
The item side (Q, c) is not released by mpc-rec, but every output that reaches other
parties' users derives from it, so its advantage bounds theirs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch

from mpc_rec.audit.views import wilson
from mpc_rec.model import (
    ModelState, TrainConfig, TrainingData, data_gradients, exact_item_aggregates, initial_parameters, plaintext_data,
    train_epoch,
)
from mpc_rec.mpc.privacy import CLIP_SLACK


def dp_advantage_bound(epsilon: float, delta: float) -> float:
    """Largest TPR - FPR of any test against an (epsilon, delta)-DP mechanism."""
    return min(1.0, (math.exp(epsilon) - 1 + 2 * delta) / (math.exp(epsilon) + 1))


@dataclass
class Mechanism:
    """What the released item side is computed with: None plan means no DP."""

    config: TrainConfig
    plan: Any = None
    item_weight: float = 5.0
    item_step: float = 3.0
    midpoint: float = 3.0
    top_k: int = 10


@dataclass
class AttackResult:
    target: str
    epsilon: float | None
    delta: float | None
    bound: float | None
    advantage: float
    low: float
    high: float
    trials: int
    scores_in: list[float] = field(default_factory=list)
    scores_out: list[float] = field(default_factory=list)


def canary_worlds(ratings: np.ndarray, mask: np.ndarray, rating_max: float, items: int = 10) -> tuple[tuple, tuple, np.ndarray]:
    """(R, M) with the canary row IN and OUT, and the canary's items."""
    counts = mask.sum(axis=0)
    chosen = np.argsort(counts, kind="stable")[: max(1, min(items, mask.shape[1] // 3))]
    row_r = np.zeros((1, ratings.shape[1]))
    row_m = np.zeros((1, ratings.shape[1]))
    row_r[0, chosen], row_m[0, chosen] = rating_max, 1.0
    out_world = (np.vstack([ratings, np.zeros_like(row_r)]), np.vstack([mask, np.zeros_like(row_m)]))
    in_world = (np.vstack([ratings, row_r]), np.vstack([mask, row_m]))
    return in_world, out_world, chosen


def release(world: tuple[np.ndarray, np.ndarray], mechanism: Mechanism, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One run of the mechanism: (item side vector, top-k lists of every user but the canary)."""
    ratings, mask = world
    config = mechanism.config
    n_users, n_items = ratings.shape
    if mechanism.plan is None:
        data, hook = plaintext_data(ratings, mask), exact_item_aggregates
    else:
        r, m = torch.as_tensor(ratings), torch.as_tensor(mask)
        weights = torch.full((n_items,), mechanism.item_weight * mechanism.item_step, dtype=torch.float64)
        data = TrainingData(r, m, m.sum(1), weights, torch.tensor(mechanism.midpoint, dtype=torch.float64))
        hook = _noised_hook(mechanism, rng)
    state = ModelState(*initial_parameters(n_users, n_items, config))
    for _ in range(config.epochs):
        state = train_epoch(state, data, config, partial(data_gradients, item_aggregates=hook))
    item_side = np.concatenate([state.item_factors.numpy().reshape(-1), state.item_bias.numpy()])
    scores = (state.user_factors @ state.item_factors.T + state.user_bias[:, None] + state.item_bias[None, :]).numpy()
    scores = np.where(mask[:-1] > 0, -np.inf, scores[:-1])
    k = min(mechanism.top_k, n_items - 1)
    top = np.argpartition(-scores, k, axis=1)[:, :k]  # the attack counts items, order does not matter
    return item_side, top


def _noised_hook(mechanism: Mechanism, rng: np.random.Generator):
    plan, factors = mechanism.plan, mechanism.config.factors
    bound = CLIP_SLACK * plan.clip.step

    def aggregates(error: torch.Tensor, state: ModelState) -> tuple[torch.Tensor, torch.Tensor]:
        e, p = error.numpy(), state.user_factors.numpy()
        norm = np.sqrt((e * e).sum(1) * ((p * p).sum(1) + 1))
        scale = np.minimum(1.0, bound / np.maximum(norm, 1e-300))
        combined = e.T @ np.c_[p * scale[:, None], scale]
        noisy = (combined + rng.normal(0.0, plan.sigma_total, combined.shape)) * mechanism.item_step
        return torch.from_numpy(noisy[:, :factors]), torch.from_numpy(noisy[:, factors])

    return aggregates


def membership_inference(ratings: np.ndarray, mask: np.ndarray, mechanism: Mechanism, *, rating_max: float,
                         trials: int = 200, seed: int = 0) -> list[AttackResult]:
    """Advantage of the item-side and the recommendation attacks, each with a 95% CI.

    Half the runs of each world calibrate the attack (direction and threshold), the other
    half measure it, so the advantage is not fitted to the runs it is measured on.
    """
    rng = np.random.default_rng(seed)
    in_world, out_world, canary_items = canary_worlds(ratings, mask, rating_max)
    runs = {label: [release(world, mechanism, rng) for _ in range(2 * trials)]
            for label, world in (("in", in_world), ("out", out_world))}
    item_in = np.stack([r[0] for r in runs["in"]])
    item_out = np.stack([r[0] for r in runs["out"]])
    direction = item_in[:trials].mean(axis=0) - item_out[:trials].mean(axis=0)
    origin = item_out[:trials].mean(axis=0)
    project = lambda x: (x - origin) @ direction  # noqa: E731
    recommended = lambda lists: float(np.isin(lists, canary_items).sum())  # noqa: E731
    statistics = {
        "item side (Q, c)": (project(item_in), project(item_out)),
        "top-k of other users": (np.array([recommended(r[1]) for r in runs["in"]]),
                                 np.array([recommended(r[1]) for r in runs["out"]])),
    }
    plan = mechanism.plan
    epsilon = None if plan is None else plan.epsilon
    delta = None if plan is None else plan.delta
    bound = None if plan is None else dp_advantage_bound(plan.epsilon, plan.delta)
    results = []
    for target, (scores_in, scores_out) in statistics.items():
        threshold = _best_threshold(scores_in[:trials], scores_out[:trials])
        tpr_hits = int((scores_in[trials:] > threshold).sum())
        fpr_hits = int((scores_out[trials:] > threshold).sum())
        tpr_low, tpr_high = wilson(tpr_hits, trials, confidence=0.975)
        fpr_low, fpr_high = wilson(fpr_hits, trials, confidence=0.975)
        results.append(AttackResult(target, epsilon, delta, bound, (tpr_hits - fpr_hits) / trials,
                                    tpr_low - fpr_high, tpr_high - fpr_low, trials,
                                    scores_in[trials:].tolist(), scores_out[trials:].tolist()))
    return results


def _best_threshold(scores_in: np.ndarray, scores_out: np.ndarray) -> float:
    candidates = np.unique(np.concatenate([scores_in, scores_out]))
    midpoints = np.concatenate([[candidates[0] - 1.0], (candidates[:-1] + candidates[1:]) / 2, [candidates[-1] + 1.0]])
    gains = [(scores_in > t).mean() - (scores_out > t).mean() for t in midpoints]
    return float(midpoints[int(np.argmax(gains))])


def metric_membership(user_sse: np.ndarray, user_counts: np.ndarray, plan: Any, *, error: float, ratings: int = 10,
                      trials: int = 200, seed: int = 0) -> AttackResult:
    """Membership of a canary's held-out ratings in the released test MSE (the model held fixed).

    IN: the canary has ``ratings`` held-out ratings, each off by ``error``; OUT: none. The
    release is computed as the protocol does (dp-noise.md): per-user (SSE, count) clipped
    to C_eval, summed, the honest noise added to both, then divided. Without DP it is exact.
    """
    rng = np.random.default_rng(seed)
    canary = np.array([ratings * error**2, float(ratings)])
    pairs = np.c_[user_sse, user_counts]
    if plan is not None:
        bound = CLIP_SLACK * plan.clip.mean
        scale = lambda v: np.minimum(1.0, bound / np.maximum(np.linalg.norm(v, axis=-1), 1e-300))  # noqa: E731
        pairs = pairs * scale(pairs)[:, None]
        canary = canary * scale(canary)
    base = pairs.sum(axis=0)

    def released(member: bool) -> np.ndarray:
        total = base + (canary if member else 0.0)
        if plan is None:
            return np.full(2 * trials, total[0] / total[1])
        noise = rng.normal(0.0, plan.mean_sigma_total, (2 * trials, 2))
        return (total[0] + noise[:, 0]) / np.maximum(total[1] + noise[:, 1] + 1.0, 1.0)

    scores_in, scores_out = released(True), released(False)
    threshold = _best_threshold(scores_in[:trials], scores_out[:trials])
    tpr_hits = int((scores_in[trials:] > threshold).sum())
    fpr_hits = int((scores_out[trials:] > threshold).sum())
    tpr_low, tpr_high = wilson(tpr_hits, trials, confidence=0.975)
    fpr_low, fpr_high = wilson(fpr_hits, trials, confidence=0.975)
    epsilon, delta = (None, None) if plan is None else (plan.epsilon, plan.delta)
    return AttackResult("released test MSE", epsilon, delta, None if plan is None else dp_advantage_bound(epsilon, delta),
                        (tpr_hits - fpr_hits) / trials, tpr_low - fpr_high, tpr_high - fpr_low, trials,
                        scores_in[trials:].tolist(), scores_out[trials:].tolist())
