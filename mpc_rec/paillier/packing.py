"""Packing many fixed-point values into one Paillier plaintext: pure integer maths.

Layout (protocols/paillier-aggregation.md has the proof that nothing overflows):

- a value v is encoded as x = round(v * 2^f), a signed integer in [-2^(b-1), 2^(b-1) - 1];
- the offset 2^(b-1) makes it non-negative: s = x + 2^(b-1) in [0, 2^b - 1];
- slot i of a plaintext holds s_i in bits [i w, (i + 1) w): P = sum_i s_i 2^(i w);
- w = b + h + m' + 1 where h = ceil(log2 M) holds the sum of up to M contributors, m' the
  statistical mask margin (the mask is uniform on [0, 2^(b + h + m'))) and 1 bit the carry
  of mask + sum; k = floor((key_bits - 1) / w) slots fit below n, since n >= 2^(key_bits - 1).

m' = max(stat_bits, 64 - b - h): at least the statistical parameter, and enough that the
mask range 2^(b + h + m') is a multiple of 2^64, so the mask reduced mod 2^64 (a CrypTen
ring share) is exactly uniform.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

import numpy as np

from mpc_rec.errors import InputError

RING_BITS = 64
RING = 1 << RING_BITS


class PackingError(InputError):
    """Values or parameters outside what the packing can represent exactly."""


@dataclass(frozen=True)
class PackingSpec:
    """Validated packing parameters; every party of a round must use the same (see digest)."""

    key_bits: int
    value_bits: int = 24
    max_contributors: int = 1024
    frac_bits: int = 16
    stat_bits: int = 40

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not isinstance(value, int) or isinstance(value, bool):
                raise PackingError(f"packing parameter {name} must be an integer, got {value!r}")
        if self.key_bits < 1024:
            raise PackingError(f"key_bits must be at least 1024, got {self.key_bits}")
        if not 2 <= self.value_bits <= 53:
            raise PackingError(f"value_bits must be in 2..53 (exact in float64), got {self.value_bits}")
        if not 0 <= self.frac_bits < self.value_bits or self.frac_bits > 32:
            raise PackingError(f"frac_bits must be in 0..min(32, value_bits - 1), got {self.frac_bits}")
        if not 1 <= self.max_contributors <= 1 << 24:
            raise PackingError(f"max_contributors must be in 1..2^24, got {self.max_contributors}")
        if not 40 <= self.stat_bits <= 128:
            raise PackingError(f"stat_bits must be in 40..128, got {self.stat_bits}")
        if self.value_bits + self.headroom_bits > RING_BITS:
            raise PackingError(
                f"value_bits + ceil(log2 max_contributors) = {self.value_bits + self.headroom_bits} "
                f"exceeds {RING_BITS}: the total would not fit a signed 64-bit ring element"
            )
        if self.slots_per_ciphertext < 1:
            raise PackingError(f"a {self.slot_bits}-bit slot does not fit a {self.key_bits}-bit key")

    @classmethod
    def for_range(cls, max_abs: float, *, key_bits: int, max_contributors: int = 1024,
                  frac_bits: int = 16, stat_bits: int = 40) -> "PackingSpec":
        """The narrowest spec whose values cover [-max_abs, max_abs] at 2^-frac_bits resolution."""
        if not (isinstance(max_abs, (int, float)) and math.isfinite(max_abs) and max_abs > 0):
            raise PackingError(f"max_abs must be a positive finite number, got {max_abs!r}")
        largest = round(max_abs * 2**frac_bits)
        value_bits = max(2, frac_bits + 1, largest.bit_length() + 1)  # largest <= 2^(b-1) - 1
        return cls(key_bits, value_bits, max_contributors, frac_bits, stat_bits)

    @property
    def headroom_bits(self) -> int:
        """h = ceil(log2 max_contributors): a sum of M values below 2^b is below 2^(b + h)."""
        return (self.max_contributors - 1).bit_length()

    @property
    def offset(self) -> int:
        return 1 << (self.value_bits - 1)

    @property
    def min_encoded(self) -> int:
        return -self.offset

    @property
    def max_encoded(self) -> int:
        return self.offset - 1

    @property
    def max_abs(self) -> float:
        """The largest magnitude accepted on both sides (the negative side reaches one step further)."""
        return self.max_encoded / 2**self.frac_bits

    @property
    def mask_margin_bits(self) -> int:
        return max(self.stat_bits, RING_BITS - self.value_bits - self.headroom_bits)

    @property
    def mask_bits(self) -> int:
        """The mask is uniform on [0, 2^mask_bits), mask_bits = b + h + m'."""
        return self.value_bits + self.headroom_bits + self.mask_margin_bits

    @property
    def slot_bits(self) -> int:
        """w = b + h + m' + 1: sum of M offset values plus the mask stays below 2^w."""
        return self.mask_bits + 1

    @property
    def slots_per_ciphertext(self) -> int:
        return (self.key_bits - 1) // self.slot_bits

    def chunks(self, length: int) -> int:
        """Ciphertexts needed for a vector of ``length`` values."""
        return -(-length // self.slots_per_ciphertext)

    @property
    def digest(self) -> str:
        """16 hex characters naming these parameters, carried by every message of a round."""
        text = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(b"mpc-rec packing v1 " + text.encode()).hexdigest()[:16]


def encode(values: Iterable[float], spec: PackingSpec) -> list[int]:
    """Fixed point: round(v * 2^f) for each finite v within range, as Python ints."""
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise PackingError(f"values are not numbers ({exc})") from None
    if array.ndim != 1:
        raise PackingError(f"values must be a flat vector, got shape {array.shape}")
    bad = np.flatnonzero(~np.isfinite(array))
    if bad.size:
        i = int(bad[0])
        raise PackingError(f"value {i} is {float(array[i])} ({bad.size} non-finite value(s)); only finite numbers can be sent")
    scaled = np.rint(array * float(2**spec.frac_bits))
    out = np.flatnonzero((scaled < spec.min_encoded) | (scaled > spec.max_encoded))
    if out.size:
        i = int(out[0])
        raise PackingError(
            f"value {i} = {float(array[i])!r} is outside [-{spec.max_abs}, {spec.max_abs}] "
            f"({out.size} value(s) out of range)"
        )
    return scaled.astype(np.int64).tolist()


def to_slots(encoded: Sequence[int], spec: PackingSpec) -> list[int]:
    """Shift signed encoded values to s = x + 2^(b-1) in [0, 2^b)."""
    lo, hi, off = spec.min_encoded, spec.max_encoded, spec.offset
    result = []
    for i, x in enumerate(encoded):
        if not lo <= x <= hi:
            raise PackingError(f"encoded value {i} = {x} is outside [{lo}, {hi}]")
        result.append(x + off)
    return result


def pack(slots: Sequence[int], spec: PackingSpec) -> list[int]:
    """Plaintexts holding k slots each, slot 0 in the lowest bits; every slot in [0, 2^w)."""
    w, k = spec.slot_bits, spec.slots_per_ciphertext
    limit = 1 << w
    if slots and (min(slots) < 0 or max(slots) >= limit):
        raise PackingError(f"a slot value is outside [0, 2^{w})")
    plaintexts = []
    for start in range(0, len(slots), k):
        acc = 0
        for s in reversed(slots[start:start + k]):
            acc = (acc << w) | s
        plaintexts.append(acc)
    return plaintexts


def unpack(plaintexts: Sequence[int], length: int, spec: PackingSpec) -> list[int]:
    """The first ``length`` slots; refuses a plaintext wider than k slots (an overflow)."""
    w, k = spec.slot_bits, spec.slots_per_ciphertext
    if len(plaintexts) != spec.chunks(length):
        raise PackingError(f"{len(plaintexts)} plaintexts cannot hold exactly {length} values")
    mask = (1 << w) - 1
    slots: list[int] = []
    for index, p in enumerate(plaintexts):
        if not 0 <= p < 1 << (k * w):
            raise PackingError(f"plaintext {index} exceeds {k} slots of {w} bits: a slot overflowed")
        used = min(k, length - index * k)
        slots.extend((p >> (i * w)) & mask for i in range(used))
        if p >> (used * w):
            raise PackingError(f"plaintext {index} has data beyond its last used slot: a slot overflowed")
    return slots


def pack_values(values: Iterable[float], spec: PackingSpec) -> list[int]:
    """encode, offset and pack: the plaintexts one contributor encrypts."""
    return pack(to_slots(encode(values, spec), spec), spec)


def decode_totals(slot_sums: Sequence[int], count: int, spec: PackingSpec) -> list[int]:
    """Signed totals sum_i x_i from slot sums of ``count`` contributions (count * offset removed)."""
    removed = count * spec.offset
    return [s - removed for s in slot_sums]


def to_ring(values: Iterable[int]) -> np.ndarray:
    """Integers reduced mod 2^64 as int64 ring elements (two's complement), CrypTen's share type."""
    return np.array([v % RING for v in values], dtype=np.uint64).view(np.int64)
