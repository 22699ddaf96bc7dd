"""Ratings data: loading (RecBole .inter, CSV, GroupLens u.data), synthetic data,
splitting, partitioning between parties, catalogues and dense matrices.

Every problem with a file is a ``DataError`` whose one-line message names the file
and, where it is about a line, the 1-based physical line number.
"""

from __future__ import annotations

import codecs
import csv
import io
import math
import os
import re
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

from .errors import DataError
from .files import write_text_atomic

__all__ = [
    "DEFAULT_RATING_RANGE", "Ratings", "dense_matrices", "load_ratings", "partition_users",
    "read_catalogue", "sort_ids", "split_train_test", "synthetic_ratings", "write_catalogue",
    "write_ratings_csv",
]

DEFAULT_RATING_RANGE = (1.0, 5.0)

# (accepted lower-case header names, what the column is called in messages)
_CSV_COLUMNS = (
    (("user", "user_id", "userid"), "user"),
    (("item", "item_id", "itemid", "movie", "movie_id", "movieid"), "item"),
    (("rating", "score"), "rating"),
)
_INT_ID = re.compile(r"-?[0-9]+")
_TYPED_FIELD = re.compile(r"[^:\s]+:[A-Za-z_]+")  # RecBole header field, e.g. "user_id:token"


def sort_ids(ids: Iterable) -> list[str]:
    """Sorted unique ids as strings: numerically when all are integers, else lexicographically."""
    unique = {str(i) for i in ids}
    if unique and all(_INT_ID.fullmatch(i) for i in unique):
        # Tie-break on the text so "7" and "007" still have a fixed order.
        return sorted(unique, key=lambda i: (int(i), i))
    return sorted(unique)


@dataclass(frozen=True, eq=False)  # eq=False: field-wise == on arrays is ambiguous
class Ratings:
    """Parallel arrays of (user, item, rating); ids are strings, ratings float64."""

    users: np.ndarray
    items: np.ndarray
    values: np.ndarray

    def __post_init__(self) -> None:
        users, items = _as_id_array(self.users), _as_id_array(self.items)
        values = np.asarray(self.values, dtype=np.float64)
        if not (users.ndim == items.ndim == values.ndim == 1):
            raise ValueError("Ratings arrays must be one-dimensional")
        if not (len(users) == len(items) == len(values)):
            raise ValueError(
                f"Ratings arrays differ in length: {len(users)}, {len(items)}, {len(values)}"
            )
        object.__setattr__(self, "users", users)
        object.__setattr__(self, "items", items)
        object.__setattr__(self, "values", values)

    def __len__(self) -> int:
        return len(self.values)

    def subset(self, mask_or_index) -> "Ratings":
        """The ratings selected by a boolean mask (of full length) or an integer index array."""
        sel = np.asarray(mask_or_index)
        if sel.dtype == bool:
            if sel.shape != (len(self),):
                raise ValueError(f"mask has shape {sel.shape}, expected ({len(self)},)")
        elif sel.size == 0:
            sel = sel.astype(np.intp)  # an empty list arrives as float64
        elif not np.issubdtype(sel.dtype, np.integer):
            raise ValueError(f"subset needs a boolean mask or integer indices, got {sel.dtype}")
        return Ratings(self.users[sel], self.items[sel], self.values[sel])

    def user_ids(self) -> list[str]:
        return sort_ids(self.users)

    def item_ids(self) -> list[str]:
        return sort_ids(self.items)


def _as_id_array(ids) -> np.ndarray:
    arr = np.asarray(ids)
    if arr.dtype == object:
        return arr
    # Numeric or fixed-width string input: normalise to Python str objects, so ids
    # compare and hash the same however the caller built them. (Object arrays are
    # trusted to hold str already: checking would cost a pass on every subset.)
    return arr.astype(str).astype(object) if arr.ndim == 1 else arr


