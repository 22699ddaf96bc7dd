"""Aggregator (compute party rank 1): check, sum and mask contributions; keep the negated mask.

The aggregator only ever holds ciphertexts and its own random mask. It sends the key holder
Enc(sum + mask) and keeps -mask mod 2^64: with the key holder's decryption minus the
offsets, the two form additive shares of the totals that neither can see alone.
"""

from __future__ import annotations

import secrets
import time
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Callable, Iterable


from mpc_rec.errors import ConfigError
from mpc_rec.paillier import _crypto
from mpc_rec.paillier.errors import AggregationError, RejectedContribution
from mpc_rec.paillier.keys import PublicKey
from mpc_rec.paillier.messages import (
    MAX_VECTOR_LENGTH, Contribution, LocalShare, MaskedSum, ciphertext_digest, contributors_digest,
)
from mpc_rec.paillier.packing import PackingSpec, pack, to_ring


@dataclass(frozen=True)
class RoundReport:
    """What happened in a round: who was summed, who was refused and why, who was dropped."""

    round: int
    count: int
    accepted: tuple[str, ...]
    rejected: tuple[tuple[str, str], ...]  # (contributor, reason), in arrival order
    dropped: tuple[str, ...]  # expected contributors absent at the deadline (or late)
    contributors: str  # contributors_digest(accepted)


@dataclass(frozen=True)
class RoundResult:
    masked_sum: MaskedSum  # to the key holder
    share: LocalShare  # the aggregator's own share; stays here
    report: RoundReport


class Aggregator:
    """Holds what must outlive a round: the key, the spec, and every ciphertext already used."""

    def __init__(self, public_key: PublicKey, spec: PackingSpec, *, expected_fingerprint: str | None = None,
                 clock: Callable[[], float] = time.monotonic, executor: Executor | None = None,
                 workers: int | None = None):
        public_key.check(expected_fingerprint)
        if spec.key_bits != public_key.bits:
            raise ConfigError(f"packing spec is for {spec.key_bits}-bit keys, the key has {public_key.bits}")
        self.public_key, self.spec = public_key, spec
        self._clock, self._executor, self._workers = clock, executor, workers
        self._used: set[bytes] = set()  # digests of every ciphertext summed in any round
        self._last_round: int | None = None
        self._open: AggregationRound | None = None

    def open_round(self, round_id: int, *, length: int, deadline_s: float, expected: Iterable[str] | None = None,
                   min_contributors: int = 1) -> "AggregationRound":
        """Start round ``round_id`` (greater than any earlier round) for vectors of ``length``."""
        if self._open is not None and not self._open.closed:
            raise ConfigError(f"round {self._open.round} is still open")
        if not isinstance(round_id, int) or isinstance(round_id, bool) or round_id < 0:
            raise ConfigError(f"round must be a non-negative integer, got {round_id!r}")
        if self._last_round is not None and round_id <= self._last_round:
            raise ConfigError(f"round {round_id} is not after the last round {self._last_round}")
        if not isinstance(length, int) or not 1 <= length <= MAX_VECTOR_LENGTH:
            raise ConfigError(f"length must be in 1..{MAX_VECTOR_LENGTH}, got {length!r}")
        if not 0 < deadline_s <= 86_400:
            raise ConfigError(f"deadline_s must be in (0, 86400], got {deadline_s!r}")
        if not 1 <= min_contributors <= self.spec.max_contributors:
            raise ConfigError(f"min_contributors must be in 1..{self.spec.max_contributors}, got {min_contributors}")
        self._last_round = round_id
        self._open = AggregationRound(self, round_id, length, self._clock() + deadline_s,
                                      None if expected is None else frozenset(expected), min_contributors)
        return self._open


