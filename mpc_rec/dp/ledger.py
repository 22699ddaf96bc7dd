"""Privacy budget ledger: one JSON file per deployment, one copy per party.

    {"format": "mpc-rec-budget-ledger/1",
     "total": {"epsilon": 8.0, "delta": 1e-05},
     "datasets": {"<data set digest>": [{"run_id": ..., "epsilon": ..., "delta": ...,
                                           "mechanism": ..., "timestamp": ...}, ...]},
     "digest": "<sha256 of the canonical JSON of everything above>"}

Runs on one data set compose by basic composition: the ledger adds epsilons and deltas
(conservative; valid whatever each run's own accounting was). ``check_and_reserve``
refuses a run that would take a data set past the total *before* any data is touched,
and records the reservation at once (a run that then fails still counts: budget is
never handed back). Writes replace the whole file atomically, under an exclusive lock
on a side file so two runs on one machine cannot both reserve the last of a budget.

The digest is over the content, so parties can compare ledgers before a run: equal
digests mean equal histories. For that, every party must record the same entry: pass
the run id and timestamp agreed at run set-up, not each party's own clock. The digest
stored in the file detects edits made without recomputing it; it does not stop a party
that recomputes it, which is what comparing digests across parties is for.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Iterator, Mapping

from mpc_rec.errors import InputError
from mpc_rec.files import write_text_atomic

FORMAT = "mpc-rec-budget-ledger/1"
_DATASET = re.compile(r"^[0-9a-f]{16,128}$")
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")

try:
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX
    fcntl = None


class BudgetExceeded(InputError):
    """A run would spend more privacy budget than the ledger has left."""


class LedgerError(InputError):
    """A ledger file that is missing, malformed or altered."""


@dataclass(frozen=True)
class Budget:
    epsilon: float
    delta: float

    def __post_init__(self) -> None:
        if not (_finite(self.epsilon) and self.epsilon >= 0 and _finite(self.delta) and 0 <= self.delta < 1):
            raise ValueError(f"invalid budget epsilon={self.epsilon!r} delta={self.delta!r}")


@dataclass(frozen=True)
class LedgerEntry:
    run_id: str
    epsilon: float
    delta: float
    mechanism: str
    timestamp: str

    def __post_init__(self) -> None:
        if not _RUN_ID.match(self.run_id or ""):
            raise ValueError(f"invalid run id {self.run_id!r}")
        if not (_finite(self.epsilon) and self.epsilon > 0 and _finite(self.delta) and 0 <= self.delta < 1):
            raise ValueError(f"invalid entry epsilon={self.epsilon!r} delta={self.delta!r}")
        if not self.mechanism or not isinstance(self.mechanism, str):
            raise ValueError("entry needs a mechanism name")
        try:
            _dt.datetime.fromisoformat(self.timestamp)
        except (TypeError, ValueError):
            raise ValueError(f"invalid timestamp {self.timestamp!r}") from None

    def to_dict(self) -> dict:
        return {"run_id": self.run_id, "epsilon": self.epsilon, "delta": self.delta,
                "mechanism": self.mechanism, "timestamp": self.timestamp}


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(frozen=True)
class Ledger:
    """The ledger's content; pure values, no file. ``with_entry`` returns a new ledger."""

    total: Budget
    datasets: Mapping[str, tuple[LedgerEntry, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        frozen = {k: tuple(v) for k, v in sorted(dict(self.datasets).items())}
        object.__setattr__(self, "datasets", MappingProxyType(frozen))

    def spent(self, dataset: str) -> Budget:
        entries = self.datasets.get(dataset, ())
        return Budget(math.fsum(e.epsilon for e in entries), math.fsum(e.delta for e in entries))

    def remaining(self, dataset: str) -> Budget:
        spent = self.spent(dataset)
        return Budget(max(0.0, self.total.epsilon - spent.epsilon), max(0.0, self.total.delta - spent.delta))

    def with_entry(self, dataset: str, entry: LedgerEntry) -> "Ledger":
        """This ledger plus ``entry``; raises ``BudgetExceeded`` if it would pass the total."""
        _check_dataset(dataset)
        entries = self.datasets.get(dataset, ())
        if any(e.run_id == entry.run_id for e in entries):
            raise LedgerError(f"run {entry.run_id!r} is already recorded for data set {dataset[:12]}")
        spent = self.spent(dataset)
        eps = math.fsum([spent.epsilon, entry.epsilon])
        dlt = math.fsum([spent.delta, entry.delta])
        if eps > self.total.epsilon or dlt > self.total.delta:
            raise BudgetExceeded(
                f"privacy budget exceeded for data set {dataset[:12]}: run {entry.run_id} needs "
                f"epsilon {entry.epsilon:.6g}, delta {entry.delta:.3g}; already spent epsilon "
                f"{spent.epsilon:.6g} of {self.total.epsilon:.6g}, delta {spent.delta:.3g} of "
                f"{self.total.delta:.3g}"
            )
        datasets = dict(self.datasets)
        datasets[dataset] = entries + (entry,)
        return Ledger(self.total, datasets)

    def content(self) -> dict:
        return {
            "format": FORMAT,
            "total": {"epsilon": self.total.epsilon, "delta": self.total.delta},
            "datasets": {k: [e.to_dict() for e in v] for k, v in self.datasets.items()},
        }

    def digest(self) -> str:
        return hashlib.sha256(_canonical(self.content()).encode("utf-8")).hexdigest()


def _canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a number")


def _check_dataset(dataset: str) -> None:
    if not isinstance(dataset, str) or not _DATASET.match(dataset):
        raise ValueError(f"data set digest must be 16-128 lowercase hex characters, got {dataset!r}")


# --- files ---------------------------------------------------------------------------


def _render(ledger: Ledger) -> str:
    doc = ledger.content()
    doc["digest"] = ledger.digest()
    return json.dumps(doc, sort_keys=True, indent=2, allow_nan=False) + "\n"


def _parse(text: str, name: str) -> Ledger:
    def bad(problem: str) -> LedgerError:
        return LedgerError(f"{name}: {problem}")

    try:
        doc = json.loads(text, parse_constant=_reject_constant)
    except ValueError as exc:
        raise bad(f"not valid JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise bad(f"not a budget ledger (expected format {FORMAT!r})")
    extra = set(doc) - {"format", "total", "datasets", "digest"}
    if extra:
        raise bad(f"unexpected field(s) {sorted(extra)}")
    try:
        total = Budget(doc["total"]["epsilon"], doc["total"]["delta"])
        datasets = {}
        for key, entries in doc["datasets"].items():
            _check_dataset(key)
            datasets[key] = tuple(LedgerEntry(**e) for e in entries)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise bad(f"malformed content ({exc})") from None
    ledger = Ledger(total, datasets)
    if doc.get("digest") != ledger.digest():
        raise bad("content does not match its digest (edited or corrupted)")
    for key in ledger.datasets:
        spent = ledger.spent(key)
        if spent.epsilon > total.epsilon or spent.delta > total.delta:
            raise bad(f"data set {key[:12]} is recorded past the total budget")
    return ledger


def load_ledger(path) -> Ledger:
    name = os.fspath(path)
    try:
        with open(name, encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError:
        raise LedgerError(f"{name}: no budget ledger here (create one first)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise LedgerError(f"{name}: cannot read ({exc})") from None
    return _parse(text, name)


def save_ledger(path, ledger: Ledger) -> None:
    write_text_atomic(path, _render(ledger))


def create_ledger(path, *, total_epsilon: float, total_delta: float) -> Ledger:
    """Start a ledger with the deployment's total budget; refuses to replace an existing one."""
    try:
        ledger = Ledger(Budget(total_epsilon, total_delta))
    except ValueError as exc:
        raise InputError(f"invalid total budget: {exc}") from None
    with _locked(path):
        if os.path.exists(path):
            raise LedgerError(f"{os.fspath(path)}: a ledger already exists; it is never overwritten")
        save_ledger(path, ledger)
    return ledger


def ledger_digest(path_or_ledger) -> str:
    """The digest parties compare (loading validates the file first)."""
    ledger = path_or_ledger if isinstance(path_or_ledger, Ledger) else load_ledger(path_or_ledger)
    return ledger.digest()


@contextlib.contextmanager
def _locked(path) -> Iterator[None]:
    if fcntl is None:  # pragma: no cover
        yield
        return
    lock_path = os.fspath(path) + ".lock"
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise LedgerError(f"{lock_path}: cannot lock ({exc.strerror or exc})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def check_and_reserve(
    path,
    *,
    dataset: str,
    epsilon: float,
    delta: float,
    run_id: str,
    mechanism: str,
    timestamp: str | None = None,
    expected_digest: str | None = None,
) -> Ledger:
    """Record a run's budget before it touches data, or raise ``BudgetExceeded``.

    ``expected_digest``, if given, must equal the ledger's digest before the entry is
    added (the value all parties agreed on); otherwise ``LedgerError``. Returns the new
    ledger. ``timestamp``: ISO 8601, agreed by all parties; default now (UTC).
    """
    if timestamp is None:
        timestamp = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
    try:
        entry = LedgerEntry(run_id, float(epsilon), float(delta), mechanism, timestamp)
        _check_dataset(dataset)
    except (TypeError, ValueError) as exc:
        raise InputError(f"invalid budget request: {exc}") from None
    with _locked(path):
        ledger = load_ledger(path)
        if expected_digest is not None and ledger.digest() != expected_digest:
            raise LedgerError(
                f"{os.fspath(path)}: ledger digest {ledger.digest()[:16]} differs from the agreed "
                f"{expected_digest[:16]}"
            )
        updated = ledger.with_entry(dataset, entry)
        save_ledger(path, updated)
    return updated


def reserve_for_plan(path, plan, *, dataset: str, run_id: str, timestamp: str | None = None,
                     expected_digest: str | None = None) -> Ledger:
    """``check_and_reserve`` for a ``NoisePlan``: its achieved epsilon and its delta."""
    return check_and_reserve(
        path, dataset=dataset, epsilon=plan.epsilon, delta=plan.delta, run_id=run_id,
        mechanism=f"{plan.mechanism}/{plan.accountant}", timestamp=timestamp,
        expected_digest=expected_digest,
    )


def format_ledger(ledger: Ledger) -> str:
    """Human-readable summary for ``mpc-rec budget``."""
    lines = [
        f"privacy budget ledger {ledger.digest()[:16]}",
        f"total per data set: epsilon {ledger.total.epsilon:g}, delta {ledger.total.delta:g}"
        " (runs add up: basic composition)",
    ]
    if not ledger.datasets:
        lines.append("no runs recorded")
    for key, entries in ledger.datasets.items():
        spent, left = ledger.spent(key), ledger.remaining(key)
        lines.append("")
        lines.append(
            f"data set {key[:16]}: spent epsilon {spent.epsilon:.4g}, delta {spent.delta:.3g}; "
            f"left epsilon {left.epsilon:.4g}, delta {left.delta:.3g}"
        )
        for e in entries:
            lines.append(f"  {e.timestamp}  {e.run_id}  epsilon {e.epsilon:.4g}  delta {e.delta:.3g}  {e.mechanism}")
    return "\n".join(lines) + "\n"
