"""Cold start: noisy per-cohort popularity, computed in MPC, for users with no history.

Each compute party counts, for its own users, the items each user liked (rated at or
above ``like``), at most ``max_items`` per user (the user's highest-rated, then by
catalogue order), into a cohorts x items matrix; cohorts are a coarse public attribute
(an age band, a sign-up month). The parties secret-share their matrices, sum them on
shares, each adds its own discrete Gaussian noise (OS CSPRNG, mpc_rec.dp.noise) to its
share of the sum, and only the noised sum is opened, to all. No party sees another's
counts; no un-noised aggregate is opened.

Privacy: one user's contribution is a 0/1 vector with at most m ones in one cohort's
row; replacing the user (who may also change cohort) changes the matrix by at most
sqrt(2m) in L2. The release is one distributed discrete Gaussian with that
sensitivity, accounted by mpc_rec.dp.accounting's ``rdp`` accountant (KLS bound, the
noise of ``trusted_parties`` honest parties alone) and booked in every party's budget
ledger before its data is read.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mpc_rec.data import Ratings
from mpc_rec.dp.accounting import FRAC_BITS, MECHANISM, Release, create_accountant
from mpc_rec.dp.sampling import representable_variance
from mpc_rec.errors import ConfigError, DataError, InputError
from mpc_rec.files import write_bytes_atomic

ACCOUNTANT = "rdp"


@dataclass(frozen=True)
class CohortPlan:
    """The noise of one cohort-popularity release and what it costs. Record it with the release."""

    target_epsilon: float
    epsilon: float
    delta: float
    max_items: int
    cohorts: int
    items: int
    parties: int
    trusted_parties: int
    party_variance_units: int
    frac_bits: int = FRAC_BITS
    accountant: str = ACCOUNTANT
    mechanism: str = MECHANISM
    neighbouring: str = "replace"

    # what mpc_rec.dp.reveal.noised and mpc_rec.dp.noise.party_noise read: one release, as a "step"
    steps = 1
    mean_releases = 0

    @property
    def mean_party_variance_units(self) -> int:
        return self.party_variance_units

    @property
    def sensitivity(self) -> float:
        return math.sqrt(2 * self.max_items)

    @property
    def sigma_party(self) -> float:
        return math.sqrt(self.party_variance_units) * 2.0**-self.frac_bits

    @property
    def sigma_total(self) -> float:
        """Std of the honest parties' summed noise per count (with all parties honest: more)."""
        return math.sqrt(self.trusted_parties * self.party_variance_units) * 2.0**-self.frac_bits

    def release(self) -> Release:
        return release_for(self.sensitivity, self.party_variance_units, self.trusted_parties,
                           self.cohorts * self.items, self.frac_bits)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["derived"] = {"sensitivity": self.sensitivity, "sigma_party": self.sigma_party,
                          "sigma_total": self.sigma_total}
        return out

    def digest(self) -> str:
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()


def release_for(sensitivity: float, party_variance_units: float, trusted: int, dimension: int, frac_bits: int) -> Release:
    return Release("cohort-popularity", sensitivity * 2.0**frac_bits, party_variance_units, trusted, dimension, 1)


def calibrate_cohort_plan(*, epsilon: float, delta: float, max_items: int, cohorts: int, items: int, parties: int,
                          trusted_parties: int = 1, rel_tolerance: float = 1e-4) -> CohortPlan:
    """The smallest noise (to ``rel_tolerance``) whose release meets (epsilon, delta)."""
    if not (math.isfinite(epsilon) and epsilon > 0 and 0 < delta < 1):
        raise ConfigError(f"need epsilon > 0 and 0 < delta < 1, got {epsilon}, {delta}")
    if max_items < 1 or cohorts < 1 or items < 1:
        raise ConfigError("max_items, cohorts and items must be at least 1")
    if not 1 <= trusted_parties <= parties:
        raise ConfigError(f"trusted_parties must be in 1..{parties}, got {trusted_parties}")
    accountant = create_accountant(ACCOUNTANT)
    sensitivity_units = math.sqrt(2 * max_items) * 2.0**FRAC_BITS

    def variance(multiplier: float) -> Fraction:
        return Fraction((multiplier * sensitivity_units) ** 2) / trusted_parties

    def eps(party_variance: float) -> float:
        release = release_for(math.sqrt(2 * max_items), party_variance, trusted_parties, cohorts * items, FRAC_BITS)
        return accountant.epsilon([release], delta=delta)

    lo, hi = 1e-3, 1.0
    while eps(float(variance(hi))) > epsilon:
        lo, hi = hi, hi * 2
        if hi > 1e6:
            raise ConfigError(f"no noise level reaches epsilon {epsilon} at delta {delta}")
    while hi / lo - 1 > rel_tolerance:
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if eps(float(variance(mid))) <= epsilon else (mid, hi)
    party_variance = representable_variance(variance(hi))  # rounded up: only adds noise
    achieved = eps(float(party_variance))
    return CohortPlan(epsilon, achieved, delta, max_items, cohorts, items, parties, trusted_parties, int(party_variance))


