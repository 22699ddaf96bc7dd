"""Release policy for the recommendation list shown to each user (holder side).

MPC reveals each user's ranked top-k to the party that holds the user (mpc.reveal);
what that party then shows the user can itself give the user's preferences away to
whoever sees the list. Two policies:

- ``exact``: the ranked top-k as scored.
- ``threshold``: the coarse-grained threshold policy of Fu, Chen, Gao and Li
  ("Privacy-Preserving Personalized Recommender Systems", SSRN 4202576, 2022;
  Manufacturing & Service Operations Management, doi:10.1287/msom.2023.0271),
  extended from one recommended item to a list of k (protocols/release.md). The items
  ranked 1..m (the priority set) are drawn with one probability, the others with a
  lower one, uniformly within each group, and one release is epsilon-DP with respect
  to the user's preference ranking over the items the user has not rated.

Mechanism: over all k-subsets S of the n candidate items, with c(S) = number of
priority items in S, P(S) is proportional to exp(epsilon) when c(S) >= c_min and to 1
otherwise. The normaliser depends on (n, m, k, c_min) only, never on which items the
ranking puts first, so two rankings give any S probabilities within a factor exp(epsilon).
m and c_min maximise a public, data-independent utility (the DCG position discount
1/log2(1 + rank)), so choosing them reveals nothing; larger epsilon gives smaller m.

Randomness: ``secrets.SystemRandom`` (the OS CSPRNG) in production; tests pass
``SeededRandom`` (AES-256-CTR keyed from a seed), never torch's or numpy's generators.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import random
import secrets
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from mpc_rec.errors import ConfigError, InputError
from mpc_rec.files import write_text_atomic

POLICIES = ("exact", "threshold")
LEDGER_FORMAT = "mpc-rec-release-ledger/1"


# --- the mechanism -------------------------------------------------------------------


def _log_binomial(n: int, r: int) -> float:
    if r < 0 or r > n:
        return -math.inf
    return math.lgamma(n + 1) - math.lgamma(r + 1) - math.lgamma(n - r + 1)


@dataclass(frozen=True)
class ThresholdPlan:
    """One user's calibrated threshold release: all public functions of (n, k, epsilon)."""

    candidates: int  # n: items the user has not rated
    size: int  # k: items released
    epsilon: float
    priority: int  # m: the top-m ranked items form the priority set
    min_priority: int  # c_min: subsets with at least this many priority items get weight e^eps
    count_probabilities: tuple[float, ...]  # P(c priority items in the release), c = 0..k

    @property
    def expected_priority(self) -> float:
        return math.fsum(c * p for c, p in enumerate(self.count_probabilities))

    def inclusion_probabilities(self) -> tuple[float, float]:
        """P(a given priority item is released), P(a given other item is released)."""
        expected = self.expected_priority
        rest = self.candidates - self.priority
        return expected / self.priority, (self.size - expected) / rest if rest else 0.0

    def utility(self, position_utility: Sequence[float]) -> float:
        high, low = self.inclusion_probabilities()
        top = math.fsum(position_utility[: self.priority])
        return high * top + low * (math.fsum(position_utility) - top)


def count_distribution(n: int, m: int, k: int, epsilon: float, c_min: int) -> tuple[float, ...]:
    """P(C = c) for c = 0..k: C(m, c) C(n-m, k-c) e^(eps [c >= c_min]) / Z, in log space."""
    logs = [_log_binomial(m, c) + _log_binomial(n - m, k - c) + (epsilon if c >= c_min else 0.0) for c in range(k + 1)]
    top = max(logs)
    weights = [math.exp(x - top) if x > -math.inf else 0.0 for x in logs]
    total = math.fsum(weights)
    return tuple(w / total for w in weights)


def position_utility(n: int) -> list[float]:
    """Public utility of showing the item of rank r: the DCG discount 1/log2(1 + r)."""
    return [1.0 / math.log2(1 + r) for r in range(1, n + 1)]


