"""Pure MF maths: gradients against finite differences, training behaviour, top-k."""

import numpy as np
import pytest
import torch

from mpc_rec.model import (
    ModelState, TrainConfig, initial_parameters, plaintext_data, predictions, squared_error_sum,
    top_k_plain, train_epoch,
)


def loss(params, data, reg):
    state = ModelState(*params)
    sse = squared_error_sum(state, data.mean, data.ratings, data.mask)
    penalty = (data.user_counts.unsqueeze(1) * params[0] ** 2).sum() + (data.item_weights.unsqueeze(1) * params[1] ** 2).sum()
    penalty = penalty + (data.user_counts * params[2] ** 2).sum() + (data.item_weights * params[3] ** 2).sum()
    return sse / 2 + reg / 2 * penalty


def test_first_step_is_the_gradient_of_the_stated_loss():
    rng = np.random.default_rng(0)
    mask = (rng.random((6, 5)) < 0.6).astype(float)
    ratings = np.rint(rng.uniform(1, 5, (6, 5))) * mask
    data = plaintext_data(ratings, mask)
    config = TrainConfig(factors=2, learning_rate=0.01, regularization=0.3, seed=5)
    params = [p.clone().requires_grad_(True) for p in initial_parameters(6, 5, config)]
    loss(params, data, config.regularization).backward()
    stepped = train_epoch(ModelState(*[p.detach() for p in params]), data, config)
    for before, after in zip(params, stepped.params):
        expected = before.detach() - config.learning_rate * before.grad
        torch.testing.assert_close(after, expected)


def test_training_reduces_error_and_beats_global_mean():
    from mpc_rec.data import dense_matrices, split_train_test, synthetic_ratings

    ratings = synthetic_ratings(seed=0)
    train, test = split_train_test(ratings, seed=0)
    users, items = ratings.user_ids(), ratings.item_ids()
    data = plaintext_data(*dense_matrices(train, users, items))
    t_r, t_m = dense_matrices(test, users, items)
    config = TrainConfig(epochs=30)
    state = ModelState(*initial_parameters(len(users), len(items), config))
    for _ in range(config.epochs):
        state = train_epoch(state, data, config)
    pred = predictions(state, data.mean).numpy()
    rmse = np.sqrt((((pred - t_r) * t_m) ** 2).sum() / t_m.sum())
    baseline = np.sqrt((((float(data.mean) - t_r) * t_m) ** 2).sum() / t_m.sum())
    assert rmse < 0.95 * baseline


def test_initialisation_is_deterministic_and_public():
    config = TrainConfig(seed=7)
    a, b = initial_parameters(4, 3, config), initial_parameters(4, 3, config)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)
    assert not torch.equal(a[0], initial_parameters(4, 3, TrainConfig(seed=8))[0])


def test_top_k_skips_excluded_items():
    scores = np.array([[0.1, 0.9, 0.5, 0.7], [1.0, 0.2, 0.3, 0.4]])
    exclude = np.array([[0, 1, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(top_k_plain(scores, exclude, 2), [[3, 2], [0, 3]])


@pytest.mark.parametrize("bad", [dict(factors=0), dict(learning_rate=0), dict(momentum=1.0), dict(epochs=0)])
def test_invalid_settings_are_refused(bad):
    with pytest.raises(ValueError):
        TrainConfig(**bad)
