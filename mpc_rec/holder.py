"""What a data holder keeps on its own side: the released item model it downloads, and
its users' controls (excluded items, forgotten users).

Both are files the holder reads and may edit, so loading validates everything and names
the file and the problem; writing replaces the file whole (``write_*_atomic``).

Item release (``items.npz``): arrays ``item_ids`` (str), ``factors`` (items x K float64),
``biases`` (items), ``mean`` (scalar) and ``privacy`` (a JSON text: what the release cost,
as the accountant reported it). It is public by construction: only noised item-side
values reach it.

Controls (``controls.json``)::

    {"version": 1,
     "exclude": {"<user>": ["<item>", ...]},   # e.g. a gift: not in training, never shown
     "forget": ["<user>", ...]}                # history deleted: the user is dropped

A holder applies them before every round, so the next round reflects them.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mpc_rec.data import Ratings
from mpc_rec.errors import DataError
from mpc_rec.files import write_bytes_atomic, write_text_atomic

CONTROLS_VERSION = 1
RELEASE_ARRAYS = ("item_ids", "factors", "biases", "mean", "privacy")


@dataclass(frozen=True, eq=False)
class ItemRelease:
    """The noised item side of a model, as released to data holders."""

    item_ids: list[str]
    factors: np.ndarray
    biases: np.ndarray
    mean: float
    privacy: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        factors = np.asarray(self.factors, dtype=np.float64)
        biases = np.asarray(self.biases, dtype=np.float64)
        n = len(self.item_ids)
        if factors.ndim != 2 or factors.shape[0] != n:
            raise ValueError(f"factors have shape {factors.shape}, expected ({n}, K)")
        if biases.shape != (n,):
            raise ValueError(f"biases have shape {biases.shape}, expected ({n},)")
        if len(set(self.item_ids)) != n:
            raise ValueError("item ids repeat")
        object.__setattr__(self, "factors", factors)
        object.__setattr__(self, "biases", biases)
        object.__setattr__(self, "mean", float(self.mean))


def write_release_atomic(path, release: ItemRelease) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, item_ids=np.asarray(release.item_ids, dtype=str), factors=release.factors,
             biases=release.biases, mean=np.float64(release.mean),
             privacy=np.asarray(json.dumps(release.privacy, sort_keys=True)))
    write_bytes_atomic(path, buffer.getvalue())


def load_release(path) -> ItemRelease:
    name = os.fspath(path)
    try:
        # allow_pickle=False: a release file may come from elsewhere and must not run code
        with np.load(name, allow_pickle=False) as archive:
            missing = [key for key in RELEASE_ARRAYS if key not in archive.files]
            if missing:
                raise DataError(f"{name}: not an item release (missing {', '.join(missing)})")
            arrays = {key: archive[key] for key in RELEASE_ARRAYS}
    except DataError:
        raise
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"{name}: not a readable item release ({exc})") from None
    if arrays["item_ids"].dtype.kind != "U" or arrays["item_ids"].ndim != 1:
        raise DataError(f"{name}: item_ids must be a list of strings")
    for key in ("factors", "biases", "mean"):
        if arrays[key].dtype.kind != "f" or not np.all(np.isfinite(arrays[key])):
            raise DataError(f"{name}: {key} must be finite floating-point numbers")
    try:
        privacy = json.loads(str(arrays["privacy"]))
        if not isinstance(privacy, dict):
            raise ValueError("not an object")
        return ItemRelease([str(i) for i in arrays["item_ids"]], arrays["factors"], arrays["biases"],
                           float(arrays["mean"]), privacy)
    except ValueError as exc:
        raise DataError(f"{name}: inconsistent item release ({exc})") from None


@dataclass(frozen=True)
class Controls:
    """A holder's users' wishes: items kept out of their profile and lists, users forgotten."""

    exclude: dict[str, frozenset[str]] = field(default_factory=dict)
    forget: frozenset[str] = frozenset()

    def hidden(self, user: str) -> frozenset[str]:
        """Items never to be recommended to ``user`` (already-rated items aside)."""
        return self.exclude.get(user, frozenset())

    def apply(self, ratings: Ratings) -> Ratings:
        """The ratings a round may use: forgotten users and excluded (user, item) pairs removed."""
        if not self.exclude and not self.forget:
            return ratings
        keep = np.array([user not in self.forget and item not in self.hidden(user)
                         for user, item in zip(ratings.users, ratings.items)], dtype=bool)
        return ratings.subset(keep)

    def to_json(self) -> dict[str, Any]:
        return {"version": CONTROLS_VERSION,
                "exclude": {user: sorted(items) for user, items in sorted(self.exclude.items()) if items},
                "forget": sorted(self.forget)}


def load_controls(path) -> Controls:
    """The controls at ``path``; a missing file means no controls."""
    name = os.fspath(path)
    if not os.path.exists(name):
        return Controls()
    try:
        with open(name, encoding="utf-8") as fh:
            raw = json.load(fh)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"{name}: not a readable controls file ({exc})") from None
    if not isinstance(raw, dict):
        raise DataError(f"{name}: controls must be a JSON object")
    unknown = set(raw) - {"version", "exclude", "forget"}
    if unknown:
        raise DataError(f"{name}: unknown controls key {sorted(unknown)[0]!r}")
    if raw.get("version", CONTROLS_VERSION) != CONTROLS_VERSION:
        raise DataError(f"{name}: controls version {raw.get('version')!r}, this mpc-rec reads {CONTROLS_VERSION}")
    exclude = raw.get("exclude", {})
    if not isinstance(exclude, dict) or not all(
            isinstance(items, list) and all(isinstance(i, str) for i in items) for items in exclude.values()):
        raise DataError(f"{name}: exclude must map each user to a list of item ids")
    forget = raw.get("forget", [])
    if not isinstance(forget, list) or not all(isinstance(u, str) for u in forget):
        raise DataError(f"{name}: forget must be a list of user ids")
    return Controls({user: frozenset(items) for user, items in exclude.items()}, frozenset(forget))


def write_controls_atomic(path, controls: Controls) -> None:
    write_text_atomic(path, json.dumps(controls.to_json(), indent=2) + "\n")
