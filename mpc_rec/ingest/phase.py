"""Row ingest inside a compute-party process: before the CrypTen session, then into shares.

Before the session (its gloo waits are bounded by the short network timeout, while
contributors may take minutes): the aggregator (rank 1) serves the ingest channel,
collects until every registered contributor was placed or withdrew, or the deadline,
then masks; the key holder (rank 0) fetches the masked vector, decrypts its share and
says so; every other rank waits for that. Then all start the session together, check
that both shares describe the same round (``agree_on_shares``) and turn the local
shares into MPCTensors of the joint (train, test) code matrices, decoded in MPC into
ratings and masks. The entry into training is ``shared_training_data(ratings, mask)``,
exactly as for rows shared by the parties themselves.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mpc_rec.errors import ConfigError, InputError, PeerError
from mpc_rec.ingest.codes import IngestSpec, decode_in_mpc, joint_codes, padded_length
from mpc_rec.ingest.round import IngestRound
from mpc_rec.ingest.transport import ChannelTls, Server, request
from mpc_rec.paillier.errors import AggregationError, RejectedContribution
from mpc_rec.paillier.keyholder import KeyHolder
from mpc_rec.paillier.keys import load_private_key, load_public_key
from mpc_rec.paillier.messages import MAX_MESSAGE_BYTES, LocalShare

KEY_HOLDER, AGGREGATOR = 0, 1


@dataclass(frozen=True)
class IngestConfig:
    """The [ingest] section of a compute party's configuration."""

    address: str  # the aggregator's ingest channel, HOST:PORT
    fingerprint: str = ""  # the key holder's public key fingerprint, learnt out of band (ranks 0 and 1)
    round: int = 0
    deadline_s: float = 1800.0  # contributions are accepted until then
    wait_s: float = 3600.0  # bound on every wait of the ingest phase
    stat_bits: int = 40
    public_key: Path | None = None  # the aggregator's copy of the public key file
    private_key: Path | None = None  # key holder only (mode 0600)
    registry: Path | None = None  # aggregator only: contributors and their row counts

    def __post_init__(self) -> None:
        if not 0 < self.deadline_s <= self.wait_s <= 86_400:
            raise ConfigError(f"ingest: need 0 < deadline_s <= wait_s <= 86400, got {self.deadline_s}, {self.wait_s}")
        if not isinstance(self.round, int) or self.round < 0:
            raise ConfigError(f"ingest.round must be a non-negative integer, got {self.round!r}")

    def check_role(self, rank: int) -> None:
        needed = {KEY_HOLDER: ("private_key", "fingerprint"), AGGREGATOR: ("public_key", "registry", "fingerprint")}.get(rank, ())
        for name in needed:
            if not getattr(self, name):
                raise ConfigError(f"missing required setting ingest.{name} for rank {rank}")


@dataclass
class Ingested:
    """What one compute party takes from the ingest phase into the session."""

    round: int
    rows: list[int]  # rows of each placed contributor, in placement order
    length: int  # values in the joint vector (padding included)
    share: LocalShare | None  # key holder and aggregator only
    seconds: float
    report: dict[str, Any] | None = None  # the aggregator's round report; the key holder's timing
    spec: IngestSpec | None = field(default=None, repr=False)


