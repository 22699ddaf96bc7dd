"""The plaintext reference: the same algorithm, start and user order, in float64."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from mpc_rec.data import Ratings, dense_matrices
from mpc_rec.model import (
    ModelState, TrainConfig, initial_parameters, plaintext_data, predictions, rmse_from,
    squared_error_sum, top_k_plain, train_epoch,
)


def run_reference(
    train: Ratings, test: Ratings, user_blocks: list[list[str]], catalogue: list[str],
    config: TrainConfig, top_k: int,
) -> dict[str, Any]:
    users = [user for block in user_blocks for user in block]  # the parties' row order
    ratings, mask = dense_matrices(train, users, catalogue)
    test_ratings, test_mask = dense_matrices(test, users, catalogue)
    data = plaintext_data(ratings, mask)
    state = ModelState(*initial_parameters(len(users), len(catalogue), config))
    epoch_seconds = []
    for _ in range(config.epochs):
        started = time.perf_counter()
        state = train_epoch(state, data, config)
        epoch_seconds.append(time.perf_counter() - started)
    test_data = plaintext_data(test_ratings, test_mask)
    sse = float(squared_error_sum(state, data.mean, test_data.ratings, test_data.mask))
    count = float(test_mask.sum())
    mean_only = float((((test_ratings - float(data.mean)) * test_mask) ** 2).sum())
    scores = predictions(state, data.mean).numpy()
    top = top_k_plain(scores, mask, top_k)
    return {
        "rmse": rmse_from(sse, count),
        "rmse_global_mean": rmse_from(mean_only, count),
        "plaintext_epoch_s": float(np.mean(epoch_seconds)),
        "top_items": {user: [catalogue[i] for i in top[row]] for row, user in enumerate(users)},
    }
