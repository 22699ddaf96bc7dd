"""An item release from the plaintext reference trainer, for tests, benchmarks and trials.

It is NOT private: trained on everyone's raw ratings without noise, and labelled so in
its ``privacy`` record. Real releases come from federated training (noised in MPC).
"""

from __future__ import annotations


from mpc_rec.data import Ratings, dense_matrices, sort_ids
from mpc_rec.holder import ItemRelease
from mpc_rec.model import ModelState, TrainConfig, initial_parameters, plaintext_data, train_epoch

NOT_PRIVATE = {"mode": "no-dp", "note": "plaintext reference on raw ratings, no noise: tests and benchmarks only"}


def plaintext_model(ratings: Ratings, config: TrainConfig = TrainConfig(epochs=100, learning_rate=0.002)):
    """(users, catalogue, trained ModelState, mean) of the reference trainer on ``ratings``."""
    users, catalogue = sort_ids(set(ratings.users)), sort_ids(set(ratings.items))
    values, mask = dense_matrices(ratings, users, catalogue)
    data = plaintext_data(values, mask)
    state = ModelState(*initial_parameters(len(users), len(catalogue), config))
    for _ in range(config.epochs):
        state = train_epoch(state, data, config)
    return users, catalogue, state, float(data.mean)


def plaintext_release(ratings: Ratings, config: TrainConfig = TrainConfig(epochs=100, learning_rate=0.002)) -> ItemRelease:
    _, catalogue, state, mean = plaintext_model(ratings, config)
    return ItemRelease(catalogue, state.item_factors.numpy(), state.item_bias.numpy(), mean, dict(NOT_PRIVATE))


__all__ = ["plaintext_model", "plaintext_release"]
