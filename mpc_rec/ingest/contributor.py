"""One data holder (``mpc-rec contributor --config FILE``): encrypt its rows, submit once.

The contributor reads only its own ratings (train and held-out), the public catalogue
and the key holder's public key, whose fingerprint it learnt out of band. It codes its
rows (mpc_rec/ingest/codes.py), packs and encrypts them (all its cores unless told
otherwise) and sends one Contribution for the round. If its own data cannot be sent, or
the aggregator refuses the message, it withdraws so the round need not wait for it.

``[simulate] fault`` makes a simulated contributor misbehave on purpose (tests, demos):
drop (send nothing), replay (send twice), wrong-key, malformed, oversized, nan.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mpc_rec.config import read_toml_with_schema
from mpc_rec.data import dense_matrices, load_ratings, read_catalogue, sort_ids
from mpc_rec.errors import ConfigError, InputError, PeerError
from mpc_rec.ingest.codes import IngestSpec, contributor_vector, encode_rows
from mpc_rec.ingest.transport import ChannelTls, aggregator_client_tls, request
from mpc_rec.paillier.contributor import make_contribution
from mpc_rec.paillier.errors import RejectedContribution
from mpc_rec.paillier.keys import generate_keypair, load_public_key

FAULTS = ("drop", "replay", "wrong-key", "malformed", "oversized", "nan")
_SCHEMA = {
    "contributor": {"id": str, "round": int, "workers": int},
    "data": {"train": str, "test": str, "catalogue": str, "rating_min": (int, float), "rating_max": (int, float)},
    "aggregator": {"address": str, "wait_s": (int, float), "ca": str, "name": str},
    "key": {"public_key": str, "fingerprint": str, "stat_bits": int},
    "simulate": {"fault": str},
}


@dataclass(frozen=True)
class ContributorConfig:
    id: str
    round: int
    train: Path
    test: Path | None
    catalogue: Path
    rating_range: tuple[float, float]
    address: str
    wait_s: float
    public_key: Path
    fingerprint: str
    stat_bits: int = 40
    workers: int | None = None
    fault: str | None = None
    tls: ChannelTls | None = None  # [aggregator] ca and name: the channel runs over TLS (pilot CA)


def load_contributor_config(path: str | os.PathLike[str]) -> ContributorConfig:
    path = Path(path)
    raw = read_toml_with_schema(path, _SCHEMA, [("contributor", "id"), ("data", "train"), ("data", "catalogue"),
                                                  ("aggregator", "address"), ("key", "public_key"), ("key", "fingerprint")])
    get = lambda table, key, default=None: raw.get(table, {}).get(key, default)  # noqa: E731
    fault = get("simulate", "fault")
    if fault is not None and fault not in FAULTS:
        raise ConfigError(f"{path}: simulate.fault must be one of {', '.join(FAULTS)}, got '{fault}'")
    resolve = lambda value: None if value is None else (path.parent / value).resolve()  # noqa: E731
    if (get("aggregator", "ca") is None) != (get("aggregator", "name") is None):
        raise ConfigError(f"{path}: aggregator.ca and aggregator.name go together (TLS to the aggregator)")
    tls = None if get("aggregator", "ca") is None else aggregator_client_tls(resolve(get("aggregator", "ca")),
                                                                             get("aggregator", "name"), path)
    return ContributorConfig(
        id=get("contributor", "id"), round=get("contributor", "round", 0), train=resolve(get("data", "train")),
        test=resolve(get("data", "test")), catalogue=resolve(get("data", "catalogue")),
        rating_range=(float(get("data", "rating_min", 1.0)), float(get("data", "rating_max", 5.0))),
        address=get("aggregator", "address"), wait_s=float(get("aggregator", "wait_s", 600.0)),
        public_key=resolve(get("key", "public_key")), fingerprint=get("key", "fingerprint"),
        stat_bits=get("key", "stat_bits", 40), workers=get("contributor", "workers"), fault=fault, tls=tls,
    )


def run_contributor(config: ContributorConfig) -> dict[str, Any]:
    """Encrypt and submit; returns {"contributor", "status", "ciphertexts", "bytes"}."""
    if config.fault == "drop":
        return {"contributor": config.id, "status": "dropped (simulated): nothing sent"}
    started = time.perf_counter()
    try:
        message = _contribution(config)
    except InputError as exc:
        _withdraw(config, str(exc))
        raise
    encrypt_s = time.perf_counter() - started
    body = message.to_bytes()
    if config.fault == "malformed":
        body = body.replace(b'"ciphertexts":["', b'"ciphertexts":["zz', 1)
    reply, _ = request(config.address, {"kind": "contribution"}, body, wait_s=config.wait_s, tls=config.tls)
    if reply.get("status") != "accepted":
        reason = str(reply.get("reason", "no reason given"))
        _withdraw(config, f"refused by the aggregator: {reason}")
        raise RejectedContribution(config.id, reason)
    result = {"contributor": config.id, "status": "accepted", "ciphertexts": len(message.ciphertexts),
              "bytes": len(body), "encrypt_s": encrypt_s}
    if config.fault == "replay":
        again, _ = request(config.address, {"kind": "contribution"}, body, wait_s=config.wait_s, tls=config.tls)
        result["replay"] = again.get("reason", again.get("status"))
    return result


def _contribution(config: ContributorConfig) -> Any:
    catalogue = read_catalogue(config.catalogue)
    train = load_ratings(config.train, rating_range=config.rating_range)
    test = load_ratings(config.test, rating_range=config.rating_range) if config.test else None
    users = sort_ids(list(train.users) + (list(test.users) if test is not None else []))
    ratings, mask = dense_matrices(train, users, catalogue)
    if config.fault == "nan":
        ratings[mask > 0] = np.nan  # a corrupted local export
    if test is not None:
        test_ratings, test_mask = dense_matrices(test, users, catalogue)
    else:
        test_ratings, test_mask = np.zeros_like(ratings), np.zeros_like(mask)
    codes = encode_rows((ratings, mask), (test_ratings, test_mask), config.rating_range)
    public_key = load_public_key(config.public_key)
    expected = config.fingerprint
    if config.fault == "wrong-key":  # a contributor handed some other key
        public_key, _ = generate_keypair(public_key.bits, allow_insecure_size=public_key.insecure)
        expected = None
    spec = IngestSpec.for_ratings(config.rating_range, key_bits=public_key.bits, stat_bits=config.stat_bits)
    vector = contributor_vector(codes, spec)
    if config.fault == "oversized":
        vector = np.concatenate([vector, np.zeros(spec.slots_per_ciphertext, dtype=np.int64)])
    return make_contribution(public_key, spec, config.id, config.round, vector.astype(np.float64),
                             expected_fingerprint=expected, workers=config.workers)


def _withdraw(config: ContributorConfig, reason: str) -> None:
    """Tell the aggregator not to wait for this contributor (best effort)."""
    try:
        request(config.address, {"kind": "withdraw", "contributor": config.id, "round": config.round,
                                 "reason": reason}, wait_s=min(config.wait_s, 30.0), tls=config.tls)
    except PeerError:
        pass  # the round still closes at its deadline
