"""The model's own reason for a score, computed by the holder from what it alone has.

With the user's vector x_u = A_u^-1 sum_i q~_i t_ui (see ``embeddings``), the score of
item j splits exactly over the user's rated items:

    score_j = mu + c_j + sum_{i in R(u)} w_ij,   w_ij = (q~_j^T A_u^-1 q~_i) t_ui

w_ij is how much the user's rating of item i (relative to what the model expected of
anyone, t_ui = r_ui - mu - c_i) pushes item j up or down, through the similarity of i
and j in the model's metric A_u^-1. The contributions sum to the score to float64
precision; the items with the largest w_ij are the ones that drove it. Uses the exact
float64 vector, not the compressed one the index ranks with.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mpc_rec.holder import ItemRelease
from mpc_rec.serving.embeddings import DEFAULT_REGULARIZATION, user_system

DRIVERS_SHOWN = 3


def contributions(release: ItemRelease, rated_items: np.ndarray, ratings: np.ndarray, item: int,
                  regularization: float = DEFAULT_REGULARIZATION) -> tuple[float, float, np.ndarray]:
    """(score_j, baseline mu + c_j, w_ij per rated item) for item index ``item``."""
    baseline = release.mean + float(release.biases[item])
    if len(rated_items) == 0:
        return baseline, baseline, np.zeros(0)
    system, rated, targets = user_system(release, rated_items, ratings, regularization)
    query = np.append(release.factors[item], 1.0)
    weights = np.linalg.solve(system, query) @ rated.T  # q~_j^T A^-1 q~_i for every rated i (A symmetric)
    parts = weights * targets
    return baseline + float(parts.sum()), baseline, parts


def explain_items(release: ItemRelease, rated_items: np.ndarray, ratings: np.ndarray, shown: list[int],
                  regularization: float = DEFAULT_REGULARIZATION) -> list[dict[str, Any]]:
    """For each shown item: its score, the baseline and the user's items that drove it."""
    out = []
    for item in shown:
        score, baseline, parts = contributions(release, rated_items, ratings, item, regularization)
        top = np.argsort(-parts, kind="stable")[:DRIVERS_SHOWN]
        out.append({
            "item": release.item_ids[item], "score": score, "baseline": baseline,
            "drivers": [{"item": release.item_ids[int(rated_items[t])], "rating": float(ratings[t]),
                         "contribution": float(parts[t])} for t in top if parts[t] > 0],
            "contributions": {release.item_ids[int(i)]: float(p) for i, p in zip(rated_items, parts)},
        })
    return out