# ---------------------------------------------------------------- loading
def load_ratings(path, *, rating_range=DEFAULT_RATING_RANGE) -> Ratings:
    """Load ratings from a RecBole ``.inter``, a headed CSV or a GroupLens ``u.data`` file."""
    lo, hi = _check_range(rating_range)
    name = os.fspath(path)
    lines = _read_lines(path)
    numbered = [(n, line) for n, line in enumerate(lines, start=1) if line.strip()]
    if not numbered:
        raise DataError(f"{name}: no ratings (the file is empty)")
    first = numbered[0][1]
    if all(_TYPED_FIELD.fullmatch(f.strip()) for f in first.split("\t")):
        records = _inter_records(name, numbered)
    elif "," in first:
        records = _csv_records(name, lines)
    else:
        records = _udata_records(name, numbered)
    return _build(name, records, lo, hi)


def _check_range(rating_range) -> tuple[float, float]:
    lo, hi = (float(x) for x in rating_range)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"rating_range must be finite with low < high, got {rating_range!r}")
    return lo, hi


def _read_bytes(path) -> bytes:
    name = os.fspath(path)
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        raise DataError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{name}: is a directory, not a file") from None
    except OSError as exc:
        raise DataError(f"{name}: cannot read ({exc.strerror or exc})") from None


def _read_lines(path) -> list[str]:
    """Physical lines (newline and CR stripped), so list index + 1 is the line number."""
    data = _read_bytes(path)
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]  # spreadsheet exports often start with a BOM
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataError(
            f"{os.fspath(path)}:{line}: not valid UTF-8 (byte 0x{data[exc.start]:02x})"
        ) from None
    # split("\n") rather than splitlines(): the latter also breaks on \x0c, \x1c, ...,
    # which would make reported line numbers disagree with editors.
    return [line.rstrip("\r") for line in text.split("\n")]


def _find_column(name: str, line: int, header: list[str], aliases, what: str) -> int:
    hits = [i for i, col in enumerate(header) if col in aliases]
    found = ", ".join(repr(c) for c in header)
    if not hits:
        raise DataError(
            f"{name}:{line}: header has no {what} column "
            f"(expected one of {', '.join(aliases)}; found {found})"
        )
    if len(hits) > 1:
        raise DataError(f"{name}:{line}: header has more than one {what} column (found {found})")
    return hits[0]


def _num(x: float) -> str:
    """Exact but short text for a bound in messages: 5.0 -> "5", 0.1 -> "0.1"."""
    return str(int(x)) if x.is_integer() else repr(x)


def _inter_records(name: str, numbered) -> Iterator[tuple[int, str, str, str]]:
    head_no, head = numbered[0]
    header = [f.split(":", 1)[0].strip().lower() for f in head.split("\t")]
    cols = [_find_column(name, head_no, header, (c,), c) for c in ("user_id", "item_id", "rating")]
    for n, line in numbered[1:]:
        fields = line.split("\t")  # tab only: RecBole token_seq fields contain spaces
        if len(fields) != len(header):
            raise DataError(f"{name}:{n}: expected {len(header)} fields, found {len(fields)}")
        yield n, fields[cols[0]], fields[cols[1]], fields[cols[2]]


def _csv_records(name: str, lines: list[str]) -> Iterator[tuple[int, str, str, str]]:
    reader = csv.reader(lines)
    header: list[str] | None = None
    last = 0  # reader.line_num after the previous record: a record starts on last + 1
    try:
        for row in reader:
            start, last = last + 1, reader.line_num
            if not row or (len(row) == 1 and not row[0].strip()):
                continue  # blank line
            if header is None:
                header = [c.strip().lower() for c in row]
                cols = [_find_column(name, start, header, *col) for col in _CSV_COLUMNS]
                continue
            if len(row) != len(header):
                raise DataError(f"{name}:{start}: expected {len(header)} fields, found {len(row)}")
            yield start, row[cols[0]], row[cols[1]], row[cols[2]]
    except csv.Error as exc:
        raise DataError(f"{name}:{reader.line_num}: malformed CSV ({exc})") from None


def _udata_records(name: str, numbered) -> Iterator[tuple[int, str, str, str]]:
    for n, line in numbered:
        fields = line.split()
        if len(fields) not in (3, 4):
            raise DataError(
                f"{name}:{n}: expected 3 or 4 fields (user item rating [timestamp]), "
                f"found {len(fields)}"
            )
        yield n, fields[0], fields[1], fields[2]


