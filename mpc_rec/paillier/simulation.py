"""Contributors as separate OS processes, sending serialised contributions to the aggregator.

For trials and tests on one machine: each job (contributor id, vector) runs in a worker
process of a small pool (at most ``processes`` at once, so a 2-core machine is not
oversubscribed); the aggregator's process receives only the JSON bytes of each
contribution, or a one-line error from a contributor that could not encode its vector.
"""

from __future__ import annotations

import multiprocessing
import time
from typing import Iterator, Mapping, Sequence

from mpc_rec.errors import MpcRecError
from mpc_rec.paillier.aggregator import AggregationRound
from mpc_rec.paillier.contributor import make_contribution
from mpc_rec.paillier.errors import RejectedContribution
from mpc_rec.paillier.keys import PublicKey
from mpc_rec.paillier.packing import PackingSpec


def _contributor_main(job: tuple) -> tuple[str, bytes | None, str | None]:
    n, spec_fields, fingerprint, contributor, round_id, values, delay_s = job
    if delay_s:
        time.sleep(delay_s)  # a slow device or network
    try:
        key = PublicKey(n)
        spec = PackingSpec(**spec_fields)
        message = make_contribution(key, spec, contributor, round_id, values,
                                    expected_fingerprint=fingerprint, workers=1)
        return contributor, message.to_bytes(), None
    except MpcRecError as exc:
        return contributor, None, str(exc)


def contributor_processes(
    public_key: PublicKey, spec: PackingSpec, round_id: int, vectors: Mapping[str, Sequence[float]], *,
    fingerprint: str, processes: int = 2, delays: Mapping[str, float] | None = None, timeout_s: float = 300.0,
) -> Iterator[tuple[str, bytes | None, str | None]]:
    """Yield (contributor, message bytes or None, error or None) as each process finishes.

    Stops at ``timeout_s`` (the round's deadline as seen by the aggregator): contributors
    still working are abandoned and their processes ended.
    """
    spec_fields = {name: getattr(spec, name) for name in spec.__dataclass_fields__}
    jobs = [(public_key.n, spec_fields, fingerprint, cid, round_id, list(map(float, values)),
             (delays or {}).get(cid, 0.0)) for cid, values in vectors.items()]
    end = time.monotonic() + timeout_s
    pool = multiprocessing.get_context("spawn").Pool(processes=max(1, min(processes, len(jobs))))
    try:
        results = pool.imap_unordered(_contributor_main, jobs)
        for _ in jobs:
            remaining = end - time.monotonic()
            if remaining <= 0:
                return
            try:
                yield results.next(timeout=remaining)
            except multiprocessing.TimeoutError:
                return
    finally:
        pool.terminate()
        pool.join()


def feed_round(round_: AggregationRound, stream: Iterator[tuple[str, bytes | None, str | None]]) -> dict[str, str]:
    """Submit every message of ``stream`` to ``round_``; return {contributor: problem} for the failures."""
    problems: dict[str, str] = {}
    for contributor, payload, error in stream:
        if payload is None:
            problems[contributor] = error or "no message"
            continue
        try:
            round_.submit(payload)
        except RejectedContribution as exc:
            problems[exc.contributor if exc.contributor != "?" else contributor] = str(exc)
    return problems
