"""The users x items kernels agree exactly with torch's wrapping int64 arithmetic."""

import numpy as np
import pytest
import torch

from mpc_rec.mpc import ring


def _ring(generator, *shape):
    return torch.randint(-2**63, 2**63 - 1, shape, generator=generator)


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(11)


@pytest.mark.parametrize("width", [6, 16, 19])  # below, at and past whole passes of ring.TERMS products
def test_masked_scores_wraps_like_torch(generator, width):
    c, mask_b = _ring(generator, 9, 13), _ring(generator, 9, 13)
    left, right = _ring(generator, 9, width), _ring(generator, width, 13)
    user_offset, item_offset = _ring(generator, 9), _ring(generator, 13)
    expected = c + left.matmul(right) + user_offset.unsqueeze(1) + item_offset.unsqueeze(0) - mask_b
    ring.masked_scores(c.numpy(), left.numpy(), right.numpy(), user_offset.numpy(), item_offset.numpy(), mask_b.numpy())
    assert torch.equal(c, expected)


@pytest.mark.parametrize("rank0", [True, False])
def test_masked_error_wraps_like_torch(generator, rank0):
    c, opened_mask, b, opened_x, a, ratings, error_a = (_ring(generator, 7, 11) for _ in range(7))
    expected = c + opened_mask * (b + opened_x if rank0 else b) + a * opened_x - ratings
    masked, row_sums, column_sums = ring.masked_error(c.numpy(), opened_mask.numpy(), b.numpy(), opened_x.numpy(),
                                                      a.numpy(), ratings.numpy(), error_a.numpy(), rank0)
    assert torch.equal(c, expected)
    assert torch.equal(torch.from_numpy(masked), expected - error_a)
    assert torch.equal(torch.from_numpy(row_sums), expected.sum(1))
    assert torch.equal(torch.from_numpy(column_sums), expected.sum(0))


@pytest.mark.parametrize("users", [3, 8, 11])  # fewer than, a multiple of, and past blocks of ring.ROWS rows
@pytest.mark.parametrize("with_p", [True, False])
def test_error_products_wrap_like_torch(generator, with_p, users):
    opened, a = _ring(generator, users, 12), _ring(generator, users, 12)
    left_q, right_q, out_q = _ring(generator, 12, 5), _ring(generator, 12, 5), _ring(generator, users, 5)
    left_p, right_p, out_p = _ring(generator, users, 3), _ring(generator, users, 3), _ring(generator, 12, 3)
    expected_q = out_q + opened.matmul(left_q) + a.matmul(right_q)
    expected_p = out_p + opened.t().matmul(left_p) + a.t().matmul(right_p)
    if with_p:
        ring.error_products(opened.numpy(), a.numpy(), left_q.numpy(), right_q.numpy(), out_q.numpy(),
                            left_p.numpy(), right_p.numpy(), out_p.numpy())
        assert torch.equal(out_p, expected_p)
    else:
        ring.error_products(opened.numpy(), a.numpy(), left_q.numpy(), right_q.numpy(), out_q.numpy())
    assert torch.equal(out_q, expected_q)


def test_the_kernels_read_strided_views(generator):
    # torch hands over transposed or sliced views as strided numpy arrays
    c = _ring(generator, 5, 4)
    left, right = _ring(generator, 3, 5).t(), _ring(generator, 4, 3).t()
    zeros5, zeros4 = torch.zeros(5, dtype=torch.int64), torch.zeros(4, dtype=torch.int64)
    expected = c + left.matmul(right)
    ring.masked_scores(c.numpy(), left.numpy(), right.numpy(), zeros5.numpy(), zeros4.numpy(), np.zeros((5, 4), np.int64))
    assert torch.equal(c, expected)


def test_mismatched_shapes_are_refused_before_the_compiled_loop(generator):
    opened, a = _ring(generator, 8, 12), _ring(generator, 8, 12)
    with pytest.raises(ValueError, match="E Q shapes differ"):
        ring.error_products(opened.numpy(), a.numpy(), np.zeros((12, 5), np.int64), np.zeros((12, 5), np.int64),
                            np.zeros((8, 4), np.int64))
    with pytest.raises(ValueError, match="users x items shapes differ"):
        ring.masked_error(*(np.zeros((3, 4), np.int64) for _ in range(6)), np.zeros((4, 3), np.int64), True)


@pytest.mark.parametrize("users, width", [(6, 4), (9, 17)])
def test_the_dealers_products_wrap_like_torch(generator, users, width):
    left, right = _ring(generator, users, width), _ring(generator, width, 9)
    assert torch.equal(torch.from_numpy(ring.wide_product(left.numpy(), right.numpy())), left.matmul(right))
    a, right_q, right_p = _ring(generator, users, 9), _ring(generator, 9, 3), _ring(generator, users, 2)
    q_only = ring.mask_products(a.numpy(), right_q.numpy())
    both = ring.mask_products(a.numpy(), right_q.numpy(), right_p.numpy())
    assert len(q_only) == 1 and torch.equal(torch.from_numpy(q_only[0]), a.matmul(right_q))
    assert torch.equal(torch.from_numpy(both[0]), a.matmul(right_q))
    assert torch.equal(torch.from_numpy(both[1]), a.t().matmul(right_p))
