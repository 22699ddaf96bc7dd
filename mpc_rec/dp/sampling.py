"""Exact discrete Gaussian noise from a cryptographically secure source.

The sampler is the one of Canonne, Kamath and Steinke, "The Discrete Gaussian for
Differential Privacy" (NeurIPS 2020), Algorithms 1-3: Bernoulli(exp(-gamma)) from
Bernoulli(gamma / k) coins, a discrete Laplace proposal, and a rejection step. Every
coin is a comparison of a uniform integer with an integer, so the output distribution
is exactly N_Z(0, sigma^2); no floating point is involved.

Two implementations of the same algorithm:

- ``sample_discrete_gaussian_reference``: one sample at a time in Python integers and
  ``fractions.Fraction``, for any rational variance, with CKS's proposal scale
  t = floor(sigma) + 1. Slow (tens of microseconds a sample); the yardstick.
- ``sample_discrete_gaussian``: many samples at once in numpy int64 arithmetic. It needs
  a variance V = t * s with t = 2^(bitlen(V) // 2) (``representable_variance`` rounds a
  target up to one; relative change below 2 / sigma), because then the rejection
  exponent (|Y| - s)^2 / (2 t s) has an integer numerator and denominator that fit in
  64 bits. The proposal scale t is within a factor sqrt(2) of sigma, which keeps the
  acceptance rate above 0.65 (CKS's rejection step is exact for any t > 0). The rare
  element whose integers would not fit in int64 is finished in Python integers.

Randomness comes from a *source* with ``words(n)`` (n uniform uint64) and
``randbelow(m)``. The default, ``OsRandomSource``, reads the operating system's CSPRNG
(``os.urandom`` / ``secrets``) on every call: nothing is buffered, so a forked process
never replays its parent's randomness. Seeded sources are for tests only.
"""

from __future__ import annotations

import math
import os
import secrets
from fractions import Fraction
from typing import Protocol

import numpy as np

_INT64_SAFE = 1 << 62  # products are kept below this so int64 never overflows
_TWO63 = np.uint64(1 << 63)


class RandomSource(Protocol):
    def words(self, n: int) -> np.ndarray:
        """n independent uniform 64-bit words (numpy uint64)."""

    def randbelow(self, m: int) -> int:
        """One uniform integer in [0, m), for any positive Python int m."""


class OsRandomSource:
    """The operating system's cryptographically secure generator, unbuffered."""

    def words(self, n: int) -> np.ndarray:
        if n <= 0:
            return np.zeros(0, dtype=np.uint64)
        return np.frombuffer(os.urandom(8 * n), dtype=np.uint64).copy()

    def randbelow(self, m: int) -> int:
        return secrets.randbelow(m)


_OS_SOURCE = OsRandomSource()


# --- variance representation --------------------------------------------------------