def bounded_counts(ratings: Ratings, cohort_of: dict[str, str], cohorts: list[str], catalogue: list[str], *,
                   max_items: int, like: float) -> np.ndarray:
    """This party's cohorts x items counts, each user contributing at most ``max_items`` ones."""
    item_index = {item: k for k, item in enumerate(catalogue)}
    cohort_index = {cohort: k for k, cohort in enumerate(cohorts)}
    counts = np.zeros((len(cohorts), len(catalogue)))
    per_user: dict[str, list[tuple[float, int]]] = {}
    for user, item, value in zip(ratings.users, ratings.items, ratings.values):
        if value >= like and item in item_index:
            per_user.setdefault(user, []).append((-float(value), item_index[item]))
    for user, liked in per_user.items():
        if user not in cohort_of:
            raise DataError(f"user {user!r} has no cohort (every user needs one in the cohorts file)")
        if cohort_of[user] not in cohort_index:
            raise DataError(f"user {user!r}: cohort {cohort_of[user]!r} is not one of the public cohorts")
        chosen = [item for _, item in sorted(liked)[:max_items]]
        counts[cohort_index[cohort_of[user]], chosen] += 1.0
    return counts


def cohort_party(session: Any, ratings: Ratings, cohort_of: dict[str, str], public: dict[str, Any],
                 plan: CohortPlan, ledger: dict[str, Any]) -> dict[str, Any]:
    """One compute party's part: book the budget, count its own users, share, sum, noise, open."""
    from mpc_rec.dp.ledger import check_and_reserve, create_ledger
    from mpc_rec.dp.reveal import RevealLog, noised
    from mpc_rec.mpc.privacy import add_own_noise
    from mpc_rec.mpc.reveal import log_entries, open_to_all
    from mpc_rec.mpc.sharing import agree, share_rows

    path = Path(ledger["path"])
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        create_ledger(path, total_epsilon=ledger["budget_epsilon"], total_delta=ledger["budget_delta"])
    check_and_reserve(path, dataset=ledger["dataset"], epsilon=plan.epsilon, delta=plan.delta, run_id=ledger["run_id"],
                      mechanism=f"{plan.mechanism}/{plan.accountant} cohort popularity", timestamp=ledger["timestamp"])
    started = time.perf_counter()
    counts = bounded_counts(ratings, cohort_of, public["cohorts"], public["catalogue"],
                            max_items=public["max_items"], like=public["like"])
    rank = session.endpoint.rank
    world = session.endpoint.world_size
    agree(session.comm, 0, {**public, "plan": plan.digest()})
    # Each party's whole matrix is one "row block": the others learn only its (public) shape.
    blocks = share_rows(torch.as_tensor(counts[None], dtype=torch.float64), [1] * world, rank)
    total = blocks.sum(0)
    noisy = add_own_noise(total, plan, "step")  # every party's noise on its own share of the sum
    log = RevealLog(plan_digest=plan.digest())
    tagged = noised(noisy, plan=plan, release="step", index=0, aggregate="per-cohort item popularity")
    opened = open_to_all(tagged, name="noisy cohort popularity", log=log).numpy().astype(np.float64)
    return {"counts": opened, "reveals": log_entries(log), "seconds": time.perf_counter() - started,
            "traffic": session.traffic()}


@dataclass(frozen=True, eq=False)
class Popularity:
    cohorts: list[str]
    item_ids: list[str]
    counts: np.ndarray  # noised, cohorts x items
    privacy: dict[str, Any]


def write_popularity_atomic(path, popularity: Popularity) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, cohorts=np.asarray(popularity.cohorts, dtype=str), item_ids=np.asarray(popularity.item_ids, dtype=str),
             counts=popularity.counts, privacy=np.asarray(json.dumps(popularity.privacy, sort_keys=True)))
    write_bytes_atomic(path, buffer.getvalue())


def load_popularity(path) -> Popularity:
    name = os.fspath(path)
    try:
        with np.load(name, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in ("cohorts", "item_ids", "counts", "privacy")}
        privacy = json.loads(str(arrays["privacy"]))
    except (OSError, ValueError, EOFError, KeyError) as exc:
        raise DataError(f"{name}: not a readable cohort popularity release ({exc})") from None
    counts = arrays["counts"]
    if (counts.ndim != 2 or counts.shape != (len(arrays["cohorts"]), len(arrays["item_ids"]))
            or counts.dtype.kind != "f" or not np.all(np.isfinite(counts)) or not isinstance(privacy, dict)):
        raise DataError(f"{name}: inconsistent cohort popularity release")
    return Popularity([str(c) for c in arrays["cohorts"]], [str(i) for i in arrays["item_ids"]], counts, privacy)


# Post-processing of the release (free under DP): each cohort's noisy counts plus SHRINK
# times the average cohort's. Noise is independent across cohorts, so the average is
# G times less noisy; on ML-100K (scripts/bench_serving.py) equal weight beat both the
# cohort alone and the global counts alone at epsilon 1 and 4.
SHRINK = 1.0