class AggregationRound:
    """One round: submit() each message as it arrives, then close() once at or after the deadline."""

    def __init__(self, owner: Aggregator, round_id: int, length: int, deadline: float,
                 expected: frozenset[str] | None, min_contributors: int):
        self._owner, self.round, self.length, self.deadline = owner, round_id, length, deadline
        self.expected, self.min_contributors = expected, min_contributors
        self.closed = False
        self._nsquare = _crypto.big(owner.public_key.nsquare)
        self._sums = [_crypto.big(1)] * owner.spec.chunks(length)  # Enc(0) with r = 1: neutral
        self._accepted: list[str] = []
        self._rejected: list[tuple[str, str]] = []
        self._late: list[str] = []

    @property
    def count(self) -> int:
        return len(self._accepted)

    def submit(self, message: Contribution | bytes | dict[str, Any]) -> None:
        """Check a contribution and add it to the sum; raise RejectedContribution otherwise.

        A refused message changes nothing in the round: the sum so far, the honest
        contributors already counted, and later submissions are unaffected.
        """
        try:
            self._accept(message)
        except RejectedContribution as exc:
            self._rejected.append((exc.contributor, exc.reason))
            raise

    def _accept(self, message: Contribution | bytes | dict[str, Any]) -> None:
        owner, spec = self._owner, self._owner.spec
        if isinstance(message, (bytes, bytearray, memoryview)):
            message = Contribution.from_bytes(message)
        elif isinstance(message, dict):
            message = Contribution.from_dict(message)
        elif not isinstance(message, Contribution):
            raise RejectedContribution("?", f"unsupported message type {type(message).__name__}")
        who = message.contributor

        def refuse(reason: str) -> RejectedContribution:
            return RejectedContribution(who, reason)

        if self.closed:
            raise refuse(f"round {self.round} is closed")
        if owner._clock() > self.deadline:
            self._late.append(who)
            raise refuse(f"missed the deadline of round {self.round}")
        if message.round != self.round:
            raise refuse(f"message is for round {message.round}, this is round {self.round} (stale or replayed)")
        if message.fingerprint != owner.public_key.fingerprint:
            raise refuse(f"encrypted under key {message.fingerprint[:16]}..., expected {owner.public_key.fingerprint[:16]}...")
        if message.spec != spec.digest:
            raise refuse(f"packing spec {message.spec} differs from the round's {spec.digest}")
        if self.expected is not None and who not in self.expected:
            raise refuse(f"not a registered contributor of round {self.round}")
        if who in self._accepted:
            raise refuse(f"already contributed to round {self.round} (replay or duplicate)")
        if self.count >= spec.max_contributors:
            raise refuse(f"round is full ({spec.max_contributors} contributors, the packing's headroom)")
        if message.length != self.length:
            raise refuse(f"vector has {message.length} values, the round takes {self.length}")
        if len(message.ciphertexts) != len(self._sums):
            raise refuse(f"{len(message.ciphertexts)} ciphertexts, {len(self._sums)} expected for {self.length} values")
        n = owner.public_key.n
        digests = []
        for i, c in enumerate(message.ciphertexts):
            if not _crypto.is_valid_ciphertext(n, c):
                raise refuse(f"ciphertext {i} is malformed (not in Z*_(n^2): 0 < c < n^2, gcd(c, n) = 1)")
            digest = ciphertext_digest(c)
            if digest in owner._used or digest in digests:
                raise refuse(f"ciphertext {i} repeats one already received (replay or duplicate)")
            digests.append(digest)
        self._sums = [s * c % self._nsquare for s, c in zip(self._sums, message.ciphertexts)]
        owner._used.update(digests)
        self._accepted.append(who)

    def close(self) -> RoundResult:
        """Mask the sum and split it into the key holder's message and this party's share."""
        if self.closed:
            raise AggregationError(f"round {self.round} was already closed")
        self.closed = True
        owner, spec = self._owner, self._owner.spec
        if self.count < self.min_contributors:
            raise AggregationError(
                f"round {self.round}: {self.count} contribution(s) accepted, at least {self.min_contributors} needed"
            )
        masks = [secrets.randbits(spec.mask_bits) for _ in range(self.length)]
        encrypted_masks = _crypto.encrypt_many(owner.public_key.n, pack(masks, spec),
                                               executor=owner._executor, workers=owner._workers)
        # A fresh encryption of each mask both masks and re-randomises the sum.
        masked = tuple(int(s * m % self._nsquare) for s, m in zip(self._sums, encrypted_masks))
        self._sums = []
        accepted = tuple(sorted(self._accepted))
        digest = contributors_digest(accepted)
        share = LocalShare("aggregator", self.round, self.count, digest, to_ring(-r for r in masks))
        del masks
        received = set(self._accepted)
        absent = set() if self.expected is None else set(self.expected - received)
        dropped = tuple(sorted(absent | (set(self._late) - received)))
        report = RoundReport(self.round, self.count, accepted, tuple(self._rejected), dropped, digest)
        message = MaskedSum(self.round, owner.public_key.fingerprint, spec.digest, self.length, self.count, digest, masked)
        return RoundResult(message, share, report)