def load_registry(path: Path, round_id: int) -> dict[str, int]:
    """{contributor id: rows} in registration order, from {"round", "contributors": [{id, rows}]}."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the ingest registry ({exc})") from None
    entries = data.get("contributors") if isinstance(data, dict) else None
    if data.get("round") != round_id if isinstance(data, dict) else True:
        raise ConfigError(f"{path}: registry is not for round {round_id}")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{path}: 'contributors' must be a non-empty list")
    registry: dict[str, int] = {}
    for entry in entries:
        ok = isinstance(entry, dict) and isinstance(entry.get("id"), str) and isinstance(entry.get("rows"), int)
        if not ok or entry["rows"] < 1 or entry["id"] in registry:
            raise ConfigError(f"{path}: bad or repeated registry entry {str(entry)[:80]}")
        registry[entry["id"]] = entry["rows"]
    return registry


def ingest_before_session(config: Any, n_items: int) -> Ingested:
    ingest: IngestConfig = config.ingest
    rank = config.endpoint.rank
    ingest.check_role(rank)
    client, server = channel_tls(config.endpoint.tls)
    if rank == AGGREGATOR:
        waiting = config.endpoint.world_size - 2 + (config.endpoint.dealer == "ttp")  # others and the dealer
        return _aggregate(ingest, config.rating_range, n_items, waiting_parties=waiting, tls=server)
    if rank == KEY_HOLDER:
        return _decrypt(ingest, config.rating_range, n_items, tls=client)
    return _await_ready(ingest, rank, tls=client)  # further compute parties and the dealer


def channel_tls(settings: Any) -> tuple[ChannelTls | None, ChannelTls | None]:
    """(client, server) TLS of the ingest channel from the pilot's [tls] settings; None over gloo.

    Clients check the aggregator's certificate against the pilot CA and the name at rank 1.
    The aggregator asks for client certificates but cannot require them (contributors are
    not pilot parties); the key holder's requests and "ready" need the certificate of the
    party the configuration names for them.
    """
    import ssl

    if settings is None:
        return None, None
    names = {peer.rank: peer.name for peer in settings.peers}
    client = ChannelTls(settings.client_context(), aggregator=names[AGGREGATOR])
    server_context = settings.server_context()
    server_context.verify_mode = ssl.CERT_OPTIONAL  # a certificate, if presented, must still chain to the CA
    key_holder = frozenset({names[KEY_HOLDER]})
    others = frozenset(name for rank, name in names.items() if rank not in (KEY_HOLDER, AGGREGATOR))
    return client, ChannelTls(server_context, party_kinds={"masked_sum": key_holder, "decrypted": key_holder,
                                                           "ready": others})


def _aggregate(ingest: IngestConfig, rating_range: tuple[float, float], n_items: int, *, waiting_parties: int,
               tls: ChannelTls | None = None) -> Ingested:
    started = time.monotonic()
    public_key = load_public_key(ingest.public_key, expected_fingerprint=ingest.fingerprint)
    spec = IngestSpec.for_ratings(rating_range, key_bits=public_key.bits, stat_bits=ingest.stat_bits)
    registry = load_registry(ingest.registry, ingest.round)
    round_ = IngestRound(public_key, spec, round_id=ingest.round, registry=registry, n_items=n_items,
                         deadline_s=ingest.deadline_s)
    lock = threading.Lock()
    closed, decrypted, all_told = threading.Event(), threading.Event(), threading.Event()
    told: set[int] = set()
    outcome: dict[str, Any] = {}
    hex_digits = 2 * public_key.bits // 4 + 3
    largest = max(spec.chunks(length) for length in round_.lengths.values()) * hex_digits + 4096

    def body_limit(header: dict[str, Any]) -> int:
        return largest if header.get("kind") == "contribution" else 0

    def handle(header: dict[str, Any], body: bytes | None) -> tuple[dict[str, Any], bytes | None]:
        kind = header.get("kind")
        if kind == "contribution":
            if body is None:
                return {"status": "rejected", "reason": "no contribution in the request"}, None
            with lock:
                try:
                    round_.submit(body)
                except RejectedContribution as exc:
                    return {"status": "rejected", "reason": exc.reason}, None
            return {"status": "accepted"}, None
        if kind == "withdraw":
            with lock:
                round_.withdraw(str(header.get("contributor", "?"))[:128], str(header.get("reason", ""))[:300])
            return {"status": "ok"}, None
        if kind == "masked_sum":  # the key holder
            closed.wait(ingest.wait_s)
            if "result" not in outcome:
                return {"status": "failed", "reason": outcome.get("failure", "the round did not close in time")}, None
            result = outcome["result"]
            return {"status": "ok", "rows": result.report.rows}, result.masked_sum.to_bytes()
        if kind == "decrypted":  # the key holder, once its share exists (or not)
            outcome["key_holder"] = None if header.get("ok") is True else str(header.get("reason", "unknown"))[:300]
            decrypted.set()
            return {"status": "ok"}, None
        if kind == "ready":  # every other compute party
            decrypted.wait(ingest.wait_s)
            rank = header.get("rank")
            with lock:
                told.add(rank if isinstance(rank, int) else -1)
                if len(told) >= waiting_parties:
                    all_told.set()
            if "result" not in outcome or outcome.get("key_holder", "no answer") is not None:
                return {"status": "failed", "reason": outcome.get("failure") or outcome.get("key_holder", "timed out")}, None
            return {"status": "ok", "rows": outcome["result"].report.rows}, None
        return {"status": "rejected", "reason": f"unknown request kind {str(kind)[:40]!r}"}, None

    server = Server(ingest.address, handle, body_limit, io_timeout_s=ingest.wait_s, tls=tls)
    try:
        while not round_.settled and time.monotonic() < round_.deadline:
            time.sleep(0.05)
        with lock:
            try:
                outcome["result"] = round_.close()
            except AggregationError as exc:
                outcome["failure"] = str(exc)
        closed.set()
        if "failure" in outcome:
            decrypted.set()
            raise AggregationError(outcome["failure"])
        if not decrypted.wait(ingest.wait_s):
            raise PeerError(f"the key holder did not decrypt its share within {ingest.wait_s:.0f} s")
        if outcome["key_holder"] is not None:
            raise PeerError(f"the key holder could not decrypt its share: {outcome['key_holder']}")
        # The channel stays open until every other compute party has heard that the round is
        # done, however late it started: all of them must reach the session rendezvous.
        if waiting_parties > 0 and not all_told.wait(ingest.wait_s):
            raise PeerError(f"not every compute party asked whether the ingest round was done within {ingest.wait_s:.0f} s")
    finally:
        time.sleep(0.5)  # let the last replies go out before the channel closes
        server.close()
    result = outcome["result"]
    report = result.report.to_dict()
    report["refused_unread"] = list(server.refused)
    return Ingested(ingest.round, result.report.rows, result.masked_sum.length, result.share,
                    time.monotonic() - started, report, spec)


def _decrypt(ingest: IngestConfig, rating_range: tuple[float, float], n_items: int,
             tls: ChannelTls | None = None) -> Ingested:
    started = time.monotonic()
    private_key = load_private_key(ingest.private_key)
    if private_key.public_key.fingerprint != ingest.fingerprint.lower():
        raise InputError(f"{ingest.private_key}: this key's fingerprint is not ingest.fingerprint")
    spec = IngestSpec.for_ratings(rating_range, key_bits=private_key.public_key.bits, stat_bits=ingest.stat_bits)
    reply, body = request(ingest.address, {"kind": "masked_sum", "round": ingest.round}, wait_s=ingest.wait_s,
                          reply_limit=MAX_MESSAGE_BYTES, tls=tls)
    if reply.get("status") != "ok" or body is None:
        raise PeerError(f"ingest round {ingest.round} failed at the aggregator: {reply.get('reason', 'no masked sum')}")
    decrypt_started = time.monotonic()
    try:
        rows = _rows(reply)
        share = KeyHolder(private_key, spec).decrypt(body, expected_round=ingest.round)
        expected = sum(padded_length(r * n_items, spec) for r in rows)
        if share.length != expected:
            raise AggregationError(f"masked vector has {share.length} values, the layout needs {expected}")
    except (AggregationError, PeerError) as exc:
        request(ingest.address, {"kind": "decrypted", "round": ingest.round, "ok": False, "reason": str(exc)},
                wait_s=ingest.wait_s, tls=tls)
        raise
    request(ingest.address, {"kind": "decrypted", "round": ingest.round, "ok": True}, wait_s=ingest.wait_s, tls=tls)
    report = {"decrypt_s": time.monotonic() - decrypt_started, "ciphertexts": spec.chunks(share.length)}
    return Ingested(ingest.round, rows, share.length, share, time.monotonic() - started, report, spec)


def _await_ready(ingest: IngestConfig, rank: int, tls: ChannelTls | None = None) -> Ingested:
    started = time.monotonic()
    reply, _ = request(ingest.address, {"kind": "ready", "round": ingest.round, "rank": rank}, wait_s=ingest.wait_s,
                       tls=tls)
    if reply.get("status") != "ok":
        raise PeerError(f"ingest round {ingest.round} failed: {reply.get('reason', 'no answer')}")
    return Ingested(ingest.round, _rows(reply), 0, None, time.monotonic() - started)


def _rows(reply: dict[str, Any]) -> list[int]:
    rows = reply.get("rows")
    if not isinstance(rows, list) or not rows or not all(isinstance(r, int) and r > 0 for r in rows):
        raise PeerError("the aggregator sent an unusable row layout")
    return rows


def public_description(ingested: Ingested) -> dict[str, Any]:
    """What every party must agree on before the shares are used (compared by digest)."""
    return {"round": ingested.round, "rows": ingested.rows}


def shared_inputs(session: Any, ingested: Ingested, n_items: int, rating_range: tuple[float, float]) -> tuple[Any, Any, Any, Any]:
    """Shares of (train ratings, train mask, test ratings, test mask), users in placement order."""
    import torch

    from mpc_rec.paillier.party import agree_on_shares, shares_to_mpc

    share = ingested.share
    # Ranks without a role learn the vector length from the aggregator; the agreement
    # below then checks that both roles hold shares of that length, round and set.
    lengths = session.comm.all_gather(torch.tensor([ingested.length], dtype=torch.long))
    agree_on_shares(session.comm, share, failed=False, round_id=ingested.round,
                    length=int(lengths[AGGREGATOR][0]), roles=(KEY_HOLDER, AGGREGATOR))
    total = sum(ingested.rows)
    local = None if share is None else joint_codes(share.values, ingested.rows, n_items, ingested.spec)
    codes = shares_to_mpc(local, length=total * n_items, precision=0).reshape(total, n_items)
    return decode_in_mpc(codes, rating_range)
