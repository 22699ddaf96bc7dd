"""The messages of a round and the shares they produce; JSON-safe dicts or bytes, no pickle.

Contribution: contributor -> aggregator. MaskedSum: aggregator -> key holder. LocalShare
never travels: each compute party keeps its own. Parsing is strict (exact keys, types,
lowercase hex, size limits) and every failure names the sender and the problem in one line.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

from mpc_rec.paillier.errors import AggregationError, RejectedContribution

VERSION = 1
MAX_VECTOR_LENGTH = 10_000_000
MAX_CIPHERTEXT_HEX = 4096  # n^2 of keys up to 8192 bits
MAX_MESSAGE_BYTES = 256 << 20
_ID = re.compile(r"[A-Za-z0-9._:@-]{1,128}")
_HEX = re.compile(r"[0-9a-f]{1,%d}" % MAX_CIPHERTEXT_HEX)
_FINGERPRINT = re.compile(r"[0-9a-f]{64}")
_DIGEST16 = re.compile(r"[0-9a-f]{16}")


def contributors_digest(ids: Any) -> str:
    """SHA-256 over the sorted contributor ids: lets two parties compare who was counted."""
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()


def ciphertext_digest(c: int) -> bytes:
    return hashlib.sha256(c.to_bytes((c.bit_length() + 7) // 8 or 1, "big")).digest()[:16]


@dataclass(frozen=True)
class Contribution:
    """One contributor's encrypted, packed vector for one round."""

    contributor: str
    round: int
    fingerprint: str
    spec: str
    length: int
    ciphertexts: tuple[int, ...] = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": "contribution", "version": VERSION, "contributor": self.contributor,
            "round": self.round, "fingerprint": self.fingerprint, "spec": self.spec,
            "length": self.length, "ciphertexts": [format(c, "x") for c in self.ciphertexts],
        }

    def to_bytes(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":")).encode()

    @classmethod
    def from_dict(cls, data: Any) -> "Contribution":
        who = _claimed_id(data)
        fields = _fields(data, "contribution", lambda reason: RejectedContribution(who, reason))
        return cls(who, *fields)

    @classmethod
    def from_bytes(cls, raw: bytes, *, max_bytes: int = MAX_MESSAGE_BYTES) -> "Contribution":
        return cls.from_dict(_loads(raw, max_bytes, lambda reason: RejectedContribution("?", reason)))


@dataclass(frozen=True)
class MaskedSum:
    """The masked homomorphic sum: what the key holder decrypts (never the bare total)."""

    round: int
    fingerprint: str
    spec: str
    length: int
    count: int
    contributors: str  # contributors_digest of the ids summed
    ciphertexts: tuple[int, ...] = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": "masked_sum", "version": VERSION, "round": self.round,
            "fingerprint": self.fingerprint, "spec": self.spec, "length": self.length,
            "count": self.count, "contributors": self.contributors,
            "ciphertexts": [format(c, "x") for c in self.ciphertexts],
        }

    def to_bytes(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":")).encode()

    @classmethod
    def from_dict(cls, data: Any) -> "MaskedSum":
        def fail(reason: str) -> AggregationError:
            return AggregationError(f"masked sum from the aggregator rejected: {reason}")

        round_id, fingerprint, spec, length, ciphertexts = _fields(data, "masked_sum", fail, extra=("count", "contributors"))
        count = _int(data["count"], "count", 1, 1 << 24, fail)
        digest = data["contributors"]
        if not isinstance(digest, str) or not _FINGERPRINT.fullmatch(digest):
            raise fail("'contributors' must be 64 lowercase hex characters")
        return cls(round_id, fingerprint, spec, length, count, digest, ciphertexts)

    @classmethod
    def from_bytes(cls, raw: bytes, *, max_bytes: int = MAX_MESSAGE_BYTES) -> "MaskedSum":
        return cls.from_dict(_loads(raw, max_bytes, lambda r: AggregationError(f"masked sum rejected: {r}")))


@dataclass(frozen=True)
class LocalShare:
    """One compute party's additive share (mod 2^64) of the round's totals; kept locally."""

    role: str  # "key_holder" or "aggregator"
    round: int
    count: int
    contributors: str
    values: np.ndarray = field(repr=False)  # int64 ring elements, fixed point (frac_bits)

    @property
    def length(self) -> int:
        return int(self.values.shape[0])


def _claimed_id(data: Any) -> str:
    who = data.get("contributor") if isinstance(data, dict) else None
    return who if isinstance(who, str) and _ID.fullmatch(who) else "?"


def _fields(data: Any, kind: str, fail: Callable[[str], Exception], extra: tuple[str, ...] = ()) -> tuple:
    if not isinstance(data, Mapping):
        raise fail(f"a {kind} message must be a JSON object")
    keys = {"type", "version", "round", "fingerprint", "spec", "length", "ciphertexts", *extra}
    if kind == "contribution":
        keys.add("contributor")
    if set(data) != keys:
        missing, unknown = sorted(keys - set(data)), sorted(set(data) - keys)
        raise fail(f"malformed message (missing {missing or 'nothing'}, unknown {unknown or 'nothing'})")
    if data["type"] != kind or type(data["version"]) is not int or data["version"] != VERSION:
        raise fail(f"not a version-{VERSION} {kind} message")
    if kind == "contribution" and not (isinstance(data["contributor"], str) and _ID.fullmatch(data["contributor"])):
        raise fail("contributor id must be 1-128 characters from A-Z a-z 0-9 . _ : @ -")
    round_id = _int(data["round"], "round", 0, 1 << 62, fail)
    fingerprint = data["fingerprint"]
    if not isinstance(fingerprint, str) or not _FINGERPRINT.fullmatch(fingerprint):
        raise fail("key fingerprint must be 64 lowercase hex characters")
    spec = data["spec"]
    if not isinstance(spec, str) or not _DIGEST16.fullmatch(spec):
        raise fail("packing spec digest must be 16 lowercase hex characters")
    length = _int(data["length"], "length", 1, MAX_VECTOR_LENGTH, fail)
    raw = data["ciphertexts"]
    if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_VECTOR_LENGTH:
        raise fail("ciphertexts must be a non-empty list")
    ciphertexts = []
    for i, text in enumerate(raw):
        if not isinstance(text, str) or not _HEX.fullmatch(text):
            raise fail(f"ciphertext {i} is not lowercase hex of at most {MAX_CIPHERTEXT_HEX} digits")
        ciphertexts.append(int(text, 16))
    return round_id, fingerprint, spec, length, tuple(ciphertexts)


def _int(value: Any, name: str, lo: int, hi: int, fail: Callable[[str], Exception]) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise fail(f"'{name}' must be an integer in [{lo}, {hi}], got {str(value)[:40]!r}")
    return value


def _loads(raw: Any, max_bytes: int, fail: Callable[[str], Exception]) -> Any:
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise fail("a message must be bytes")
    if len(raw) > max_bytes:
        raise fail(f"message of {len(raw)} bytes exceeds the limit of {max_bytes}")
    try:
        return json.loads(bytes(raw).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise fail(f"not valid UTF-8 JSON ({str(exc)[:80]})") from None
