"""Key holder (compute party rank 0): decrypt the masked sum into its own share.

The key holder sees, per value, sum + mask as an integer; the mask is uniform on
[0, 2^(b + h + m')) with m' >= 40, so that number is within statistical distance 2^-40 of
one that does not depend on the totals. It never sees a contribution or the total.
"""

from __future__ import annotations

from typing import Any

from mpc_rec.errors import ConfigError
from mpc_rec.paillier import _crypto
from mpc_rec.paillier.errors import AggregationError
from mpc_rec.paillier.keys import PrivateKey
from mpc_rec.paillier.messages import LocalShare, MaskedSum
from mpc_rec.paillier.packing import PackingError, PackingSpec, decode_totals, to_ring, unpack


class KeyHolder:
    """Decrypts one masked sum per round, rounds strictly increasing."""

    def __init__(self, private_key: PrivateKey, spec: PackingSpec):
        if spec.key_bits != private_key.public_key.bits:
            raise ConfigError(f"packing spec is for {spec.key_bits}-bit keys, the key has {private_key.public_key.bits}")
        self._key, self.spec = private_key, spec
        self._last_round: int | None = None

    @property
    def fingerprint(self) -> str:
        return self._key.public_key.fingerprint

    def decrypt(self, message: MaskedSum | bytes | dict[str, Any], *, expected_round: int | None = None) -> LocalShare:
        """The key holder's share: (sum + mask - count * offset) mod 2^64 per value."""
        if isinstance(message, (bytes, bytearray, memoryview)):
            message = MaskedSum.from_bytes(message)
        elif isinstance(message, dict):
            message = MaskedSum.from_dict(message)
        elif not isinstance(message, MaskedSum):
            raise AggregationError(f"masked sum rejected: unsupported type {type(message).__name__}")
        spec, n = self.spec, self._key.public_key.n

        def fail(reason: str) -> AggregationError:
            return AggregationError(f"masked sum for round {message.round} rejected: {reason}")

        if expected_round is not None and message.round != expected_round:
            raise fail(f"expected round {expected_round}")
        if self._last_round is not None and message.round <= self._last_round:
            raise fail(f"round {self._last_round} was already decrypted; rounds must increase (replay?)")
        if message.fingerprint != self.fingerprint:
            raise fail(f"made under key {message.fingerprint[:16]}..., this key is {self.fingerprint[:16]}...")
        if message.spec != spec.digest:
            raise fail(f"packing spec {message.spec} differs from {spec.digest}")
        if not 1 <= message.count <= spec.max_contributors:
            raise fail(f"count {message.count} is outside 1..{spec.max_contributors}")
        if len(message.ciphertexts) != spec.chunks(message.length):
            raise fail(f"{len(message.ciphertexts)} ciphertexts cannot carry {message.length} values")
        for i, c in enumerate(message.ciphertexts):
            if not _crypto.is_valid_ciphertext(n, c):
                raise fail(f"ciphertext {i} is malformed (not in Z*_(n^2))")
        plaintexts = [self._key.decrypt_raw(c) for c in message.ciphertexts]
        try:
            masked_slots = unpack(plaintexts, message.length, spec)
        except PackingError as exc:
            raise fail(f"{exc}; some contribution was out of range, the round's totals are unusable") from None
        self._last_round = message.round
        values = to_ring(decode_totals(masked_slots, message.count, spec))
        return LocalShare("key_holder", message.round, message.count, message.contributors, values)
