"""The fused training step's users x items arithmetic in Z_2^64, as single-pass kernels.

torch has no fast int64 matrix product (no BLAS for integers: E Q, 25 M multiply-adds,
took ~40 ms on one core), and each element-wise torch operation is one more pass over a
13 MB matrix. These kernels, compiled by numba for the host CPU (vectorised 64-bit
multiplies), do each phase of the step in one pass over the users x items data, with
wrapping 64-bit integer arithmetic (LLVM's add and mul wrap; ``tests/test_ring.py``
checks every kernel against torch's int64 results on full-range random inputs).

Arguments are int64 numpy views of torch tensors (``tensor.numpy()``, shared memory).
The compiled loops do not check bounds, so the wrappers check every shape first.
"""

from __future__ import annotations

import numpy as np
from numba import njit


def _require(condition: bool, what: str) -> None:
    if not condition:
        raise ValueError(f"ring kernel: {what}")


def _int64(*arrays: np.ndarray) -> None:
    _require(all(a.dtype == np.int64 for a in arrays), "every argument must be int64")


TERMS = 8  # products added per pass over a row: fewer loads and stores of the row


@njit(cache=True, boundscheck=False, nogil=True)
def _add_row_product(row, x, right):
    """row += x @ right for x of length w, a multiple of TERMS (the 64-bit multiplies dominate)."""
    width, items = right.shape
    for k in range(0, width, TERMS):
        x0, x1, x2, x3, x4, x5, x6, x7 = x[k], x[k + 1], x[k + 2], x[k + 3], x[k + 4], x[k + 5], x[k + 6], x[k + 7]
        r0, r1, r2, r3, r4, r5, r6, r7 = (right[k], right[k + 1], right[k + 2], right[k + 3], right[k + 4],
                                          right[k + 5], right[k + 6], right[k + 7])
        for l in range(items):
            row[l] += (x0 * r0[l] + x1 * r1[l] + x2 * r2[l] + x3 * r3[l]
                       + x4 * r4[l] + x5 * r5[l] + x6 * r6[l] + x7 * r7[l])