def _build(name: str, records, lo: float, hi: float) -> Ratings:
    users: list[str] = []
    items: list[str] = []
    values: list[float] = []
    first_line: dict[tuple[str, str], int] = {}
    for n, user, item, text in records:
        user, item, text = user.strip(), item.strip(), text.strip()
        if not user:
            raise DataError(f"{name}:{n}: empty user id")
        if not item:
            raise DataError(f"{name}:{n}: empty item id")
        try:
            if "_" in text:  # float() accepts "1_0"; a data file should not
                raise ValueError
            value = float(text)
        except ValueError:
            raise DataError(f"{name}:{n}: rating {text!r} is not a number") from None
        if not math.isfinite(value):
            raise DataError(f"{name}:{n}: rating {text!r} is not finite")
        if not lo <= value <= hi:
            raise DataError(
                f"{name}:{n}: rating {text} is out of range [{_num(lo)}, {_num(hi)}]"
            )
        prev = first_line.setdefault((user, item), n)
        if prev != n:
            raise DataError(
                f"{name}:{n}: duplicate rating for user {user!r} and item {item!r} "
                f"(first on line {prev})"
            )
        users.append(user)
        items.append(item)
        values.append(value)
    if not values:
        raise DataError(f"{name}: no ratings (only a header)")
    return Ratings(np.array(users, dtype=object), np.array(items, dtype=object), np.array(values))


# ---------------------------------------------------------------- synthetic data
def synthetic_ratings(
    *, n_users: int = 300, n_items: int = 200, n_factors: int = 4, density: float = 0.12,
    seed: int = 0,
) -> Ratings:
    """Deterministic integer 1..5 ratings from a noisy low-rank model with biases."""
    if n_users < 1 or n_items < 1 or n_factors < 1:
        raise ValueError("n_users, n_items and n_factors must be at least 1")
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    rng = np.random.default_rng(seed)
    # Factor scale chosen so the interaction term has standard deviation ~0.9 whatever
    # n_factors is: it then dominates the noise (0.3) and rounding, so MF can learn it.
    scale = math.sqrt(0.9) / n_factors**0.25
    p = rng.normal(0.0, scale, size=(n_users, n_factors))
    q = rng.normal(0.0, scale, size=(n_items, n_factors))
    user_bias = rng.normal(0.0, 0.4, size=n_users)
    item_bias = rng.normal(0.0, 0.4, size=n_items)
    noise = rng.normal(0.0, 0.3, size=(n_users, n_items))
    full = 3.5 + user_bias[:, None] + item_bias[None, :] + p @ q.T + noise
    full = np.clip(np.rint(full), 1.0, 5.0)

    observed = rng.random((n_users, n_items)) < density
    min_per_user = min(5, n_items)
    for u in np.flatnonzero(observed.sum(axis=1) < min_per_user):
        unrated = np.flatnonzero(~observed[u])
        need = min_per_user - int(observed[u].sum())
        observed[u, rng.choice(unrated, size=need, replace=False)] = True
    for i in np.flatnonzero(~observed.any(axis=0)):
        observed[rng.integers(n_users), i] = True

    rows, cols = np.nonzero(observed)  # row-major: grouped by user
    users = np.array([f"u{r + 1}" for r in rows], dtype=object)
    items = np.array([f"i{c + 1}" for c in cols], dtype=object)
    return Ratings(users, items, full[rows, cols])


