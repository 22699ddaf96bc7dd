"""The aggregator's side of row ingest: check each contributor's rows, place, mask.

Each registered contributor sends one Contribution per round: its rows' codes (training
and held-out ratings in one code per cell, zero padding to whole ciphertexts) encrypted under the key holder's
key. Blocks are disjoint, so the homomorphic sum of the contributors' zero-extended
vectors is the concatenation of their ciphertexts: every slot carries exactly one
contribution and needs no headroom. The aggregator multiplies in a mask, keeps its
negation as its share, and sends the masked vector to the key holder (KeyHolder.decrypt).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from mpc_rec.errors import ConfigError
from mpc_rec.ingest.codes import IngestSpec, padded_length
from mpc_rec.paillier import _crypto
from mpc_rec.paillier.errors import AggregationError, RejectedContribution
from mpc_rec.paillier.keys import PublicKey
from mpc_rec.paillier.messages import (
    Contribution, LocalShare, MaskedSum, ciphertext_digest, contributors_digest,
)
from mpc_rec.paillier.packing import pack


@dataclass
class IngestReport:
    """Who was placed, refused (and why), withdrew, or never arrived; JSON-ready."""

    round: int
    registered: int
    accepted: list[str] = field(default_factory=list)  # in registration order after close
    rows: list[int] = field(default_factory=list)  # rows of each accepted contributor
    rejected: list[dict[str, str]] = field(default_factory=list)  # arrival order
    withdrawn: list[dict[str, str]] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    ciphertexts: dict[str, int] = field(default_factory=dict)
    message_bytes: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class IngestResult:
    masked_sum: MaskedSum  # to the key holder
    share: LocalShare  # the aggregator's own share (the negated masks); stays here
    report: IngestReport


class IngestRound:
    """One ingest round: submit()/withdraw() as messages arrive, close() once."""

    def __init__(self, public_key: PublicKey, spec: IngestSpec, *, round_id: int, registry: dict[str, int],
                 n_items: int, deadline_s: float, expected_fingerprint: str | None = None,
                 clock: Callable[[], float] = time.monotonic):
        public_key.check(expected_fingerprint)
        if spec.key_bits != public_key.bits:
            raise ConfigError(f"packing spec is for {spec.key_bits}-bit keys, the key has {public_key.bits}")
        if not registry or any(not isinstance(r, int) or r < 1 for r in registry.values()):
            raise ConfigError("the ingest registry must name at least one contributor, each with 1 or more rows")
        self.public_key, self.spec, self.round, self.n_items = public_key, spec, round_id, n_items
        self.registry = dict(registry)
        self.lengths = {cid: padded_length(rows * n_items, spec) for cid, rows in registry.items()}
        self._clock = clock
        self.deadline = clock() + deadline_s
        self.closed = False
        self._ciphertexts: dict[str, tuple[int, ...]] = {}
        self._used: set[bytes] = set()
        self.report = IngestReport(round_id, len(registry))

    @property
    def settled(self) -> bool:
        """Every registered contributor was placed or withdrew: no reason to wait longer."""
        done = set(self._ciphertexts) | {w["contributor"] for w in self.report.withdrawn}
        return done >= set(self.registry)

    def submit(self, raw: bytes) -> None:
        """Check one message and place it; RejectedContribution (recorded) otherwise."""
        try:
            self._accept(raw)
        except RejectedContribution as exc:
            self.report.rejected.append({"contributor": exc.contributor, "reason": exc.reason})
            raise

    def withdraw(self, contributor: str, reason: str) -> None:
        """A registered contributor says it will not send (e.g. its own data is unusable)."""
        if contributor in self.registry and contributor not in self._ciphertexts and not self.closed:
            self.report.withdrawn.append({"contributor": contributor, "reason": str(reason)[:300]})

    def _accept(self, raw: bytes) -> None:
        message = Contribution.from_bytes(raw)
        who = message.contributor

        def refuse(reason: str) -> RejectedContribution:
            return RejectedContribution(who, reason)

        if self.closed:
            raise refuse(f"round {self.round} is closed")
        if self._clock() > self.deadline:
            raise refuse(f"missed the deadline of round {self.round}")
        if message.round != self.round:
            raise refuse(f"message is for round {message.round}, this is round {self.round} (stale or replayed)")
        if message.fingerprint != self.public_key.fingerprint:
            raise refuse(f"encrypted under key {message.fingerprint[:16]}..., expected {self.public_key.fingerprint[:16]}...")
        if message.spec != self.spec.digest:
            raise refuse(f"packing spec {message.spec} differs from the round's {self.spec.digest}")
        if who not in self.registry:
            raise refuse(f"not a registered contributor of round {self.round}")
        if who in self._ciphertexts:
            raise refuse(f"already contributed to round {self.round} (replay or duplicate)")
        if any(w["contributor"] == who for w in self.report.withdrawn):
            raise refuse(f"withdrew from round {self.round}")
        length = self.lengths[who]
        if message.length != length:
            raise refuse(f"vector has {message.length} values, {length} registered ({self.registry[who]} rows)")
        if len(message.ciphertexts) != self.spec.chunks(length):
            raise refuse(f"{len(message.ciphertexts)} ciphertexts, {self.spec.chunks(length)} expected")
        n = self.public_key.n
        digests = set()
        for i, c in enumerate(message.ciphertexts):
            if not _crypto.is_valid_ciphertext(n, c):
                raise refuse(f"ciphertext {i} is malformed (not in Z*_(n^2))")
            digest = ciphertext_digest(c)
            if digest in self._used or digest in digests:
                raise refuse(f"ciphertext {i} repeats one already received (replay or duplicate)")
            digests.add(digest)
        self._used |= digests
        self._ciphertexts[who] = message.ciphertexts
        self.report.ciphertexts[who] = len(message.ciphertexts)
        self.report.message_bytes[who] = len(raw)

    def close(self) -> IngestResult:
        """Place the accepted blocks in registration order, mask, split into the two shares."""
        if self.closed:
            raise AggregationError(f"round {self.round} was already closed")
        self.closed = True
        accepted = [cid for cid in self.registry if cid in self._ciphertexts]
        report = self.report
        report.accepted = accepted
        report.rows = [self.registry[cid] for cid in accepted]
        withdrawn = {w["contributor"] for w in report.withdrawn}
        report.dropped = [cid for cid in self.registry if cid not in self._ciphertexts and cid not in withdrawn]
        if not accepted:
            raise AggregationError(f"ingest round {self.round}: no contribution was accepted")
        placed = [c for cid in accepted for c in self._ciphertexts[cid]]
        self._ciphertexts.clear()
        length = sum(self.lengths[cid] for cid in accepted)
        masks = _random_masks(length, self.spec.mask_bits)
        nsquare = _crypto.big(self.public_key.nsquare)
        n = _crypto.big(self.public_key.n)
        # (1 + n R) is an encryption of R with randomness 1: multiplying it in adds R to the
        # plaintext. No fresh randomness is needed: the key holder, who alone can strip it,
        # would learn only the contributors' random units (see the protocol file).
        masked = tuple(int(c * (1 + n * r) % nsquare) for c, r in zip(placed, pack(masks.tolist(), self.spec)))
        digest = contributors_digest(accepted)
        share = LocalShare("aggregator", self.round, 1, digest, (-masks).astype(np.int64))
        message = MaskedSum(self.round, self.public_key.fingerprint, self.spec.digest, length, 1, digest, masked)
        return IngestResult(message, share, report)


def _random_masks(count: int, bits: int) -> np.ndarray:
    """Uniform integers on [0, 2^bits) from the OS generator (bits <= 62 here: w <= 63)."""
    if bits > 62:
        raise ConfigError(f"row ingest masks of {bits} bits do not fit int64; lower stat_bits")
    words = np.frombuffer(os.urandom(8 * count), dtype=np.uint64)
    return (words >> np.uint64(64 - bits)).astype(np.int64)

