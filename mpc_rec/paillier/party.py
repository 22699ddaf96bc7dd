"""Inside a CrypTen compute-party process: run a round and turn the local shares into an MPCTensor.

Rank ``key_holder_rank`` (0) holds the key holder's share, rank ``aggregator_rank`` (1) the
aggregator's, every other rank zeros. The masked sum travels from the aggregator to the key
holder as raw bytes over CrypTen's communicator (length, then a uint8 tensor; no pickle).
Before the shares are used every rank checks that both roles report the same round,
count, length and contributor set; a failure on one rank is reported on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import torch

from mpc_rec.compat import import_crypten
from mpc_rec.errors import ConfigError
from mpc_rec.paillier.aggregator import Aggregator, RoundReport
from mpc_rec.paillier.errors import AggregationError, RejectedContribution
from mpc_rec.paillier.keyholder import KeyHolder
from mpc_rec.paillier.messages import MAX_MESSAGE_BYTES, LocalShare

_OK, _NO_ROLE, _FAILED = 1, 0, -1


def send_bytes(comm: Any, payload: bytes, dst: int) -> None:
    """Send a byte string (empty means "nothing: the round failed here")."""
    comm.send(torch.tensor([len(payload)], dtype=torch.long), dst)
    if payload:
        comm.send(torch.frombuffer(bytearray(payload), dtype=torch.uint8), dst)


def recv_bytes(comm: Any, src: int, *, max_bytes: int = MAX_MESSAGE_BYTES) -> bytes:
    size = int(comm.recv(torch.zeros(1, dtype=torch.long), src)[0])
    if not 0 <= size <= max_bytes:
        raise AggregationError(f"party {src} announced a message of {size} bytes (limit {max_bytes})")
    if size == 0:
        return b""
    return comm.recv(torch.empty(size, dtype=torch.uint8), src).numpy().tobytes()


def agree_on_shares(comm: Any, share: LocalShare | None, *, failed: bool, round_id: int, length: int,
                    roles: tuple[int, int]) -> tuple[int, str | None]:
    """All ranks exchange (status, round, count, length, contributor digest) and check them.

    Returns the agreed count and the contributor digest prefix; raises AggregationError on
    every rank if a role failed or the two roles disagree.
    """
    status = _FAILED if failed else (_OK if share is not None else _NO_ROLE)
    mine = torch.tensor(
        [status, round_id, share.count if share else 0, share.length if share else length,
         _digest64(share.contributors) if share else 0],
        dtype=torch.long,
    )
    rows = [t.tolist() for t in comm.all_gather(mine)]
    for rank, row in enumerate(rows):
        if row[0] == _FAILED:
            raise AggregationError(f"round {round_id}: party {rank} could not complete its part of the round")
    for rank in roles:
        if rows[rank][0] != _OK:
            raise AggregationError(f"round {round_id}: party {rank} holds no share")
    first, second = rows[roles[0]], rows[roles[1]]
    names = ("round", "count", "length", "contributor set")
    for name, a, b in zip(names, first[1:], second[1:]):
        if a != b:
            raise AggregationError(f"round {round_id}: key holder and aggregator disagree on the {name} ({a} vs {b})")
    if first[1] != round_id or first[3] != length:
        raise AggregationError(f"round {round_id}: shares are for round {first[1]} with {first[3]} values")
    return int(first[2]), share.contributors if share else None


def shares_to_mpc(values: np.ndarray | None, *, length: int, precision: int = 16, rerandomise: bool = True) -> Any:
    """This party's int64 ring share (None: zeros) as one share of an arithmetic MPCTensor.

    ``rerandomise`` adds CrypTen's pseudo-random zero sharing (pairwise seeds, no messages),
    so every party's share, zero shares included, looks uniformly random in Z_2^64.
    """
    import_crypten()
    from crypten.mpc import MPCTensor
    from crypten.mpc.primitives import ArithmeticSharedTensor

    if values is None:
        local = torch.zeros(length, dtype=torch.long)
    else:
        array = np.ascontiguousarray(values)
        if array.dtype != np.int64 or array.shape != (length,):
            raise ConfigError(f"a share must be an int64 vector of {length} ring elements, got {array.dtype} {array.shape}")
        local = torch.from_numpy(array.copy())
    if rerandomise:
        local = local + ArithmeticSharedTensor.PRZS(local.size()).share  # wraps mod 2^64
    return MPCTensor.from_shares(local, precision=precision)


@dataclass
class PartyRound:
    tensor: Any  # the MPCTensor of the round's totals
    count: int
    contributors: str | None  # digest of the ids summed (None on ranks without a role)
    report: RoundReport | None  # aggregator only


def aggregate_round_in_party(
    session: Any, *, round_id: int, length: int, aggregator: Aggregator | None = None,
    contributions: Iterable[bytes] = (), deadline_s: float = 60.0, expected: Iterable[str] | None = None,
    min_contributors: int = 1,
    key_holder: KeyHolder | None = None, key_holder_rank: int = 0, aggregator_rank: int = 1,
    precision: int = 16,
) -> PartyRound:
    """Run one Paillier aggregation round among the compute parties of ``session``.

    The aggregator rank passes its Aggregator and the contributions it received (bytes);
    the key holder rank passes its KeyHolder; other ranks pass neither.
    """
    rank = session.endpoint.rank
    comm = session.comm
    roles = (key_holder_rank, aggregator_rank)
    if key_holder_rank == aggregator_rank:
        raise ConfigError("the key holder and the aggregator must be different parties")
    if (rank == key_holder_rank) != (key_holder is not None) or (rank == aggregator_rank) != (aggregator is not None):
        raise ConfigError(f"rank {rank}: pass a KeyHolder on rank {key_holder_rank} only and an Aggregator on rank {aggregator_rank} only")
    share: LocalShare | None = None
    report: RoundReport | None = None
    failure: Exception | None = None
    for role in (aggregator, key_holder):
        if role is not None and role.spec.frac_bits != precision:
            raise ConfigError(f"the packing uses {role.spec.frac_bits} fractional bits, the MPC precision is {precision}")
    if rank == aggregator_rank:
        payload = b""
        try:
            open_round = aggregator.open_round(round_id, length=length, deadline_s=deadline_s, expected=expected,
                                              min_contributors=min_contributors)
            for message in contributions:
                try:
                    open_round.submit(message)
                except RejectedContribution:
                    pass  # recorded in the report; the round goes on with the others
            result = open_round.close()
            share, report, payload = result.share, result.report, result.masked_sum.to_bytes()
        except (AggregationError, ConfigError) as exc:
            failure = exc
        send_bytes(comm, payload, key_holder_rank)
    elif rank == key_holder_rank:
        payload = recv_bytes(comm, aggregator_rank)
        try:
            if not payload:
                raise AggregationError(f"round {round_id}: the aggregator reported that the round failed")
            share = key_holder.decrypt(payload, expected_round=round_id)
        except AggregationError as exc:
            failure = exc
    try:
        count, contributors = agree_on_shares(comm, share, failed=failure is not None, round_id=round_id,
                                              length=length, roles=roles)
    except AggregationError:
        if failure is not None:
            raise failure from None
        raise
    tensor = shares_to_mpc(share.values if share else None, length=length, precision=precision)
    return PartyRound(tensor, count, contributors, report)


def _digest64(hex_digest: str) -> int:
    return int(hex_digest[:16], 16) - (1 << 63)
