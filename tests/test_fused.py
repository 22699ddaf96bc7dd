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


@pytest.mark.parametrize("world_size", [2, 3])
def test_truncation_is_floor_or_one_more_at_the_range_edges(world_size):
    values = _boundary_values()
    bits = [16, 28]
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
    from mpc_rec.mpc.fused import MaskedProduct, error_triple, open_all

    rank, world = session.endpoint.rank, session.endpoint.world_size
    masked = MaskedProduct(_split(mask, rank, world))
    products = [masked.times(_split(x, rank, world)) for x in x_values]  # the kept mask, reused
    n, i = e_values.shape
    triple = error_triple(n, i, [[0, right.shape[1]], [1, left.shape[1]]])
    e, r, l = (_split(t, rank, world) for t in (e_values, right, left))
    d_e, d_r, d_l = open_all([e - triple.a, r - triple.bs[0], l - triple.bs[1]])
    e_right = triple.cs[0] + d_e.matmul(triple.bs[0]) + triple.a.matmul(d_r) + (d_e.matmul(d_r) if rank == 0 else 0)
    e_left = triple.cs[1] + d_e.t().matmul(triple.bs[1]) + triple.a.t().matmul(d_l) + (d_e.t().matmul(d_l) if rank == 0 else 0)
    return [p.numpy() for p in products], e_right.numpy(), e_left.numpy()


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
    assert torch.equal(_reconstruct([r[1] for r in results]), e.matmul(right))
    assert torch.equal(_reconstruct([r[2] for r in results]), e.t().matmul(left))