def _scale_for(variance: int) -> int:
    """The proposal scale t = 2^(bitlen(V) // 2) used by the fast sampler."""
    return 1 << (variance.bit_length() // 2)


def representable_variance(target) -> int:
    """Smallest integer variance >= ``target`` that ``sample_discrete_gaussian`` accepts.

    ``target`` (int, Fraction or float, > 0) is in squared ring units. The result is a
    multiple of its own proposal scale t = 2^(bitlen // 2); it exceeds the target by
    less than t, i.e. sigma grows by a relative amount below 1 / sigma.
    """
    target = Fraction(target)
    if target <= 0:
        raise ValueError(f"variance must be positive, got {target}")
    ceiling = math.ceil(target)
    t = _scale_for(ceiling)
    variance = -(-ceiling // t) * t
    assert variance % _scale_for(variance) == 0  # rounding up to 2^m keeps it representable
    return variance


def is_representable(variance: int) -> bool:
    return isinstance(variance, int) and variance > 0 and variance % _scale_for(variance) == 0


# --- scalar exact sampler (CKS, verbatim structure) -----------------------------------


def _bernoulli_exp_scalar(gamma: Fraction, source: RandomSource) -> bool:
    """Bernoulli(exp(-gamma)) for rational gamma >= 0 (CKS Algorithm 1)."""
    whole = math.floor(gamma)
    for _ in range(whole):
        if not _bernoulli_exp_unit(1, 1, source):
            return False
    frac = gamma - whole
    return _bernoulli_exp_unit(frac.numerator, frac.denominator, source)


def _bernoulli_exp_unit(num: int, den: int, source: RandomSource) -> bool:
    """Bernoulli(exp(-num/den)) for 0 <= num/den <= 1: count Bernoulli(gamma/k) successes."""
    k = 1
    while source.randbelow(den * k) < num:  # Bernoulli(num / (den k))
        k += 1
    return k % 2 == 1


def _discrete_laplace_scalar(t: int, source: RandomSource) -> int:
    """P(Y = y) proportional to exp(-|y| / t), integer t >= 1 (CKS Algorithm 2)."""
    while True:
        u = source.randbelow(t)
        if not _bernoulli_exp_unit(u, t, source):
            continue
        v = 0
        while _bernoulli_exp_unit(1, 1, source):
            v += 1
        x = u + t * v
        negative = source.randbelow(2) == 1
        if negative and x == 0:
            continue
        return -x if negative else x


def _gaussian_accept_scalar(y: int, variance: Fraction, t: int, source: RandomSource) -> bool:
    gamma = (abs(y) - variance / t) ** 2 / (2 * variance)
    return _bernoulli_exp_scalar(gamma, source)


def sample_discrete_gaussian_reference(variance, *, source: RandomSource | None = None) -> int:
    """One exact sample of N_Z(0, variance) for any rational variance > 0 (CKS Algorithm 3)."""
    source = source or _OS_SOURCE
    variance = Fraction(variance)
    if variance <= 0:
        raise ValueError(f"variance must be positive, got {variance}")
    t = math.isqrt(math.floor(variance)) + 1  # floor(sigma) + 1
    while True:
        y = _discrete_laplace_scalar(t, source)
        if _gaussian_accept_scalar(y, variance, t, source):
            return y


# --- vectorised exact sampler -------------------------------------------------------


def _randbelow_vec(m: np.ndarray, source: RandomSource) -> np.ndarray:
    """Uniform integers in [0, m_i) for an int64 array 0 < m_i < 2^62, by rejection."""
    m_u = m.astype(np.uint64)
    limit = (_TWO63 // m_u) * m_u  # largest multiple of m below 2^63
    out = np.empty(m.shape, dtype=np.int64)
    todo = np.arange(m.size)
    while todo.size:
        r = source.words(todo.size) >> np.uint64(1)  # uniform in [0, 2^63)
        ok = r < limit[todo]
        out[todo[ok]] = (r[ok] % m_u[todo[ok]]).astype(np.int64)
        todo = todo[~ok]
    return out


def _bernoulli_exp_unit_vec(num: np.ndarray, den: np.ndarray, source: RandomSource) -> np.ndarray:
    """Vectorised Bernoulli(exp(-num/den)) for 0 <= num <= den < 2^62 (int64 arrays)."""
    result = np.zeros(num.shape, dtype=bool)
    active = np.arange(num.size)
    k = 1
    while active.size:
        dk = den[active]
        if int(dk.max()) >= _INT64_SAFE // k:  # finish the too-large ones in Python ints
            big = dk >= _INT64_SAFE // k
            for i in active[big]:
                kk = k
                while source.randbelow(int(den[i]) * kk) < int(num[i]):
                    kk += 1
                result[i] = kk % 2 == 1
            active = active[~big]
            if not active.size:
                break
            dk = den[active]
        success = _randbelow_vec(dk * k, source) < num[active]  # Bernoulli(gamma / k)
        stopped = active[~success]
        result[stopped] = k % 2 == 1
        active = active[success]
        k += 1
    return result


def _bernoulli_exp_vec(num: np.ndarray, den: np.ndarray, source: RandomSource) -> np.ndarray:
    """Vectorised Bernoulli(exp(-num/den)) for num >= 0, 0 < den < 2^62 (int64 arrays)."""
    whole = num // den
    alive = np.ones(num.shape, dtype=bool)
    j = 0
    while True:  # floor(gamma) independent Bernoulli(exp(-1)) coins, stopping at a failure
        idx = np.flatnonzero(alive & (whole > j))
        if not idx.size:
            break
        ones = np.ones(idx.size, dtype=np.int64)
        alive[idx] = _bernoulli_exp_unit_vec(ones, ones, source)
        j += 1
    idx = np.flatnonzero(alive)
    if idx.size:
        alive[idx] = _bernoulli_exp_unit_vec(num[idx] - whole[idx] * den[idx], den[idx], source)
    return alive


_MAX_ROUNDS = 200  # a correct sampler needs a handful; more means a broken source


def _check_rounds(rounds: int) -> None:
    if rounds > _MAX_ROUNDS:
        raise RuntimeError("discrete Gaussian sampler made no progress (broken random source?)")


def _discrete_laplace_vec(t: int, n: int, source: RandomSource) -> np.ndarray:
    """n exact samples with P(Y = y) proportional to exp(-|y| / t)."""
    chunks, have, rounds = [], 0, 0
    while have < n:
        rounds += 1
        _check_rounds(rounds)
        m = int((n - have) * 1.65) + 32
        u = _randbelow_vec(np.full(m, t, dtype=np.int64), source)
        u = u[_bernoulli_exp_unit_vec(u, np.full(m, t, dtype=np.int64), source)]
        v = np.zeros(u.size, dtype=np.int64)
        running = np.arange(u.size)
        while running.size:  # V = number of Bernoulli(exp(-1)) successes before a failure
            ones = np.ones(running.size, dtype=np.int64)
            success = _bernoulli_exp_unit_vec(ones, ones, source)
            v[running[success]] += 1
            running = running[success]
        x = u + t * v
        negative = (source.words(x.size) & np.uint64(1)).astype(bool)
        keep = ~(negative & (x == 0))
        y = np.where(negative, -x, x)[keep]
        chunks.append(y)
        have += y.size
    return np.concatenate(chunks)[:n]


def sample_discrete_gaussian(
    variance: int, size: int, *, source: RandomSource | None = None
) -> np.ndarray:
    """``size`` exact samples of N_Z(0, variance) as int64; variance from ``representable_variance``.

    ``source`` defaults to the OS CSPRNG; pass another only in tests.
    """
    if not is_representable(variance):
        raise ValueError(
            f"variance {variance!r} is not representable by the fast sampler; "
            "use representable_variance(target)"
        )
    if variance >= _INT64_SAFE // 2:
        raise ValueError(f"variance {variance} too large for int64 noise")
    source = source or _OS_SOURCE
    size = int(size)
    if size <= 0:
        return np.zeros(0, dtype=np.int64)
    t = _scale_for(variance)
    s = variance // t  # sigma^2 / t, an integer by construction
    den = 2 * variance
    chunks, have, rounds = [], 0, 0
    while have < size:
        rounds += 1
        _check_rounds(rounds)
        m = int((size - have) * 1.6) + 32
        y = _discrete_laplace_vec(t, m, source)
        w = np.abs(y) - s
        small = np.abs(w) < (1 << 31)  # then w^2 < 2^62
        accept = np.zeros(y.size, dtype=bool)
        idx = np.flatnonzero(small)
        accept[idx] = _bernoulli_exp_vec(w[idx] * w[idx], np.full(idx.size, den, dtype=np.int64), source)
        for i in np.flatnonzero(~small):  # astronomically rare: exact in Python ints
            accept[i] = _bernoulli_exp_scalar(Fraction(int(w[i]) ** 2, den), source)
        chunks.append(y[accept])
        have += int(accept.sum())
    return np.concatenate(chunks)[:size]


# --- distribution facts, for tests and documentation ---------------------------------


def discrete_gaussian_pmf(values, variance) -> np.ndarray:
    """P(X = x) for X ~ N_Z(0, variance), normalised over |y| <= 40 sigma + 40 (mass lost < 1e-300)."""
    variance = float(variance)
    bound = int(40 * math.sqrt(variance)) + 40
    support = np.arange(-bound, bound + 1, dtype=np.float64)
    norm = np.exp(-(support**2) / (2 * variance)).sum()
    x = np.asarray(values, dtype=np.float64)
    return np.exp(-(x**2) / (2 * variance)) / norm


def discrete_gaussian_variance(variance) -> float:
    """Var(N_Z(0, variance)); below ``variance`` by a relative amount < 1e-8 once sigma >= 1."""
    variance = float(variance)
    bound = int(40 * math.sqrt(variance)) + 40
    support = np.arange(-bound, bound + 1, dtype=np.float64)
    p = discrete_gaussian_pmf(support, variance)
    return float((p * support**2).sum())