@lru_cache(maxsize=4096)
def threshold_plan(candidates: int, size: int, epsilon: float, max_priority: int) -> ThresholdPlan:
    """The (m, c_min) maximising expected public utility, m at most ``max_priority``.

    ``max_priority`` is how many ranked items the holder knows (the top-k MPC revealed):
    the priority set must be a set it can name.
    """
    if not (epsilon > 0 and math.isfinite(epsilon)):
        raise ConfigError(f"release epsilon must be a positive number, got {epsilon!r}")
    n, k = candidates, min(size, candidates)
    if k <= 0 or n <= k:  # nothing to choose: every candidate is released
        return ThresholdPlan(n, k, epsilon, max(n, 1), 0, tuple(1.0 if c == k else 0.0 for c in range(k + 1)))
    utility = position_utility(n)
    best = None
    for m in range(1, min(max_priority, n - 1) + 1):
        for c_min in range(1, min(k, m) + 1):
            plan = ThresholdPlan(n, k, epsilon, m, c_min, count_distribution(n, m, k, epsilon, c_min))
            value = plan.utility(utility)
            if best is None or value > best[0] + 1e-12:
                best = (value, plan)
    return best[1]


def draw_threshold(ranked: Sequence[Any], others: Sequence[Any], plan: ThresholdPlan, rng: random.Random) -> list[Any]:
    """One release: ``ranked`` best first (at least m items), ``others`` the rest, unordered.

    Returns k items in a random order (the order of the list must not carry the ranking).
    """
    pool_high = list(ranked[: plan.priority])
    pool_low = list(ranked[plan.priority:]) + list(others)
    if len(pool_high) + len(pool_low) != plan.candidates:
        raise ValueError("candidate count does not match the plan")
    if plan.size >= plan.candidates:
        chosen = pool_high + pool_low
    else:
        count = _draw_index(plan.count_probabilities, rng)
        chosen = rng.sample(pool_high, count) + rng.sample(pool_low, plan.size - count)
    rng.shuffle(chosen)
    return chosen


def _draw_index(probabilities: Sequence[float], rng: random.Random) -> int:
    # 53-bit uniform from the CSPRNG; the tiny float rounding of the CDF is far below
    # anything the epsilon bound is sensitive to.
    u = rng.random()
    cumulative = 0.0
    for index, p in enumerate(probabilities):
        cumulative += p
        if u < cumulative:
            return index
    return max(i for i, p in enumerate(probabilities) if p > 0)


