"""One data holder of the federated mode (``mpc-rec holder --config FILE``).

The holder reads its users' ratings from its own files and keeps everything about them
in its own folder (``dir``): user factors and biases (``users.npz``, across rounds), the
users' controls (``controls.json``, read before every round), its copy of the release it
last used (``items.npz``) and its run record (``holder.json``). Per round it waits for the
compute parties' release of that round, updates its users against it, and sends ONE
message: its clipped, summed item-side update, packed and Paillier-encrypted under the
key holder's key, to the aggregator. After the final release it sends one more, the same
way: its users' clipped test figures, summed (``federated/evaluation.py``). Nothing else
leaves the process, and no metric is written anywhere (protocols/federated.md).

``users.npz`` (rewritten every round, forgotten users left out): ``user_ids`` (str),
``factors`` (users x K float64), ``biases`` (users), ``round`` (the release they were
fitted to). With ``items.npz`` (``mpc_rec.holder.load_release``) it is everything the
holder needs to serve its users locally.
"""

from __future__ import annotations

import io
import json
import os
import resource
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from mpc_rec.data import Ratings, load_ratings
from mpc_rec.errors import DataError, PeerError
from mpc_rec.federated.config import HolderConfig
from mpc_rec.federated.evaluation import evaluation_length, evaluation_spec, evaluation_vector
from mpc_rec.federated.model import LocalRatings, UserMetrics, item_contribution, user_metrics, user_step
from mpc_rec.files import write_bytes_atomic, write_text_atomic
from mpc_rec.holder import Controls, ItemRelease, load_controls, load_release, write_release_atomic
from mpc_rec.ingest.transport import request
from mpc_rec.paillier.contributor import make_contribution
from mpc_rec.paillier.keys import load_public_key
from mpc_rec.paillier.packing import PackingSpec

POLL_S = 0.05


