"""Why an item was shown to a user: computed by the holder from what it alone has.

The model's item factors stay secret-shared in this version, so the holder cannot read
the model's own reason. It can relate the shown item to the user's own rated items
through signals it legitimately holds: its own users' ratings and the lists released
to its own users (which the shared model produced). For a shown item j and a user u:

    score(i, j) = |liked(i) & signal(j)| / sqrt(|liked(i)| |signal(j)|)

over this party's users other than u, where liked(i) = users who rated i at or above
their own mean rating, and signal(j) = users who liked j or were shown j. The user's
liked items with the highest scores are "the items that drove it". Nothing here
leaves the holder except into its own output folder.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

EXPLAINED_USERS = 20  # per party: enough to read, small enough to keep party outputs light
DRIVERS_PER_ITEM = 3
METHOD = ("co-occurrence at this party: the user's own liked items (rated at or above the user's mean) that "
          "this party's other users liked together with the shown item, or liked while being shown it; "
          "the model's item factors are not released in this run, so this is the holder's explanation "
          "from its own data, not the model's internal reason")


def explain(
    users: Sequence[str], catalogue: Sequence[str], ratings: np.ndarray, rated: np.ndarray,
    shown: Sequence[Sequence[str]], *, limit: int = EXPLAINED_USERS,
) -> dict[str, Any]:
    """Drivers of each shown item for the first ``limit`` users (by id order)."""
    index = {item: i for i, item in enumerate(catalogue)}
    counts = rated.sum(1, keepdims=True)
    means = np.divide((ratings * rated).sum(1, keepdims=True), counts, out=np.zeros_like(counts, dtype=float),
                      where=counts > 0)
    liked = (rated > 0) & (ratings >= means)
    shown_matrix = np.zeros_like(liked)
    for row, items in enumerate(shown):
        for item in items:
            if item in index:  # a list repeated from an earlier run may name items no longer listed
                shown_matrix[row, index[item]] = True
    signal = liked | shown_matrix
    liked_i, signal_i = liked.astype(np.float64), signal.astype(np.float64)  # BLAS; counts stay exact
    together = liked_i.T @ signal_i  # items x items co-occurrence counts over this party's users
    liked_count, signal_count = liked_i.sum(0), signal_i.sum(0)
    explained = []
    for row, user in list(enumerate(users))[:limit]:
        own = np.flatnonzero(liked[row])
        items = []
        for item in shown[row]:
            if item not in index:
                items.append({"item": item, "drivers": []})
                continue
            j = index[item]
            # leave the user out: its own list and ratings would explain everything equally
            co = together[own, j] - liked_i[row, own] * signal_i[row, j]
            denom = np.sqrt((liked_count[own] - liked_i[row, own]) * (signal_count[j] - signal_i[row, j]))
            score = np.divide(co, denom, out=np.zeros(len(own)), where=denom > 0)
            order = np.lexsort((-ratings[row, own], -score))[:DRIVERS_PER_ITEM]
            drivers = [{"item": catalogue[own[o]], "rating": float(ratings[row, own[o]]), "score": float(score[o])}
                       for o in order if score[o] > 0]
            items.append({"item": item, "drivers": drivers})
        explained.append({"user": user, "items": items})
    return {"method": METHOD, "users": explained, "users_total": len(users)}
