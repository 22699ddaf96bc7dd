"""Rating rows as narrow integer codes: one Paillier slot per cell, decoded inside MPC.

A cell of a user's row is coded v = 0 (not rated), v = 2r - 1 (a training rating r) or
v = -(2r - 1) (a held-out rating r), for whole-number ratings r >= 1. Every rating code
is odd, so inside MPC, with exact integer arithmetic in Z_2^64 (precision-0 shares,
Beaver products, no truncation):

    Q(v) = prod_{k in K} (v^2 - k^2)     K = codes 2r - 1 of the allowed ratings
    Q(0) = D = prod_{k in K} (-k^2)      odd, hence invertible mod 2^64
    Q(+-k) = 0 for k in K
    rated = 1 - Q(v) * D^-1   (mod 2^64, exact: Q(v) is D or 0)
    train = [v > 0]  (one CrypTen comparison),  test = rated - train
    train rating * train * 2^16 = (v*train + train) * 2^15       (v = 2r - 1)
    test rating * test * 2^16   = (test - v + v*train) * 2^15    (v*test = v - v*train)

the last two being public multiplies into fixed point. Codes need value_bits b = bit
length of max |v| plus a sign bit (5 bits for ratings 1..5, |v| <= 9), against b = 20
for 16-bit fixed-point ratings, with separate slots for the mask and the held-out set:
see protocols/paillier-aggregation.md, "Row ingest", for the slot widths.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from mpc_rec.errors import ConfigError, DataError
from mpc_rec.paillier.packing import RING, PackingSpec

MAX_RATING_LEVELS = 16  # each level is one more Beaver product on the whole matrix


@dataclass(frozen=True)
class IngestSpec(PackingSpec):
    """Packing for row ingest: one contribution per slot, a statistical mask only.

    Differences from the summing spec (see the protocol file): max_contributors is 1
    (every slot carries exactly one contributor's value: rows are placed, not summed), and
    the mask margin is stat_bits, not max(stat_bits, 64 - b - h): the codes enter CrypTen
    as precision-0 integers and each party's view is hidden by the statistical mask alone,
    so the mask need not be a uniform ring element. Slot width w = b + stat_bits + 1.
    """

    @property
    def mask_margin_bits(self) -> int:
        return self.stat_bits

    @property
    def digest(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(b"mpc-rec ingest packing v1 " + text.encode()).hexdigest()[:16]

    @classmethod
    def for_ratings(cls, rating_range: tuple[float, float], *, key_bits: int, stat_bits: int = 40) -> "IngestSpec":
        largest = max(abs(c) for c in rating_codes(rating_range))
        return cls(key_bits, value_bits=largest.bit_length() + 1, max_contributors=1, frac_bits=0,
                   stat_bits=stat_bits)


def rating_codes(rating_range: tuple[float, float]) -> list[int]:
    """The codes 2r - 1 of every whole-number rating r in the range (all odd and positive)."""
    lo, hi = rating_range
    first, last = math.ceil(lo), math.floor(hi)
    if last < first:
        raise ConfigError(f"rating range {lo:g}..{hi:g} holds no whole-number rating")
    if first < 1:
        raise ConfigError(f"row ingest needs ratings of at least 1 (the range starts at {lo:g})")
    if last - first + 1 > MAX_RATING_LEVELS:
        raise ConfigError(f"rating range {lo:g}..{hi:g} has {last - first + 1} whole-number levels; "
                          f"row ingest supports at most {MAX_RATING_LEVELS}")
    return [2 * r - 1 for r in range(first, last + 1)]


def encode_rows(train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray],
                rating_range: tuple[float, float]) -> np.ndarray:
    """Dense (ratings, 0/1 mask) pairs of the same rows as codes: 0, 2r - 1 (train), -(2r - 1) (test)."""
    rating_codes(rating_range)
    lo, hi = rating_range
    codes = np.zeros(train[0].shape, dtype=np.int64)
    for (ratings, mask), sign in ((train, 1), (test, -1)):
        rated = mask > 0
        values = ratings[rated]
        bad = np.flatnonzero(~np.isfinite(values) | (values != np.rint(values)) | (values < lo) | (values > hi))
        if bad.size:
            raise DataError(f"rating {float(values[bad[0]])!r} cannot be sent by row ingest: ratings must be whole "
                            f"numbers in {lo:g}..{hi:g} ({bad.size} such rating(s))")
        if np.any(codes[rated] != 0):
            raise DataError("a (user, item) pair is both a training and a held-out rating")
        codes[rated] = sign * (2 * np.rint(values).astype(np.int64) - 1)
    return codes


def decode_in_mpc(codes: Any, rating_range: tuple[float, float]) -> tuple[Any, Any, Any, Any]:
    """Shared precision-0 codes -> (train ratings, train mask, test ratings, test mask).

    Ratings come out at CrypTen's 16-bit fixed point, masks as precision-0 integers.
    """
    from crypten.encoder import FixedPointEncoder

    allowed = rating_codes(rating_range)
    square = codes * codes
    product = None
    for k in allowed:
        factor = square - k * k
        product = factor if product is None else product * factor
    denominator = math.prod(-k * k for k in allowed)  # odd
    not_rated = product.clone()
    not_rated.share = not_rated.share * _signed(pow(denominator, -1, RING))  # Q(v) / D exactly, mod 2^64
    rated = 1 - not_rated
    train_mask = (-codes)._ltz()  # [v > 0], exact 0/1 at precision 0
    test_mask = rated - train_mask
    code_times_train = codes * train_mask
    train_ratings = code_times_train + train_mask
    test_ratings = test_mask - codes + code_times_train
    for ratings in (train_ratings, test_ratings):
        ratings.share = ratings.share * (1 << 15)
        ratings.encoder = FixedPointEncoder()  # CrypTen's default 16 fractional bits
    return train_ratings, train_mask, test_ratings, test_mask


def _signed(value: int) -> int:
    value %= RING
    return value - RING if value >= RING // 2 else value


def padded_length(cells: int, spec: PackingSpec) -> int:
    """A contributor's vector fills whole ciphertexts, so no ciphertext mixes two contributors."""
    k = spec.slots_per_ciphertext
    return -(-cells // k) * k


def contributor_vector(codes: np.ndarray, spec: PackingSpec) -> np.ndarray:
    """The codes row-major, then zeros up to a whole ciphertext."""
    flat = codes.ravel().astype(np.int64)
    out = np.zeros(padded_length(flat.size, spec), dtype=np.int64)
    out[: flat.size] = flat
    return out


def joint_codes(local: np.ndarray, rows: list[int], n_items: int, spec: PackingSpec) -> np.ndarray:
    """This party's share of the joint vector -> its share of the joint code matrix, flattened.

    Pure slicing of public positions: contributor i's padded segment starts with its
    rows[i] rows of codes.
    """
    parts, start = [], 0
    for n in rows:
        parts.append(local[start:start + n * n_items])
        start += padded_length(n * n_items, spec)
    if start != local.size:
        raise ConfigError(f"the ingested vector has {local.size} values, the layout {rows} needs {start}")
    return np.ascontiguousarray(np.concatenate(parts))
