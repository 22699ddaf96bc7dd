"""A holder's folder and the answer to "top-k for this user", all on the holder's side.

Folder layout (every file is the holder's own; nothing here is sent anywhere)::

    ratings.csv      user,item,rating: the holder's users' ratings (any format load_ratings reads)
    controls.json    excluded items and forgotten users (mpc_rec.holder.Controls); optional
    cohorts.csv      user,cohort: each user's coarse public cohort, for cold start; optional
    embeddings.npz   compressed user vectors, refitted here whenever stale
    hnsw-*.faiss     the HNSW graph of one release (``--index hnsw``), built once
    serving.toml     the holder's settings: ``allow_refine = true`` lets its queries go to the
                     compute parties for hybrid re-ranking (default: local only); optional

A forgotten user, or one with no usable history, gets only cold-start recommendations.
Items the user rated or hid are never returned.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mpc_rec.data import load_ratings
from mpc_rec.errors import DataError, InputError
from mpc_rec.holder import ItemRelease, load_controls, load_release
from mpc_rec.serving.embeddings import (
    fit_embeddings, load_embeddings, ratings_digest, release_digest, write_embeddings_atomic,
)
from mpc_rec.serving.explain import explain_items
from mpc_rec.serving.index import build_index

RATINGS, CONTROLS, COHORTS, EMBEDDINGS, SETTINGS = (
    "ratings.csv", "controls.json", "cohorts.csv", "embeddings.npz", "serving.toml")


def allows_refinement(folder: Path) -> bool:
    from mpc_rec.config import read_toml

    path = folder / SETTINGS
    if not path.exists():
        return False
    raw = read_toml(path)
    unknown = set(raw) - {"allow_refine"}
    if unknown:
        raise InputError(f"{path}: unknown setting {sorted(unknown)[0]!r} (known: allow_refine)")
    if not isinstance(raw.get("allow_refine", False), bool):
        raise InputError(f"{path}: allow_refine must be true or false")
    return raw.get("allow_refine", False)


@dataclass(frozen=True)
class Query:
    user: str
    k: int = 10
    explain: bool = False
    index: str = "exact"
    precision: str = "int8"
    cohort: str | None = None  # a new user's cohort, when cohorts.csv does not list the user
    popularity: Path | None = None  # cold-start release (mpc_rec.serving.cold_start)
    refine: Path | None = None  # run folder with the compute parties' model shares
    candidates: int = 50


def read_cohorts(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: not a readable cohorts file ({exc})") from None
    if not rows or [c.strip().lower() for c in rows[0]] != ["user", "cohort"]:
        raise DataError(f"{path}: the first line must be the header 'user,cohort'")
    cohorts = {}
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != 2 or not row[0].strip() or not row[1].strip():
            raise DataError(f"{path}: line {line}: expected 'user,cohort'")
        cohorts[row[0].strip()] = row[1].strip()
    return cohorts


def holder_ratings(folder: Path):
    path = folder / RATINGS
    if not folder.is_dir():
        raise InputError(f"{folder}: holder folder not found")
    if not path.exists():
        raise DataError(f"{path}: the holder's ratings file is missing")
    return load_ratings(path)


def current_embeddings(folder: Path, release: ItemRelease, ratings, precision: str, note=lambda message: None):
    """The stored embeddings if they fit this release and these ratings; refitted otherwise."""
    path = folder / EMBEDDINGS
    if path.exists():
        stored = load_embeddings(path)
        if (stored.release == release_digest(release) and stored.source == ratings_digest(ratings)
                and stored.precision == precision):
            return stored
        note(f"{path}: stale (new release, ratings or controls); refitting")
    embeddings = fit_embeddings(release, ratings, precision=precision)
    write_embeddings_atomic(path, embeddings)
    return embeddings


def recommend(release_path: Path, folder: Path, query: Query, note=lambda message: None) -> dict[str, Any]:
    if query.k < 1:
        raise InputError(f"--k must be at least 1, got {query.k}")
    if query.refine is not None and not allows_refinement(folder):
        raise InputError(f"{folder}: this holder does not allow refinement in MPC (set allow_refine = true in {SETTINGS})")
    release = load_release(release_path)
    controls = load_controls(folder / CONTROLS)
    raw = holder_ratings(folder)
    cohorts = read_cohorts(folder / COHORTS)
    user = query.user
    known = user in set(raw.users) or user in cohorts or query.cohort is not None
    if not known:
        raise DataError(f"user {user!r} is not one of this holder's users (not in {RATINGS} or {COHORTS}; "
                        "a new user needs --cohort)")
    index_of = {item: k for k, item in enumerate(release.item_ids)}
    hidden = {index_of[i] for i in controls.hidden(user) if i in index_of}
    ratings = controls.apply(raw)
    mine = ratings.subset(ratings.users == user)
    # Everything the user ever rated stays out of the list, including ratings kept out of the profile.
    rated = {index_of[i] for i in raw.subset(raw.users == user).items if i in index_of}
    if user in controls.forget or len(mine) == 0:
        why = "forgotten at the user's request" if user in controls.forget else "no history"
        return _cold_start(query, cohorts, release, rated | hidden if user not in controls.forget else hidden, why)
    embeddings = current_embeddings(folder, release, ratings, query.precision, note)
    vector = embeddings.vector(embeddings.row_of(user))
    index = build_index(query.index, release.factors, release.biases,
                        cache=folder / f"hnsw-{embeddings.release[:16]}.faiss")
    exclude = np.fromiter(sorted(rated | hidden), dtype=np.int64)
    result: dict[str, Any] = {"user": user, "source": f"local ({index.name} index, {embeddings.precision} embedding)"}
    if query.refine is not None:
        from mpc_rec.serving.refine import refine_local

        candidates = index.top_k(vector[:-1], query.candidates, exclude)
        chosen, record = refine_local(query.refine, user, [release.item_ids[c] for c in candidates], query.k)
        shown = [index_of[item] for item in chosen]
        result.update(source="hybrid: local candidates re-ranked in MPC", refinement=record)
    else:
        shown = [int(i) for i in index.top_k(vector[:-1], query.k, exclude)]
    result["items"] = [release.item_ids[i] for i in shown]
    if query.explain:
        items = np.fromiter((index_of[i] for i in mine.items), dtype=np.int64, count=len(mine))
        result["explanations"] = explain_items(release, items, mine.values, shown)
    return result


def _cold_start(query: Query, cohorts: dict[str, str], release: ItemRelease, exclude: set[int], why: str) -> dict[str, Any]:
    from mpc_rec.serving.cold_start import load_popularity, recommend_for_cohort

    cohort = query.cohort or cohorts.get(query.user)
    if query.popularity is None or cohort is None:
        raise InputError(f"user {query.user!r} has {why}: only cold-start recommendations, which need "
                         "--popularity FILE and the user's cohort (cohorts.csv or --cohort)")
    popularity = load_popularity(query.popularity)
    hidden_ids = {release.item_ids[i] for i in exclude}
    items = recommend_for_cohort(popularity, cohort, query.k, hidden_ids)
    return {"user": query.user, "source": f"cold start ({why}): noisy popularity of cohort {cohort!r}",
            "items": items, "privacy": popularity.privacy}


def format_result(result: dict[str, Any]) -> str:
    lines = [f"user {result['user']}: {result['source']}"]
    if "refinement" in result and result.get("explanations"):
        lines.append("(order: the shared model's, in MPC; scores and reasons: the released model's, computed here)")
    explained = {e["item"]: e for e in result.get("explanations", [])}
    for rank, item in enumerate(result["items"], start=1):
        line = f"{rank:3d}. {item}"
        if item in explained:
            e = explained[item]
            because = ", ".join(f"{d['item']} (rated {d['rating']:g}, +{d['contribution']:.3f})" for d in e["drivers"])
            line += f"  score {e['score']:.3f} = {e['baseline']:.3f} baseline + your items" + (f"; mostly {because}" if because else "")
        lines.append(line)
    return "\n".join(lines)


def update_controls(folder: Path, *, exclude=(), include=(), forget=()) -> str:
    """Apply users' requests to the holder's controls.json (written whole, atomically)."""
    from mpc_rec.holder import Controls, write_controls_atomic

    if not (exclude or include or forget):
        raise InputError("nothing to change: give --exclude USER ITEM, --include USER ITEM or --forget USER")
    raw = holder_ratings(folder)
    known = set(raw.users) | set(read_cohorts(folder / COHORTS))
    for user in [u for u, _ in exclude] + [u for u, _ in include] + list(forget):
        if user not in known:
            raise InputError(f"user {user!r} is not one of this holder's users (not in {RATINGS} or {COHORTS})")
    controls = load_controls(folder / CONTROLS)
    hidden = {user: set(items) for user, items in controls.exclude.items()}
    for user, item in exclude:
        hidden.setdefault(user, set()).add(item)
    for user, item in include:
        hidden.get(user, set()).discard(item)
    updated = Controls({u: frozenset(i) for u, i in hidden.items() if i}, controls.forget | frozenset(forget))
    write_controls_atomic(folder / CONTROLS, updated)
    return (f"{folder / CONTROLS}: {sum(len(i) for i in updated.exclude.values())} excluded item(s) for "
            f"{len(updated.exclude)} user(s), {len(updated.forget)} forgotten user(s); the next round and every "
            "answer from now on apply them")
