"""The fused training step's building blocks, in real party processes with the dealer."""

from __future__ import annotations

import pytest
import torch
from mpc_harness import run_parties

from mpc_rec.mpc.dealer import truncation_correlation


def _split(value: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """A fixed additive sharing of a public test value (shares from a seeded generator)."""
    generator = torch.Generator().manual_seed(1234)
    shares = [torch.randint(-2**63, 2**63 - 1, value.shape, generator=generator) for _ in range(world_size - 1)]
    last = value - sum(shares, torch.zeros_like(value))
    return (shares + [last])[rank]


def _reconstruct(shares: list) -> torch.Tensor:
    tensors = [torch.as_tensor(s) for s in shares]
    return sum(tensors[1:], tensors[0].clone())


def _boundary_values() -> torch.Tensor:
    edge = 2**62 - 1
    ordinary = torch.randint(-2**50, 2**50, (2000,), generator=torch.Generator().manual_seed(7))
    return torch.cat([torch.tensor([0, 1, -1, 2**16, -2**16, edge, -edge, 2**61, -2**61, 12345678901234]), ordinary])


def _truncate_in_party(session, values, bits):
    from mpc_rec.mpc.fused import truncate

    rank, world = session.endpoint.rank, session.endpoint.world_size
    halves = [values[: len(values) // 2], values[len(values) // 2:]]
    # numpy, not torch: torch shares tensor storage with the test process by file
    # descriptor, which is gone once the party process has exited.
    return [t.numpy() for t in truncate([_split(h, rank, world) for h in halves], bits)]


@pytest.mark.parametrize("world_size, bits", [(2, [16, 28]), (3, [16, 28]), (3, [1, 1])])
def test_truncation_is_floor_or_one_more_at_the_range_edges(world_size, bits):
    # Mixed shifts take per-element shift tensors; one shift for all takes the scalar
    # path, and 1 bit its extreme carry (2^63).
    values = _boundary_values()
    results = run_parties(_truncate_in_party, world_size, values, bits)
    halves = [values[: len(values) // 2], values[len(values) // 2:]]
    for index, (half, b) in enumerate(zip(halves, bits)):
        got = _reconstruct([r[index] for r in results])
        expected = torch.div(half, 2**b, rounding_mode="floor")
        difference = got - expected
        assert difference.min() >= 0 and difference.max() <= 1, (b, difference.unique())


def test_truncation_correlation_is_logical_shift_and_sign_bit():
    r = torch.tensor([-1, 0, 2**63 - 1, -2**63, 5 << 20])
    high, msb = truncation_correlation(r, torch.full((5,), 20))
    assert high.tolist() == [2**44 - 1, 0, 2**43 - 1, 2**43, 5]
    assert msb.tolist() == [1, 0, 0, 1, 0]


def _products_in_party(session, mask, x_values, e_values, right, left):
    from mpc_rec.mpc import ring
    from mpc_rec.mpc.deals import ErrorTripleDeal, MaskProductDeal, fetch
    from mpc_rec.mpc.fused import MaskedProduct, open_all

    rank, world = session.endpoint.rank, session.endpoint.world_size
    masked = MaskedProduct(_split(mask, rank, world))
    products, sums = [], []
    for x in x_values:  # the kept mask, reused
        deal = fetch(MaskProductDeal(masked.shape))
        b, c = deal.b, deal.c
        (opened,) = open_all([_split(x, rank, world) - b])
        zeros = torch.zeros_like(c)
        _, row_sums, column_sums = ring.masked_error(c.numpy(), masked.opened_mask.numpy(), b.numpy(), opened.numpy(),
                                                     masked.a.numpy(), zeros.numpy(), zeros.numpy(), rank == 0)
        products.append(c.numpy())
        sums.append((row_sums, column_sums))
    n, i = e_values.shape
    triple = fetch(ErrorTripleDeal(n, i, [[0, right.shape[1]], [1, left.shape[1]]]))
    e, r, l = (_split(t, rank, world) for t in (e_values, right, left))
    d_e, d_r, d_l = open_all([e - triple.a, r - triple.bs[0], l - triple.bs[1]])
    lefts = [(b + d if rank == 0 else b).numpy() for b, d in zip(triple.bs, (d_r, d_l))]
    ring.error_products(d_e.numpy(), triple.a.numpy(), lefts[0], d_r.numpy(), triple.cs[0].numpy(),
                        lefts[1], d_l.numpy(), triple.cs[1].numpy())
    return products, sums, triple.cs[0].numpy(), triple.cs[1].numpy()


@pytest.mark.parametrize("world_size", [2, 3])
def test_kept_mask_products_and_the_shared_error_triple(world_size):
    generator = torch.Generator().manual_seed(3)
    mask = torch.randint(0, 2, (5, 7), generator=generator)
    xs = [torch.randint(-2**40, 2**40, (5, 7), generator=generator) for _ in range(3)]
    e = torch.randint(-2**30, 2**30, (5, 7), generator=generator)
    right = torch.randint(-2**16, 2**16, (7, 3), generator=generator)
    left = torch.randint(-2**16, 2**16, (5, 2), generator=generator)
    results = run_parties(_products_in_party, world_size, mask, xs, e, right, left)
    for index, x in enumerate(xs):
        assert torch.equal(_reconstruct([r[0][index] for r in results]), mask * x)
        assert torch.equal(_reconstruct([r[1][index][0] for r in results]), (mask * x).sum(1))
        assert torch.equal(_reconstruct([r[1][index][1] for r in results]), (mask * x).sum(0))
    assert torch.equal(_reconstruct([r[2] for r in results]), e.matmul(right))
    assert torch.equal(_reconstruct([r[3] for r in results]), e.t().matmul(left))


def _private_step_in_party(session, rows, config):
    from test_secure import _blocks, small_problem

    from mpc_rec.model import exact_item_aggregates
    from mpc_rec.mpc.privacy import private_training_data
    from mpc_rec.mpc.sharing import share_rows
    from mpc_rec.mpc.training import train_secure

    rank = session.endpoint.rank
    ratings, mask = small_problem(sum(rows))
    r = share_rows(_blocks(rank, rows, ratings), rows, rank)
    m = share_rows(_blocks(rank, rows, mask), rows, rank, precision=0)
    data = private_training_data(r, m, midpoint=3.0, item_weight=2.0, item_step=1.5)
    # The exact aggregates in place of the noised ones: the DP branch of the fused step
    # (E truncated to 2^16 for the hook, public item weights, public mean) made checkable.
    state, _, _ = train_secure(data, config, item_aggregates=exact_item_aggregates)
    return state.item_factors.get_plain_text().numpy(), state.item_bias.get_plain_text().numpy()


@pytest.mark.parametrize("world_size", [2, 3])
def test_private_branch_of_the_fused_step_matches_plaintext(world_size):
    import numpy as np
    from test_secure import ROWS, small_problem

    from mpc_rec.model import ModelState, TrainConfig, TrainingData, initial_parameters, train_epoch

    rows = ROWS[:world_size]
    config = TrainConfig(factors=3, epochs=6, learning_rate=0.01, seed=1)
    results = run_parties(_private_step_in_party, world_size, rows, config)
    ratings, mask = small_problem(sum(rows))
    r, m = torch.as_tensor(ratings), torch.as_tensor(mask)
    weights = torch.full((ratings.shape[1],), 2.0 * 1.5, dtype=torch.float64)
    data = TrainingData(r, m, m.sum(1), weights, torch.tensor(3.0, dtype=torch.float64))
    state = ModelState(*initial_parameters(sum(rows), ratings.shape[1], config))
    for _ in range(config.epochs):
        state = train_epoch(state, data, config)
    for factors, bias in results:
        np.testing.assert_allclose(factors, state.item_factors.numpy(), atol=2e-3)
        np.testing.assert_allclose(bias, state.item_bias.numpy(), atol=2e-3)


@pytest.mark.parametrize("op, size0, size1", [
    ("matmul", [3], [3]), ("matmul", [3], [3, 4]), ("matmul", [2, 3], [3]), ("matmul", [2, 3], [3, 4]),
    ("matmul", [5, 2, 3], [3, 4]), ("matmul", [5, 1, 2, 3], [7, 3, 4]), ("matmul", [4], [2, 4, 6]),
    ("mul", [3, 1], [1, 4]), ("mul", [5], [5]), ("mul", [2, 3], [3]), ("mul", [1, 3], [4, 1, 1]), ("mul", [], [2]),
])
def test_product_shape_follows_torch(op, size0, size1):
    from mpc_rec.mpc.deals import product_shape

    assert product_shape(size0, size1, op) == getattr(torch, op)(torch.zeros(size0), torch.zeros(size1)).shape


def test_product_shape_refuses_mismatched_inner_sizes():
    from mpc_rec.mpc.deals import product_shape

    with pytest.raises(ValueError, match="inner sizes"):
        product_shape([2, 3], [4, 5], "matmul")
    with pytest.raises(ValueError, match="do not broadcast"):
        product_shape([2, 3], [4], "mul")
