"""Contributor side: encode, pack and encrypt a vector into one Contribution per round."""

from __future__ import annotations

from concurrent.futures import Executor
from typing import Iterable

from mpc_rec.paillier import _crypto
from mpc_rec.paillier.errors import ContributionInputError
from mpc_rec.paillier.keys import PublicKey
from mpc_rec.paillier.messages import _ID, MAX_VECTOR_LENGTH, Contribution
from mpc_rec.paillier.packing import PackingError, PackingSpec, pack, to_slots, encode


def make_contribution(
    public_key: PublicKey,
    spec: PackingSpec,
    contributor: str,
    round_id: int,
    values: Iterable[float],
    *,
    expected_fingerprint: str | None = None,
    expected_length: int | None = None,
    executor: Executor | None = None,
    workers: int | None = None,
) -> Contribution:
    """Encrypt ``values`` (fixed point at spec.frac_bits, packed) under ``public_key``.

    ``expected_fingerprint`` is the key holder's fingerprint learnt out of band: a key that
    does not match is refused before anything is encrypted under it. Large vectors are
    encrypted on worker processes (``executor``, or a pool of ``workers``); small ones here.
    Raises ContributionInputError naming the contributor for NaN/inf, out-of-range values,
    a wrong length or a key that does not fit the spec.
    """
    if not isinstance(contributor, str) or not _ID.fullmatch(contributor):
        raise ContributionInputError(str(contributor)[:40], "id must be 1-128 characters from A-Z a-z 0-9 . _ : @ -")
    if expected_fingerprint is not None and expected_fingerprint.lower() != public_key.fingerprint:
        raise ContributionInputError(
            contributor, f"public key fingerprint {public_key.fingerprint[:16]}... is not the expected "
            f"{expected_fingerprint[:16]}...: nothing was encrypted"
        )
    if spec.key_bits != public_key.bits:
        raise ContributionInputError(contributor, f"packing spec is for {spec.key_bits}-bit keys, the key has {public_key.bits}")
    if not isinstance(round_id, int) or isinstance(round_id, bool) or round_id < 0:
        raise ContributionInputError(contributor, f"round must be a non-negative integer, got {round_id!r}")
    try:
        encoded = encode(values, spec)
    except PackingError as exc:
        raise ContributionInputError(contributor, str(exc)) from None
    if not encoded:
        raise ContributionInputError(contributor, "the vector is empty")
    if len(encoded) > MAX_VECTOR_LENGTH:
        raise ContributionInputError(contributor, f"{len(encoded)} values exceed the limit of {MAX_VECTOR_LENGTH}")
    if expected_length is not None and len(encoded) != expected_length:
        raise ContributionInputError(contributor, f"the vector has {len(encoded)} values, the round takes {expected_length}")
    plaintexts = pack(to_slots(encoded, spec), spec)
    ciphertexts = _crypto.encrypt_many(public_key.n, plaintexts, executor=executor, workers=workers)
    return Contribution(contributor, round_id, public_key.fingerprint, spec.digest, len(encoded), tuple(ciphertexts))
