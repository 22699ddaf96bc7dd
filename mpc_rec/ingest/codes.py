"""Rating rows as narrow integer codes: one Paillier slot per cell, decoded inside MPC.

A cell of a user's row is coded v = 0 (not rated) or v = 2r - 1 for a whole-number
rating r. Every code of a rating is odd, so inside MPC, with exact integer arithmetic in
Z_2^64 (precision-0 shares, Beaver products, no truncation):

    Q(v) = prod_{k in K} (v - k)        K = codes of the allowed ratings
    Q(0) = D = prod_{k in K} (-k)       odd, hence invertible mod 2^64
    Q(k) = 0 for k in K
    mask = 1 - Q(v) * D^-1   (mod 2^64, exact: Q(v) is D or 0)
    rating * mask * 2^16 = (v + mask) * 2^15      (a public multiply into fixed point)

Codes need value_bits b = bit length of max |v| plus a sign bit (5 bits for ratings 1..5,
codes up to 9), against b = 20 for 16-bit fixed-point ratings and a second slot for the
mask: see protocols/paillier-aggregation.md, "Row ingest", for the slot widths.
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
    """The codes 2r - 1 of every whole-number rating r in the range (all odd, none 0)."""
    lo, hi = rating_range
    first, last = math.ceil(lo), math.floor(hi)
    if last < first:
        raise ConfigError(f"rating range {lo}..{hi} holds no whole-number rating")
    if last - first + 1 > MAX_RATING_LEVELS:
        raise ConfigError(f"rating range {lo}..{hi} has {last - first + 1} whole-number levels; "
                          f"row ingest supports at most {MAX_RATING_LEVELS}")
    return [2 * r - 1 for r in range(first, last + 1)]


def encode_rows(ratings: np.ndarray, mask: np.ndarray, rating_range: tuple[float, float]) -> np.ndarray:
    """Dense (ratings, 0/1 mask) rows as codes: 0 unrated, 2r - 1 rated with r."""
    rated = mask > 0
    values = ratings[rated]
    lo, hi = rating_range
    bad = np.flatnonzero(~np.isfinite(values) | (values != np.rint(values)) | (values < lo) | (values > hi))
    if bad.size:
        raise DataError(f"rating {values[bad[0]]!r} cannot be sent by row ingest: ratings must be whole "
                        f"numbers in {lo:g}..{hi:g} ({bad.size} such rating(s))")
    codes = np.zeros(ratings.shape, dtype=np.int64)
    codes[rated] = 2 * np.rint(values).astype(np.int64) - 1
    return codes


def decode_in_mpc(codes: Any, rating_range: tuple[float, float]) -> tuple[Any, Any]:
    """Shared precision-0 codes -> (ratings at 16-bit fixed point, precision-0 mask)."""
    from crypten.encoder import FixedPointEncoder

    allowed = rating_codes(rating_range)
    product = None
    for k in allowed:
        factor = codes - k
        product = factor if product is None else product * factor
    denominator = math.prod(-k for k in allowed)  # odd
    inverse = _signed(pow(denominator, -1, RING))
    not_rated = product.clone()
    not_rated._tensor.share = not_rated._tensor.share * inverse  # Q(v) / D exactly, wraps mod 2^64
    mask = 1 - not_rated
    ratings = codes + mask
    ratings._tensor.share = ratings._tensor.share * (1 << 15)
    encoder = FixedPointEncoder()  # CrypTen's default 16 fractional bits
    ratings._tensor.encoder = encoder
    ratings.encoder = encoder
    return ratings, mask


def _signed(value: int) -> int:
    value %= RING
    return value - RING if value >= RING // 2 else value


def padded_length(cells: int, spec: PackingSpec) -> int:
    """A contributor's vector fills whole ciphertexts, so no ciphertext mixes two contributors."""
    k = spec.slots_per_ciphertext
    return -(-cells // k) * k


def contributor_vector(train_codes: np.ndarray, test_codes: np.ndarray, spec: PackingSpec) -> np.ndarray:
    """[train codes row-major | test codes row-major | zeros up to a whole ciphertext]."""
    flat = np.concatenate([train_codes.ravel(), test_codes.ravel()]).astype(np.int64)
    out = np.zeros(padded_length(flat.size, spec), dtype=np.int64)
    out[: flat.size] = flat
    return out


def split_codes(local: np.ndarray, rows: list[int], n_items: int, spec: PackingSpec) -> tuple[Any, Any]:
    """This party's share of the joint vector -> its shares of the (train, test) code matrices.

    Pure slicing of public positions: contributor i's padded segment holds rows[i] train
    rows then rows[i] test rows.
    """
    import torch

    train, test, start = [], [], 0
    for n in rows:
        cells = n * n_items
        train.append(local[start:start + cells])
        test.append(local[start + cells:start + 2 * cells])
        start += padded_length(2 * cells, spec)
    if start != local.size:
        raise ConfigError(f"the ingested vector has {local.size} values, the layout {rows} needs {start}")
    total = sum(rows)
    as_matrix = lambda parts: torch.from_numpy(np.concatenate(parts).reshape(total, n_items).copy())  # noqa: E731
    return as_matrix(train), as_matrix(test)