def cohort_scores(popularity: Popularity, cohort: str, shrink: float = SHRINK) -> np.ndarray:
    if cohort not in popularity.cohorts:
        raise InputError(f"cohort {cohort!r} is not in the popularity release (cohorts: {', '.join(popularity.cohorts)})")
    return popularity.counts[popularity.cohorts.index(cohort)] + shrink * popularity.counts.mean(axis=0)


def recommend_for_cohort(popularity: Popularity, cohort: str, k: int, hidden: set[str]) -> list[str]:
    row = cohort_scores(popularity, cohort)
    order = np.lexsort((np.arange(len(row)), -row))  # by noisy count, ties by catalogue order
    return [popularity.item_ids[i] for i in order if popularity.item_ids[i] not in hidden][:k]


def build_popularity(blocks: list[Ratings], cohort_of: dict[str, str], catalogue: list[str], *, epsilon: float,
                     delta: float, max_items: int, like: float, trusted_parties: int, ledger_dir: Path, dataset: str,
                     budget_epsilon: float = 50.0, timeout_s: float = 120.0) -> tuple[Popularity, dict[str, Any]]:
    """Run the protocol with one local process per party (``blocks[r]``: party r's users only)."""
    from mpc_rec.serving.processes import run_session

    cohorts = sorted(set(cohort_of.values()))
    plan = calibrate_cohort_plan(epsilon=epsilon, delta=delta, max_items=max_items, cohorts=len(cohorts),
                                 items=len(catalogue), parties=len(blocks), trusted_parties=trusted_parties)
    public = {"cohorts": cohorts, "catalogue": catalogue, "max_items": max_items, "like": like}
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    run_id = f"cohort-popularity-{hashlib.sha256(os.urandom(16)).hexdigest()[:12]}"
    args = []
    for rank, block in enumerate(blocks):
        own = {u: cohort_of[u] for u in set(block.users) if u in cohort_of}
        ledger = {"path": str(ledger_dir / f"party-{rank}.json"), "dataset": dataset, "run_id": run_id,
                  "timestamp": stamp, "budget_epsilon": budget_epsilon, "budget_delta": 1e-4}
        args.append((block, own, public, plan, ledger))
    results = run_session(cohort_party, args, timeout_s=timeout_s)
    privacy = {"plan": plan.to_dict(), "epsilon": plan.epsilon, "delta": plan.delta,
               "neighbouring": "user-level (all of one user's ratings and cohort), replace-one",
               "contribution": f"at most {max_items} liked items (rating >= {like:g}) per user",
               "trust": f"the noise of {trusted_parties} honest part{'y' if trusted_parties == 1 else 'ies'} alone "
                        "carries the guarantee", "ledger_dataset": dataset, "run_id": run_id}
    record = {"seconds": max(r["seconds"] for r in results), "reveals": results[0]["reveals"],
              "bytes_per_party": [r["traffic"]["bytes"] for r in results]}
    return Popularity(cohorts, list(catalogue), results[0]["counts"], privacy), record


__all__ = ["CohortPlan", "Popularity", "bounded_counts", "build_popularity", "calibrate_cohort_plan",
           "load_popularity", "recommend_for_cohort", "write_popularity_atomic"]


def build_from_files(data: Path, cohorts_path: Path, out: Path, *, parties: int, epsilon: float, delta: float,
                     max_items: int, like: float, trusted_parties: int, ledger_dir: Path, seed: int = 0) -> str:
    """``mpc-rec cold-start``: deal the users of ``data`` to local parties and publish the release at ``out``."""
    from mpc_rec.data import load_ratings, partition_users, sort_ids
    from mpc_rec.serving.local import read_cohorts

    out = Path(out)
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir() or not os.access(folder, os.W_OK):  # before any budget is spent on a release
        raise InputError(f"{out}: cannot write the release there (no such folder, or not writable)")
    ratings = load_ratings(data)
    cohorts_path = Path(cohorts_path)
    if not cohorts_path.exists():
        raise DataError(f"{cohorts_path}: cohorts file not found")
    cohort_of = read_cohorts(cohorts_path)
    missing = sorted(set(ratings.users) - set(cohort_of))
    if missing:
        raise DataError(f"{cohorts_path}: user {missing[0]!r} has no cohort ({len(missing)} users lack one)")
    dataset = hashlib.sha256(Path(data).read_bytes()).hexdigest()
    popularity, record = build_popularity(
        partition_users(ratings, parties, seed=seed), cohort_of, sort_ids(set(ratings.items)), epsilon=epsilon,
        delta=delta, max_items=max_items, like=like, trusted_parties=trusted_parties, ledger_dir=Path(ledger_dir),
        dataset=dataset)
    write_popularity_atomic(out, popularity)
    plan = popularity.privacy["plan"]
    return (f"cohort popularity: {len(popularity.cohorts)} cohorts x {len(popularity.item_ids)} items -> {out}; "
            f"epsilon {plan['epsilon']:.4g}, delta {plan['delta']:g}, noise sigma {plan['derived']['sigma_total']:.3g} "
            f"per count ({trusted_parties} honest part{'y' if trusted_parties == 1 else 'ies'}); booked in {ledger_dir}; "
            f"MPC {record['seconds']:.2f} s")