def _padded_width(left: np.ndarray, right: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """left (n x w) and right (w x I) with zero columns / rows up to a multiple of TERMS."""
    extra = -left.shape[1] % TERMS
    if extra == 0:
        return left, right
    return (np.concatenate([left, np.zeros((left.shape[0], extra), np.int64)], 1),
            np.concatenate([right, np.zeros((extra, right.shape[1]), np.int64)], 0))


@njit(cache=True, boundscheck=False, nogil=True)
def _masked_scores(c, left, right, user_offset, item_offset, mask_b):
    n, items = c.shape
    for i in range(n):
        row = c[i]
        for l in range(items):
            row[l] += user_offset[i] + item_offset[l] - mask_b[i, l]
        _add_row_product(row, left[i], right)


def masked_scores(c: np.ndarray, left: np.ndarray, right: np.ndarray, user_offset: np.ndarray,
                  item_offset: np.ndarray, mask_b: np.ndarray) -> None:
    """c += left @ right + user_offset[:, None] + item_offset[None, :] - mask_b, in place.

    left: n x w, right: w x I (w small: both halves of a Beaver matmul side by side).
    """
    _int64(c, left, right, user_offset, item_offset, mask_b)
    n, items = c.shape
    _require(left.shape == (n, right.shape[0]) and right.shape[1] == items, "score shapes differ")
    _require(user_offset.shape == (n,) and item_offset.shape == (items,) and mask_b.shape == c.shape,
             "offset or mask shapes differ")
    _masked_scores(c, *_padded_width(left, right), user_offset, item_offset, mask_b)


@njit(cache=True, boundscheck=False, nogil=True)
def _masked_error(c, opened_mask, b, opened_x, a, ratings, error_a, add_public, masked, row_sums, column_sums):
    n, items = c.shape
    for i in range(n):
        total = np.int64(0)
        for l in range(items):
            d = opened_x[i, l]
            factor = b[i, l] + d if add_public else b[i, l]
            e = c[i, l] + opened_mask[i, l] * factor + a[i, l] * d - ratings[i, l]
            c[i, l] = e
            masked[i, l] = e - error_a[i, l]
            total += e
            column_sums[l] += e
        row_sums[i] = total


def masked_error(c: np.ndarray, opened_mask: np.ndarray, b: np.ndarray, opened_x: np.ndarray, a: np.ndarray,
                 ratings: np.ndarray, error_a: np.ndarray, add_public: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """E = c + D_M (b + D_X) + A D_X - R (D_M D_X only where ``add_public``), in place in c.

    Beaver's recombination of M * X for the kept mask (D_M = M - A, D_X = X - b opened),
    less the ratings. Returns E - error_a (for the next opening) and E's row and column sums.
    """
    arrays = (c, opened_mask, b, opened_x, a, ratings, error_a)
    _int64(*arrays)
    _require(all(x.shape == c.shape for x in arrays), "users x items shapes differ")
    n, items = c.shape
    masked, row_sums, column_sums = np.empty_like(c), np.zeros(n, np.int64), np.zeros(items, np.int64)
    _masked_error(c, opened_mask, b, opened_x, a, ratings, error_a, add_public, masked, row_sums, column_sums)
    return masked, row_sums, column_sums


ROWS = 4  # users per pass over the items: each row of out_p is loaded and stored once for four


@njit(cache=True, boundscheck=False, nogil=True)
def _row_block_products(opened, a, left_q, right_q, left_p, right_p, with_opened, with_p, out_q, out_p):
    """out_q += D @ left_q + A @ right_q, out_p += D^T @ left_p + A^T @ right_p (D terms only
    ``with_opened``, out_p only ``with_p``), four rows at a time: the row count is a multiple of ROWS."""
    n, items = a.shape
    width, width_p = out_q.shape[1], out_p.shape[1]
    for i in range(0, n, ROWS):
        acc0, acc1, acc2, acc3 = np.zeros(width, np.int64), np.zeros(width, np.int64), np.zeros(width, np.int64), \
            np.zeros(width, np.int64)
        for l in range(items):
            y0, y1, y2, y3 = a[i, l], a[i + 1, l], a[i + 2, l], a[i + 3, l]
            if with_opened:
                x0, x1, x2, x3 = opened[i, l], opened[i + 1, l], opened[i + 2, l], opened[i + 3, l]
            else:
                x0 = x1 = x2 = x3 = np.int64(0)
            for k in range(width):
                lk, rk = left_q[l, k], right_q[l, k]
                acc0[k] += x0 * lk + y0 * rk
                acc1[k] += x1 * lk + y1 * rk
                acc2[k] += x2 * lk + y2 * rk
                acc3[k] += x3 * lk + y3 * rk
            if with_p:
                for k in range(width_p):
                    out_p[l, k] += (x0 * left_p[i, k] + y0 * right_p[i, k] + x1 * left_p[i + 1, k] + y1 * right_p[i + 1, k]
                                    + x2 * left_p[i + 2, k] + y2 * right_p[i + 2, k]
                                    + x3 * left_p[i + 3, k] + y3 * right_p[i + 3, k])
        out_q[i] += acc0
        out_q[i + 1] += acc1
        out_q[i + 2] += acc2
        out_q[i + 3] += acc3


def _block_products(opened: np.ndarray | None, a: np.ndarray, left_q: np.ndarray, right_q: np.ndarray,
                    left_p: np.ndarray | None, right_p: np.ndarray | None, out_q: np.ndarray,
                    out_p: np.ndarray | None) -> None:
    """``_row_block_products`` on whole blocks of rows, then on the last rows padded with zeros.

    ``opened`` None: no D terms (``left_q`` and ``left_p`` then only meet zeros); ``out_p``
    None: no E^T P.
    """
    n = a.shape[0]
    with_opened, with_p = opened is not None, out_p is not None
    opened = a if opened is None else opened
    if out_p is None:
        left_p = right_p = np.zeros((n, 1), np.int64)
        out_p = np.zeros((1, 1), np.int64)
    elif left_p is None:
        left_p = right_p
    full = n - n % ROWS
    _row_block_products(opened[:full], a[:full], left_q, right_q, left_p[:full], right_p[:full], with_opened, with_p,
                        out_q[:full], out_p)
    if full < n:
        pad = lambda x: np.concatenate([x[full:], np.zeros((ROWS - (n - full), x.shape[1]), np.int64)])  # noqa: E731
        last_q = pad(out_q)
        _row_block_products(pad(opened), pad(a), left_q, right_q, pad(left_p), pad(right_p), with_opened, with_p,
                            last_q, out_p)
        out_q[full:] = last_q[: n - full]


def error_products(opened: np.ndarray, a: np.ndarray, left_q: np.ndarray, right_q: np.ndarray, out_q: np.ndarray,
                   left_p: np.ndarray | None = None, right_p: np.ndarray | None = None,
                   out_p: np.ndarray | None = None) -> None:
    """out_q += D @ left_q + A @ right_q and (if given) out_p += D^T @ left_p + A^T @ right_p.

    One pass over the two n x I matrices D (opened) and A (this party's mask share) serves
    both products of the error triple.
    """
    n, items = opened.shape
    _int64(opened, a, left_q, right_q, out_q)
    _require(a.shape == opened.shape, "mask and opened shapes differ")
    width = out_q.shape[1]
    _require(out_q.shape == (n, width) and left_q.shape == right_q.shape == (items, width), "E Q shapes differ")
    with_p = out_p is not None
    if with_p:
        _int64(left_p, right_p, out_p)
        width_p = out_p.shape[1]
        _require(out_p.shape == (items, width_p) and left_p.shape == right_p.shape == (n, width_p),
                 "E^T P shapes differ")
    _block_products(opened, a, left_q, right_q, left_p, right_p, out_q, out_p)


# --- the dealer's side: the same products on its plaintext randomness ---------------------


@njit(cache=True, boundscheck=False, nogil=True)
def _wide_product(left, right, out):
    for i in range(left.shape[0]):
        _add_row_product(out[i], left[i], right)


def wide_product(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """left @ right for left n x w, right w x I with w small (P Q^T's triple)."""
    _int64(left, right)
    _require(left.shape[1] == right.shape[0], "product shapes differ")
    out = np.zeros((left.shape[0], right.shape[1]), np.int64)
    _wide_product(*_padded_width(left, right), out)
    return out


def mask_products(a: np.ndarray, right_q: np.ndarray, right_p: np.ndarray | None = None) -> list[np.ndarray]:
    """[a @ right_q] or [a @ right_q, a^T @ right_p], in one pass over the n x I matrix a."""
    n, items = a.shape
    _int64(a, right_q)
    _require(right_q.shape[0] == items, "A B shapes differ")
    out_q = np.zeros((n, right_q.shape[1]), np.int64)
    if right_p is None:
        _block_products(None, a, right_q, right_q, None, None, out_q, None)
        return [out_q]
    _int64(right_p)
    _require(right_p.shape[0] == n, "A^T B shapes differ")
    out_p = np.zeros((items, right_p.shape[1]), np.int64)
    _block_products(None, a, right_q, right_q, None, right_p, out_q, out_p)
    return [out_q, out_p]


def warm_up() -> None:
    """Load (or compile, on a first run) every kernel now, during set-up.

    The first call of a numba kernel in a process costs about half a second; without
    this it would land in the first training epoch.
    """
    small = lambda *shape: np.zeros(shape, np.int64)  # noqa: E731
    masked_scores(small(2, 3), small(2, 2), small(2, 3), small(2), small(3), small(2, 3))
    masked_error(*(small(2, 3) for _ in range(7)), True)
    error_products(small(2, 3), small(2, 3), small(3, 2), small(3, 2), small(2, 2), small(2, 2), small(2, 2), small(3, 2))
    error_products(small(2, 3), small(2, 3), small(3, 2), small(3, 2), small(2, 2))
    wide_product(small(2, 2), small(2, 3))
    mask_products(small(2, 3), small(3, 2))
    mask_products(small(2, 3), small(3, 2), small(2, 2))
