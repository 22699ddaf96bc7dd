"""Secure training: ``model.train_epoch`` on shares, its data part fused (``mpc.fused``)."""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import torch

from mpc_rec.compat import import_crypten
from mpc_rec.model import (
    ModelState, TrainConfig, TrainingData, data_gradients, exact_item_aggregates, initial_parameters, train_epoch,
)
from mpc_rec.mpc.fused import FusedStep
from mpc_rec.mpc.sharing import share_public


def to_fixed_point(x: Any) -> Any:
    """Re-encode an integer-valued sharing (precision 0) at the default fixed-point scale."""
    from crypten.encoder import FixedPointEncoder

    result = x.clone()
    result._tensor.encode_(FixedPointEncoder())
    result.encoder = result._tensor.encoder
    return result


def divide(numerator: Any, count: Any, *, count_max: int, fixed_point: bool = False) -> Any:
    """numerator / count for a shared count in [1, count_max] (public bound).

    ``count`` is integer-encoded (precision 0) unless ``fixed_point`` says it is already
    at the fixed-point scale (e.g. a noised, clipped count).

    Newton's iteration y <- y (2 - z y) for 1/z, z = count / count_max in (0, 1], from
    y = 1: y grows at most twofold per step until it reaches 1/z, then converges
    quadratically, so log2(count_max) + 6 steps always suffice. Relative error is about
    2^-16 * count_max / count (the fixed-point resolution of z).
    """
    z = (count if fixed_point else to_fixed_point(count)).div(count_max)
    y = share_public(torch.tensor(1.0, dtype=torch.float64))
    for _ in range(int(math.ceil(math.log2(count_max))) + 6):
        y = y * (2 - z * y)
    return numerator.div(count_max) * y


def shared_training_data(ratings: Any, mask: Any) -> TrainingData:
    """Counts and the global mean, computed on shares (mask shared with precision 0)."""
    n_users, n_items = ratings.size()
    mean = divide(ratings.sum(), mask.sum(), count_max=n_users * n_items)
    return TrainingData(ratings, mask, mask.sum(1), mask.sum(0), mean)


def train_secure(
    data: TrainingData,
    config: TrainConfig,
    on_epoch: Callable[[int, float], None] | None = None,
    item_aggregates: Callable | None = None,
) -> tuple[ModelState, list[float], float]:
    """Train from the public initialisation; returns the shared model, epoch times and the
    step's set-up time (opening the mask, asking for the first epoch's correlations).

    ``item_aggregates`` replaces the exact item-side sums (the differentially private run
    passes one that clips and adds noise). The fused step needs the TTP dealer's requests
    (``mpc.dealer``); the INSECURE TFP benchmark mode has no dealer process and runs the
    same step on CrypTen's generic operators.
    """
    started = time.perf_counter()
    n_users, n_items = data.ratings.size()
    state = ModelState(*[share_public(p) for p in initial_parameters(n_users, n_items, config)])
    if import_crypten().cfg.mpc.provider == "TTP":
        step = FusedStep(data, config.factors, private=item_aggregates is not None)
        next_state = lambda s, last: step.epoch(s, config, item_aggregates, last=last)  # noqa: E731
    else:
        gradients = lambda s, d: data_gradients(s, d, item_aggregates or exact_item_aggregates)  # noqa: E731
        next_state = lambda s, last: train_epoch(s, data, config, gradients)  # noqa: E731
    setup_seconds = time.perf_counter() - started
    epoch_seconds = []
    for epoch in range(config.epochs):
        started = time.perf_counter()
        state = next_state(state, epoch == config.epochs - 1)
        epoch_seconds.append(time.perf_counter() - started)
        if on_epoch is not None:
            on_epoch(epoch + 1, epoch_seconds[-1])
    return state, epoch_seconds, setup_seconds