class SeededRandom(random.Random):
    """AES-256-CTR keystream behind ``random.Random``'s interface: reproducible, for tests.

    Production draws use ``secrets.SystemRandom()``; this exists so statistical tests can
    fix a seed without falling back to Mersenne Twister.
    """

    def __init__(self, seed: bytes | str | int) -> None:
        import hashlib

        material = seed if isinstance(seed, bytes) else str(seed).encode()
        key = hashlib.sha256(b"mpc-rec release test stream|" + material).digest()
        self._stream = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
        super().__init__()

    def seed(self, *args: Any, **kwargs: Any) -> None:  # state is the keystream only
        return None

    def getrandbits(self, k: int) -> int:
        if k <= 0:
            return 0
        raw = int.from_bytes(self._stream.update(bytes((k + 7) // 8)), "big")
        return raw >> ((k + 7) // 8 * 8 - k)

    def random(self) -> float:
        return self.getrandbits(53) / (1 << 53)

    def getstate(self) -> Any:
        raise NotImplementedError("SeededRandom has no state to save")

    def setstate(self, state: Any) -> None:
        raise NotImplementedError("SeededRandom has no state to restore")


def system_random() -> random.Random:
    return secrets.SystemRandom()


# --- configuration -------------------------------------------------------------------


@dataclass(frozen=True)
class ReleaseConfig:
    """A party's release settings (the [release] section of its configuration)."""

    policy: str = "exact"
    epsilon: float | None = None  # per release, threshold only
    budget: float = 10.0  # per user, over all threshold releases
    ledger: Path | None = None
    users: Path | None = None  # per-user overrides: user,epsilon (stronger levels only)
    run_id: str = "unnamed-run"
    timestamp: str = "1970-01-01T00:00:00Z"

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ConfigError(f"release.policy must be one of {', '.join(POLICIES)}, got '{self.policy}'")
        if self.policy == "threshold" and (self.epsilon is None or not self.epsilon > 0 or not math.isfinite(self.epsilon)):
            raise ConfigError("release.epsilon must be a positive number for the threshold policy")
        if not (self.budget > 0 and math.isfinite(self.budget)):
            raise ConfigError(f"release.budget must be a positive number, got {self.budget!r}")
        if (self.policy == "threshold" or self.users is not None) and self.ledger is None:
            raise ConfigError("release.ledger is required when any user gets the threshold policy")

    def default_epsilon(self) -> float:
        return default_epsilon(self.policy, self.epsilon)


def default_epsilon(policy: str, epsilon: float | None) -> float:
    """Per-release epsilon of a run's default policy; exact counts as unbounded."""
    return epsilon if policy == "threshold" else math.inf


def read_user_levels(path: Path, default_epsilon: float, known_users: set[str] | None = None) -> dict[str, float]:
    """``user,epsilon`` lines; each epsilon must be at most the run's (a stronger level)."""
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.reader(handle))
    except FileNotFoundError:
        raise InputError(f"{path}: per-user release file not found") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"{path}: cannot read per-user release file ({exc})") from None
    if not rows or [c.strip() for c in rows[0]] != ["user", "epsilon"]:
        raise InputError(f"{path}: line 1: expected the header 'user,epsilon'")
    levels: dict[str, float] = {}
    for line, row in enumerate(rows[1:], start=2):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != 2:
            raise InputError(f"{path}: line {line}: expected 2 fields (user,epsilon), got {len(row)}")
        user, text = row[0].strip(), row[1].strip()
        try:
            epsilon = float(text)
        except ValueError:
            raise InputError(f"{path}: line {line}: epsilon '{text}' is not a number") from None
        if not (epsilon > 0 and math.isfinite(epsilon)):
            raise InputError(f"{path}: line {line}: epsilon must be positive and finite, got {text}")
        if epsilon > default_epsilon:
            raise InputError(f"{path}: line {line}: user '{user}' asks for epsilon {epsilon:g}, weaker than the "
                             f"run's {default_epsilon:g} (users may only choose a stronger level)")
        if user in levels:
            raise InputError(f"{path}: line {line}: user '{user}' appears twice")
        if known_users is not None and user not in known_users:
            raise InputError(f"{path}: line {line}: user '{user}' is not a user of this data")
        levels[user] = epsilon
    return levels


def check_user_levels(config: ReleaseConfig, users: Sequence[str]) -> None:
    """Fail before any MPC work when the per-user file is wrong (it is read again at release)."""
    if config.users is not None:
        read_user_levels(config.users, config.default_epsilon(), set(users))


def write_user_levels(path: Path, levels: dict[str, float]) -> None:
    lines = ["user,epsilon"] + [f"{user},{eps!r}" for user, eps in levels.items()]
    write_text_atomic(path, "\n".join(lines) + "\n")


# --- per-user release ledger ---------------------------------------------------------


@dataclass
class UserAccount:
    budget: float
    releases: list[dict[str, Any]] = field(default_factory=list)
    last: list[str] | None = None

    @property
    def spent(self) -> float:
        return math.fsum(r["epsilon"] for r in self.releases)

    def can_spend(self, epsilon: float) -> bool:
        return math.fsum([self.spent, epsilon]) <= self.budget * (1 + 1e-12)

    def to_dict(self) -> dict[str, Any]:
        return {"budget": self.budget, "releases": self.releases, "last": self.last}


class ReleaseLedger:
    """Per-user epsilon spent on threshold releases (basic composition: epsilons add).

    One JSON file per holder, only its own users. A release is booked in the same write
    that stores it as the user's last release; a user whose next release would pass the
    budget is served that last release again (re-showing a release costs nothing).
    """

    def __init__(self, path: Path, accounts: dict[str, UserAccount]) -> None:
        self.path = path
        self.accounts = accounts

    @classmethod
    def load(cls, path: Path) -> "ReleaseLedger":
        if not path.exists():
            return cls(path, {})
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise InputError(f"{path}: not a readable release ledger ({exc})") from None
        if not isinstance(doc, dict) or doc.get("format") != LEDGER_FORMAT or not isinstance(doc.get("users"), dict):
            raise InputError(f"{path}: not a release ledger (expected format {LEDGER_FORMAT!r})")
        accounts = {}
        try:
            for user, entry in doc["users"].items():
                account = UserAccount(float(entry["budget"]), list(entry["releases"]), entry["last"])
                for record in account.releases:
                    if not (isinstance(record["epsilon"], (int, float)) and record["epsilon"] > 0):
                        raise ValueError(f"user {user}: bad release epsilon")
                if account.spent > account.budget * (1 + 1e-12):
                    raise ValueError(f"user {user} is recorded past the budget")
                accounts[user] = account
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"{path}: malformed release ledger ({exc})") from None
        return cls(path, accounts)

    def account(self, user: str, budget: float) -> UserAccount:
        return self.accounts.setdefault(user, UserAccount(budget))

    def save(self) -> None:
        doc = {"format": LEDGER_FORMAT, "users": {u: a.to_dict() for u, a in sorted(self.accounts.items())}}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.path, json.dumps(doc, indent=1, sort_keys=True) + "\n")


