"""Raw Paillier arithmetic on integers (g = n + 1), gmpy2 when present, plus a process pool.

Everything here works on plain Python ints at the interface. ``phe`` supplies key generation
and CRT decryption; encryption is written out here because the packed path needs raw
ciphertexts without ``phe``'s per-number exponent bookkeeping (the homomorphic sum is a
product mod n^2, done where it is used).
"""

from __future__ import annotations

import multiprocessing
import os
import secrets
from concurrent.futures import Executor, ProcessPoolExecutor
from typing import Any, Sequence

try:  # the one place acceleration is chosen; invisible above this module
    import gmpy2

    HAVE_GMPY2 = True

    def _powmod(base: int, exponent: int, modulus: int) -> int:
        return int(gmpy2.powmod(base, exponent, modulus))

    def _gcd(a: int, b: int) -> int:
        return int(gmpy2.gcd(a, b))

    def big(value: int) -> Any:
        """A number for long chains of products (gmpy2.mpz: about 7x faster at 4096 bits)."""
        return gmpy2.mpz(value)

except ImportError:  # pragma: no cover - gmpy2 is a declared dependency
    import math

    HAVE_GMPY2 = False

    def _powmod(base: int, exponent: int, modulus: int) -> int:
        return pow(base, exponent, modulus)

    def _gcd(a: int, b: int) -> int:
        return math.gcd(a, b)

    def big(value: int) -> Any:
        return value


# A vector stays in-process unless encrypting it would take about this long: starting
# spawned workers costs a few tenths of a second. One 2048-bit encryption with gmpy2 takes
# about 10 ms on the reference machine and the cost grows with the cube of the key size.
PARALLEL_MIN_SECONDS = 1.0
_SECONDS_PER_2048_BIT_ENCRYPTION = 0.010


def estimated_seconds(n: int, count: int) -> float:
    """Rough single-core time to encrypt ``count`` plaintexts under modulus ``n``."""
    return count * _SECONDS_PER_2048_BIT_ENCRYPTION * (n.bit_length() / 2048) ** 3


def random_unit(n: int) -> int:
    """A uniformly random r in Z_n*: drawn from [1, n) by the OS generator until gcd(r, n) = 1."""
    while True:
        r = secrets.randbelow(n - 1) + 1
        if _gcd(r, n) == 1:
            return r


def encrypt_raw(n: int, plaintext: int) -> int:
    """Enc(m) = (1 + n m) r^n mod n^2 for 0 <= m < n, with fresh randomness r."""
    if not 0 <= plaintext < n:
        raise ValueError("a Paillier plaintext must lie in [0, n)")
    nsquare = n * n
    return (1 + n * plaintext) * _powmod(random_unit(n), n, nsquare) % nsquare


def is_valid_ciphertext(n: int, c: int) -> bool:
    """0 < c < n^2 and gcd(c, n) == 1, the conditions for c to be a Paillier ciphertext."""
    return 0 < c < n * n and _gcd(c, n) == 1


def _encrypt_batch(n: int, plaintexts: list[int]) -> list[int]:
    return [encrypt_raw(n, m) for m in plaintexts]


def available_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def make_pool(workers: int | None = None) -> ProcessPoolExecutor:
    """A pool of encryption workers (spawned: safe beside threads from torch or gloo).

    The default leaves one core to the calling process, which works alongside the pool.
    """
    return ProcessPoolExecutor(
        max_workers=workers or max(1, available_cores() - 1), mp_context=multiprocessing.get_context("spawn")
    )


def encrypt_many(
    n: int, plaintexts: Sequence[int], *, executor: Executor | None = None, workers: int | None = None
) -> list[int]:
    """Encrypt each plaintext; spread over worker processes when the vector is large.

    ``executor`` reuses a caller's pool; otherwise, for a large vector, a pool of
    ``workers - 1`` processes (default: the cores this process may use) is started and this
    process works too: it takes batches from the back of the queue, cancelling them in the
    pool, until it meets one a worker has already started. ``workers=1`` forces in-process.
    Only the public modulus and the plaintexts go to workers; they draw their own randomness.
    """
    items = [int(m) for m in plaintexts]
    cores = workers or available_cores()
    if executor is None and (cores < 2 or estimated_seconds(n, len(items)) < PARALLEL_MIN_SECONDS):
        return _encrypt_batch(n, items)
    size = max(1, -(-len(items) // (8 * cores)))
    batches = [items[i:i + size] for i in range(0, len(items), size)]
    if executor is not None:
        return _share_work(executor, n, batches)
    with make_pool(cores - 1) as pool:
        return _share_work(pool, n, batches)


def _share_work(executor: Executor, n: int, batches: list[list[int]]) -> list[int]:
    futures = [executor.submit(_encrypt_batch, n, batch) for batch in batches]
    local: dict[int, list[int]] = {}
    for index in reversed(range(len(batches))):
        if not futures[index].cancel():
            break  # a worker has it (or has finished it); the rest are theirs too
        local[index] = _encrypt_batch(n, batches[index])
    return [c for i in range(len(batches)) for c in (local[i] if i in local else futures[i].result())]