def peak_memory_mb() -> float:
    """This process's peak resident memory since it started (exec), in MiB.

    ``ru_maxrss`` survives exec on Linux, so a process started by a large launcher would
    report the launcher's peak; the kernel's VmHWM belongs to the new address space.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def packing_spec(key_bits: int, *, clip: float, max_users: int, max_holders: int) -> PackingSpec:
    """The round's packing: every coordinate of a holder's sum is at most max_users * C."""
    return PackingSpec.for_range(max_users * clip, key_bits=key_bits, max_contributors=max_holders)


@dataclass
class _Users:
    ids: np.ndarray  # str, sorted
    train: Ratings  # string ids, as loaded
    test: Ratings | None
    train_index: LocalRatings | None = None
    test_index: LocalRatings | None = None


def _load(config: HolderConfig) -> _Users:
    train = load_ratings(config.train, rating_range=config.rating_range)
    test = load_ratings(config.test, rating_range=config.rating_range) if config.test else None
    ids = np.unique(np.concatenate([train.users, test.users]) if test is not None else train.users).astype(str)
    if len(ids) > config.max_users:
        raise DataError(f"{config.train}: {len(ids)} users, more than the run's public bound of {config.max_users} per holder")
    return _Users(ids, train, test)


def _indexed(ratings: Ratings, user_ids: np.ndarray, catalogue: np.ndarray, order: np.ndarray, name: str) -> LocalRatings:
    """Vectorised id -> index mapping (no per-rating Python)."""
    users = np.searchsorted(user_ids, ratings.users.astype(str))
    items_text = ratings.items.astype(str)
    found = np.searchsorted(catalogue, items_text, sorter=order)
    found = np.minimum(found, len(catalogue) - 1)
    unknown = catalogue[order[found]] != items_text
    if unknown.any():
        raise DataError(f"{name}: item {items_text[np.flatnonzero(unknown)[0]]!r} is not in the released catalogue")
    return LocalRatings(users.astype(np.int64), order[found].astype(np.int64), ratings.values, len(user_ids))


def _kept(ratings: Ratings, controls: Controls) -> np.ndarray:
    """Positions of the ratings the controls keep, by ``Controls.apply`` itself."""
    positions = Ratings(ratings.users, ratings.items, np.arange(len(ratings), dtype=np.float64))
    return controls.apply(positions).values.astype(np.int64)


def wait_for_release(config: HolderConfig, round_id: int) -> ItemRelease:
    """The release that opens round ``round_id`` of this run (published atomically by party 0)."""
    end = time.monotonic() + config.wait_s
    while True:
        if config.release.exists():
            release = load_release(config.release)
            if release.privacy.get("run_id") == config.run_id and release.privacy.get("round") == round_id:
                return release
        if time.monotonic() > end:
            raise PeerError(f"holder {config.id}: no release for round {round_id} within {config.wait_s:.0f} s")
        time.sleep(POLL_S)


def _save_users(config: HolderConfig, users: _Users, forgotten: frozenset[str], factors: np.ndarray,
                biases: np.ndarray, round_id: int) -> None:
    keep = ~np.isin(users.ids, list(forgotten)) if forgotten else np.ones(len(users.ids), dtype=bool)
    buffer = io.BytesIO()
    np.savez(buffer, user_ids=users.ids[keep], factors=factors[keep], biases=biases[keep], round=np.int64(round_id))
    write_bytes_atomic(config.dir / "users.npz", buffer.getvalue())


def run_holder(config: HolderConfig) -> dict[str, Any]:
    config.dir.mkdir(parents=True, exist_ok=True)
    public_key = load_public_key(config.public_key, expected_fingerprint=config.fingerprint)
    spec = packing_spec(public_key.bits, clip=config.clip, max_users=config.max_users, max_holders=config.max_holders)
    load_controls(config.dir / "controls.json")  # a malformed file fails now, not after the first release
    users = _load(config)
    record: dict[str, Any] = {"holder": config.id, "users": int(len(users.ids)), "train_ratings": len(users.train),
                              "rounds": []}
    catalogue = order = None
    for round_id in range(config.rounds + 1):
        release = wait_for_release(config, round_id)
        started = time.perf_counter()
        write_release_atomic(config.dir / "items.npz", release)  # what this holder's users are served from
        if catalogue is None:
            catalogue = np.asarray(release.item_ids, dtype=str)
            order = np.argsort(catalogue)
            users.train_index = _indexed(users.train, users.ids, catalogue, order, str(config.train))
            if users.test is not None:
                users.test_index = _indexed(users.test, users.ids, catalogue, order, str(config.test))
        controls = load_controls(config.dir / "controls.json")  # the users' wishes, as of this round
        train = users.train_index.subset(_kept(users.train, controls))
        user_factors, user_biases = user_step(train, release.factors, release.biases, release.mean, config.regularization)
        _save_users(config, users, controls.forget, user_factors, user_biases, round_id)
        if round_id == config.rounds:  # the final release: the evaluation round, sent like a training round
            metrics = _user_metrics(config, users, controls, train, user_factors, user_biases, release)
            values = evaluation_vector(metrics, kind=config.evaluation, clip_eval=config.clip_eval)
            computed = time.perf_counter()
            message = make_contribution(public_key, evaluation_spec(public_key.bits, max_holders=config.max_holders),
                                        config.id, round_id, values, expected_fingerprint=config.fingerprint,
                                        expected_length=evaluation_length(config.evaluation))
            encrypted = time.perf_counter()
            record["evaluation"] = {"round": round_id, "compute_s": computed - started,
                                    "encrypt_s": encrypted - computed, "ciphertexts": len(message.ciphertexts),
                                    "bytes_sent": _send(config, round_id, message.to_bytes())}
            break
        contribution = item_contribution(train, user_factors, user_biases, release.factors, release.biases,
                                         release.mean, config.clip)
        computed = time.perf_counter()
        message = make_contribution(public_key, spec, config.id, round_id, contribution.values(),
                                    expected_fingerprint=config.fingerprint,
                                    expected_length=contribution.units.size, workers=config.workers)
        encrypted = time.perf_counter()
        bytes_sent = _send(config, round_id, message.to_bytes())
        record["rounds"].append({
            "round": round_id, "compute_s": computed - started, "encrypt_s": encrypted - computed,
            "seconds": time.perf_counter() - started, "ciphertexts": len(message.ciphertexts),
            "bytes_sent": bytes_sent, "clipped_users": int((contribution.scales < 1).sum()),
        })
    record["peak_memory_mb"] = peak_memory_mb()
    write_text_atomic(config.dir / "holder.json", json.dumps(record, indent=1) + "\n")
    return record


def _send(config: HolderConfig, round_id: int, body: bytes) -> int:
    """Send one contribution to the aggregator; the bytes sent, or PeerError if it was refused."""
    if config.fault == "garbage":
        body = b"GARBAGE " + os.urandom(64).hex().encode()
    header = {"kind": "contribution", "round": round_id}
    reply, _ = request(config.aggregator, header, body, wait_s=config.wait_s, tls=config.tls)
    if reply.get("status") != "accepted":
        raise PeerError(f"holder {config.id}: the aggregator refused its round-{round_id} "
                        f"{'evaluation' if round_id == config.rounds else 'update'}: "
                        f"{reply.get('reason', 'no reason given')}")
    # both frames with their 8-byte length prefixes, as ingest.transport sends them (TLS adds its records')
    return 16 + len(json.dumps({**header, "body": True}).encode()) + len(body)


def _user_metrics(config: HolderConfig, users: _Users, controls: Controls, train: LocalRatings,
                  user_factors: np.ndarray, user_biases: np.ndarray, release: ItemRelease) -> UserMetrics:
    """Each own user's test figures (forgotten users and excluded items left out; no test split: none)."""
    if users.test_index is None:
        empty = np.zeros(0, dtype=np.int64)
        test = LocalRatings(empty, empty, np.zeros(0), len(users.ids))
    else:
        test = users.test_index.subset(_kept(users.test, controls))
    hidden = None
    if controls.exclude:  # a loop over the controls, not over ratings
        position = {user: index for index, user in enumerate(users.ids.tolist())}
        catalogue = {item: index for index, item in enumerate(release.item_ids)}
        pairs = [(position[user], catalogue[item]) for user, items in controls.exclude.items() if user in position
                 for item in items if item in catalogue]
        if pairs:
            rows, cols = np.array(pairs, dtype=np.int64).T
            hidden = LocalRatings(rows, cols, np.zeros(len(rows)), len(users.ids))
    return user_metrics(train, test, user_factors, user_biases, release.factors, release.biases, release.mean,
                        top_k=config.top_k, rating_range=config.rating_range, hidden=hidden)