# --- applying the policy to one party's users -----------------------------------------


def release_lists(
    config: ReleaseConfig,
    users: Sequence[str],
    ranked: Sequence[Sequence[str]],
    unrated: Sequence[Sequence[str]],
    *,
    top_k: int,
    rng: random.Random | None = None,
) -> tuple[list[list[str]], dict[str, Any]]:
    """The list each user is shown, and the record of what was done (for party.json).

    ``ranked[u]``: the top-k MPC revealed for user u, best first (rated items removed);
    ``unrated[u]``: every catalogue item user u has not rated.
    """
    rng = rng or system_random()
    default_epsilon = config.default_epsilon()
    levels = read_user_levels(config.users, default_epsilon, set(users)) if config.users else {}
    from mpc_rec.dp.ledger import _locked  # the budget ledger's file lock: one locking scheme

    shown: list[list[str]] = []
    per_user: dict[str, dict[str, Any]] = {}
    counts = {"exact": 0, "new": 0, "repeated": 0, "withheld": 0}
    with _locked(config.ledger) if config.ledger else contextlib.nullcontext():
        ledger = ReleaseLedger.load(config.ledger) if config.ledger else None
        for user, top, pool in zip(users, ranked, unrated):
            epsilon = levels.get(user, default_epsilon)
            if not math.isfinite(epsilon):
                shown.append(list(top))
                counts["exact"] += 1
                continue
            account = ledger.account(user, config.budget)
            if account.can_spend(epsilon):
                plan = threshold_plan(len(pool), top_k, epsilon, len(top))
                ranked_set = set(top)
                items = draw_threshold(list(top), [i for i in pool if i not in ranked_set], plan, rng)
                account.releases.append({"run_id": config.run_id, "epsilon": epsilon, "timestamp": config.timestamp})
                account.last = items
                status = "new"
            elif account.last is not None:
                items, status, plan = list(account.last), "repeated", None
            else:
                items, status, plan = [], "withheld", None
            counts[status] += 1
            shown.append(items)
            per_user[user] = {
                "status": status, "epsilon": epsilon, "spent": account.spent, "budget": account.budget,
                "left": max(0.0, account.budget - account.spent),
                "priority_set": None if plan is None else plan.priority,
            }
        if ledger is not None:
            ledger.save()
    record = {
        "policy": config.policy,
        "epsilon": config.epsilon,
        "budget_per_user": config.budget,
        "per_user_overrides": len(levels),
        "releases": counts,
        "composition": "basic (epsilons of a user's releases add up); an exhausted user is shown the last release again",
        "mechanism": "coarse-grained threshold policy (Fu, Chen, Gao, Li), k-item extension; protocols/release.md",
        "users": per_user,
    }
    return shown, record


def ledger_path_for(ledger_dir: Path, party_name: str) -> Path:
    return (ledger_dir / f"{party_name}-releases.json").resolve()
