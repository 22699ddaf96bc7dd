"""Secure protocols in real party processes (loopback TCP, TTP dealer process)."""

import math

import numpy as np
import pytest
import torch

from mpc_harness import run_parties
from mpc_rec.errors import PeerError
from mpc_rec.model import (
    ModelState, TrainConfig, initial_parameters, plaintext_data, predictions, top_k_plain, train_epoch,
)
from mpc_rec.dp.reveal import RevealLog, UnnoisedRevealError, declare_public
from mpc_rec.mpc.reveal import open_rows_to_owners, open_to_all
from mpc_rec.mpc.scoring import secure_mse, secure_top_k
from mpc_rec.mpc.sharing import agree, share_rows
from mpc_rec.mpc.training import divide, shared_training_data, train_secure

ROWS = [4, 3, 5]


def small_problem(rows_total=12, items=9, seed=3):
    rng = np.random.default_rng(seed)
    mask = (rng.random((rows_total, items)) < 0.5).astype(float)
    mask[:, 0] = 1.0  # every user has a rating
    ratings = np.rint(rng.uniform(1, 5, (rows_total, items))) * mask
    return ratings, mask


def _blocks(rank, rows, matrix):
    start = sum(rows[:rank])
    return torch.as_tensor(matrix[start:start + rows[rank]], dtype=torch.float64)


def _train_and_score(session, rows, config, k):
    rank = session.endpoint.rank
    ratings, mask = small_problem(sum(rows))
    r = share_rows(_blocks(rank, rows, ratings), rows, rank)
    m = share_rows(_blocks(rank, rows, mask), rows, rank, precision=0)
    data = shared_training_data(r, m)
    state, _, _ = train_secure(data, config)
    log = RevealLog()
    top = declare_public(secure_top_k(state, data.mean, m, k), reason="test")
    mine = open_rows_to_owners(top, rows, rank, name="top-k", log=log)
    mse = float(open_to_all(declare_public(secure_mse(state, data.mean, r, m), reason="test"), name="mse", log=log))
    factors = state.item_factors.get_plain_text()  # revealed here only to compare with plaintext
    return {"top": mine.numpy(), "mse": mse, "mean": float(data.mean.get_plain_text()), "items": factors.numpy()}


@pytest.mark.parametrize("world_size", [2, 3])
def test_secure_training_matches_plaintext(world_size):
    rows = ROWS[:world_size]
    config = TrainConfig(factors=3, epochs=6, learning_rate=0.01, seed=1)
    results = run_parties(_train_and_score, world_size, rows, config, 3)

    ratings, mask = small_problem(sum(rows))
    data = plaintext_data(ratings, mask)
    state = ModelState(*initial_parameters(sum(rows), ratings.shape[1], config))
    for _ in range(config.epochs):
        state = train_epoch(state, data, config)
    plain_top = top_k_plain(predictions(state, data.mean).numpy(), mask, 3)
    plain_mse = float((((predictions(state, data.mean).numpy() - ratings) * mask) ** 2).sum() / mask.sum())

    for rank, result in enumerate(results):
        assert result["mean"] == pytest.approx(float(data.mean), abs=2e-3)
        assert result["mse"] == pytest.approx(plain_mse, abs=5e-3)
        np.testing.assert_allclose(result["items"], state.item_factors.numpy(), atol=2e-3)
        start = sum(rows[:rank])
        np.testing.assert_array_equal(np.rint(result["top"]), plain_top[start:start + rows[rank]])


def _reveal_check(session, rows):
    rank = session.endpoint.rank
    values = torch.arange(sum(rows) * 2, dtype=torch.float64).reshape(-1, 2)
    shared = share_rows(_blocks(rank, rows, values.numpy()), rows, rank)
    return open_rows_to_owners(declare_public(shared, reason="test"), rows, rank, name="rows", log=RevealLog())


def test_each_party_receives_only_its_own_rows():
    rows = ROWS
    results = run_parties(_reveal_check, 3, rows)
    values = np.arange(sum(rows) * 2).reshape(-1, 2)
    for rank, mine in enumerate(results):
        start = sum(rows[:rank])
        np.testing.assert_allclose(mine.numpy(), values[start:start + rows[rank]])


def _divide(session, numerator, count, count_max):
    import crypten

    n = crypten.cryptensor(torch.tensor(numerator, dtype=torch.float64), src=0)
    c = crypten.cryptensor(torch.tensor(float(count)), src=1, precision=0)
    return float(divide(n, c, count_max=count_max).get_plain_text())


@pytest.mark.parametrize("numerator,count,count_max", [(350.0, 100, 10_000), (3.5, 1, 60), (70_000.0, 20_000, 1_600_000)])
def test_divide_within_stated_precision(numerator, count, count_max):
    result = run_parties(_divide, 2, numerator, count, count_max)[0]
    expected = numerator / count
    bound = 4 * 2**-16 * count_max / count * abs(expected) + 2**-14
    assert abs(result - expected) <= bound, (result, expected, bound)


def _agree(session, catalogues):
    rank = session.endpoint.rank
    try:
        return agree(session.comm, 5, {"catalogue": catalogues[rank], "training_settings": {"k": 2}})
    except PeerError as exc:
        return f"refused: {exc}"


def test_agreement_names_the_mismatch():
    ok = run_parties(_agree, 2, [["a", "b"], ["a", "b"]])
    assert ok == [[5, 5], [5, 5]]
    refused = run_parties(_agree, 2, [["a", "b"], ["a", "c"]])
    assert all(r.startswith("refused") and "'catalogue'" in r for r in refused)


def _untagged_reveal(session):
    import crypten

    shared = crypten.cryptensor(torch.ones(3), src=0)
    refused = []
    for attempt in (lambda: open_to_all(shared, name="raw aggregate", log=RevealLog()),
                    lambda: open_rows_to_owners(shared, [2, 1], session.endpoint.rank, name="raw rows", log=RevealLog())):
        try:
            attempt()
        except UnnoisedRevealError as exc:
            refused.append(str(exc))
    return refused


def test_reveal_choke_point_refuses_untagged_values():
    for refused in run_parties(_untagged_reveal, 2):
        assert len(refused) == 2 and all("not noised and not declared public" in r for r in refused)