# ---------------------------------------------------------------- splitting
def split_train_test(ratings: Ratings, *, test_fraction: float = 0.2, seed: int = 0):
    """Random per-rating split into (train, test); both keep the input's row order."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    n = len(ratings)
    n_test = round(test_fraction * n)
    perm = np.random.default_rng(seed).permutation(n)
    is_test = np.zeros(n, dtype=bool)
    is_test[perm[:n_test]] = True
    return ratings.subset(~is_test), ratings.subset(is_test)


def partition_users(ratings: Ratings, n_parties: int, *, seed: int = 0) -> list[Ratings]:
    """Deal the distinct users to ``n_parties`` parties; returns each party's ratings."""
    if n_parties < 1:
        raise DataError(f"cannot partition users among {n_parties} parties")
    user_ids = sort_ids(ratings.users)
    if len(user_ids) < n_parties:
        raise DataError(f"cannot partition {len(user_ids)} users among {n_parties} parties")
    shuffled = np.random.default_rng(seed).permutation(len(user_ids))
    party_of = {user_ids[j]: k % n_parties for k, j in enumerate(shuffled)}
    owner = np.fromiter((party_of[u] for u in ratings.users), dtype=np.intp, count=len(ratings))
    return [ratings.subset(owner == p) for p in range(n_parties)]


# ---------------------------------------------------------------- writing
def _check_writable_id(kind: str, ident: str) -> None:
    # Loading strips whitespace and splits lines, so such ids would not round-trip.
    if not ident or ident != ident.strip() or "\n" in ident or "\r" in ident:
        raise DataError(f"cannot write {kind} id {ident!r}: empty or has surrounding whitespace")


def write_ratings_csv(ratings: Ratings, path) -> None:
    """Write ``user,item,rating`` CSV atomically; ``load_ratings`` reads it back exactly."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["user", "item", "rating"])
    for user, item, value in zip(ratings.users, ratings.items, ratings.values.tolist()):
        _check_writable_id("user", str(user))
        _check_writable_id("item", str(item))
        writer.writerow([user, item, repr(float(value))])  # repr is exact for floats
    write_text_atomic(path, buf.getvalue())


def read_catalogue(path) -> list[str]:
    """Item ids, in file order, from a catalogue file (header ``item``, one id a line)."""
    name = os.fspath(path)
    numbered = [(n, line.strip()) for n, line in enumerate(_read_lines(path), 1) if line.strip()]
    if not numbered:
        raise DataError(f"{name}: empty catalogue")
    head_no, head = numbered[0]
    if head.lower() != "item":
        raise DataError(f"{name}:{head_no}: expected the header 'item', found {head!r}")
    seen: dict[str, int] = {}
    for n, item in numbered[1:]:
        prev = seen.setdefault(item, n)
        if prev != n:
            raise DataError(f"{name}:{n}: duplicate item {item!r} (first on line {prev})")
    if not seen:
        raise DataError(f"{name}: empty catalogue (no items after the header)")
    return list(seen)


def write_catalogue(items, path) -> None:
    """Write a catalogue atomically, keeping the given order."""
    items = [str(i) for i in items]
    seen: set[str] = set()
    for item in items:
        _check_writable_id("item", item)
        if item in seen:
            raise DataError(f"cannot write catalogue {os.fspath(path)}: duplicate item {item!r}")
        seen.add(item)
    write_text_atomic(path, "".join(f"{line}\n" for line in ["item", *items]))


# ---------------------------------------------------------------- matrices
def dense_matrices(ratings: Ratings, users: list[str], items: list[str]):
    """(R, M): ratings at observed entries (0 elsewhere) and the 0/1 observation mask."""
    user_index = {u: k for k, u in enumerate(users)}
    item_index = {i: k for k, i in enumerate(items)}
    if len(user_index) != len(users) or len(item_index) != len(items):
        raise ValueError("users and items must not contain duplicates")
    rows = np.empty(len(ratings), dtype=np.intp)
    cols = np.empty(len(ratings), dtype=np.intp)
    for k, (user, item) in enumerate(zip(ratings.users, ratings.items)):
        try:
            rows[k] = user_index[user]
        except KeyError:
            raise DataError(f"user {user!r} is not in the user list") from None
        try:
            cols[k] = item_index[item]
        except KeyError:
            raise DataError(f"item {item!r} is not in the catalogue") from None
    r = np.zeros((len(users), len(items)), dtype=np.float64)
    m = np.zeros_like(r)
    r[rows, cols] = ratings.values
    m[rows, cols] = 1.0
    if int(m.sum()) != len(ratings):
        raise DataError("ratings contain a duplicate (user, item) pair")
    return r, m
