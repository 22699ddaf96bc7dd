"""Attacks on one party's view, and the search for plaintext in everything a party holds.

Reconstruction: the first training step multiplies the shared rating mask M (integer,
n x I) by the shared score matrix S and then multiplies the error E = M * S - R. Each
Beaver product opens X - A to everyone. A party that knows the whole mask A (CrypTen's
TFP provider lets party 0 draw every triple) gets X = (X - A) + A, hence M, S and E, and
R = M * S - E on rated entries: every other party's ratings. Under the TTP dealer a
party knows only its own share of A and the same arithmetic yields noise.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mpc_rec.audit.transcript import Transcript, sample_positions
from mpc_rec.audit.views import unmasked_values

SCALE = 2.0**16


@dataclass
class Reconstruction:
    attacker: int
    found_mask: bool
    mask_accuracy: float  # on other parties' rows (sampled positions)
    rating_accuracy: float  # exact recoveries among other parties' rated entries
    positions: int
    rated: int

    @property
    def succeeded(self) -> bool:
        return self.found_mask and self.mask_accuracy > 0.99 and self.rating_accuracy > 0.9


def reconstruct_inputs(transcript: Transcript, ratings: np.ndarray, mask: np.ndarray, own_rows: slice) -> Reconstruction:
    """Run the attack on one party's transcript; score it against the true joint inputs."""
    shape = list(mask.shape)
    pairs = unmasked_values(transcript)
    start = None
    for k, (record, x, _) in enumerate(pairs):
        if record.get("operation") == "mul" and record["shape"] == shape and x.size and x.max() <= 1:
            start = k
            break
    if start is None:
        return Reconstruction(transcript.rank, False, 0.0, 0.0, 0, 0)
    record, m_hat, s_hat = pairs[start]
    error = next(((rec, x) for rec, x, _ in pairs[start + 1:] if rec["shape"] in (shape, shape[::-1])), None)
    positions = sample_positions(mask.size, record["stored"])
    flat = np.arange(mask.size) if positions is None else positions
    rows = flat // mask.shape[1]
    others = (rows < own_rows.start) | (rows >= own_rows.stop)
    true_mask = mask.reshape(-1)[flat]
    mask_accuracy = float((m_hat.astype(np.int64)[others] == true_mask[others]).mean()) if others.any() else 0.0
    rating_accuracy = 0.0
    rated = others & (true_mask == 1)
    if error is not None and rated.any():
        err_record, e_values = error
        e = e_values.view(np.int64).astype(np.float64) / SCALE
        if err_record["shape"] != shape:  # E^T was opened: bring it back to row-major n x I
            e = e.reshape(shape[::-1]).T.reshape(-1) if not err_record["sampled"] else np.full(len(flat), np.nan)
        s = s_hat.view(np.int64).astype(np.float64) / SCALE
        r_hat = m_hat.view(np.int64) * s - e
        truth = ratings.reshape(-1)[flat]
        rating_accuracy = float((np.abs(r_hat[rated] - truth[rated]) < 0.01).mean())
    return Reconstruction(transcript.rank, True, mask_accuracy, rating_accuracy, int(others.sum()), int(rated.sum()))


# ------------------------------------------------------------------ plaintext search
@dataclass
class Finding:
    where: str
    what: str


@dataclass
class LeakageScan:
    files: int = 0
    messages: int = 0
    findings: list[Finding] = field(default_factory=list)


def exact_aggregates_in_transcript(transcript: Transcript, aggregates: dict[str, np.ndarray], scan: LeakageScan) -> None:
    """Flag any received tensor that equals an un-noised aggregate (fixed point or integer)."""
    for record in transcript.messages():
        scan.messages += 1
        raw = transcript.values(record).astype(np.float64)
        for name, target in aggregates.items():
            flat = np.asarray(target, dtype=np.float64).reshape(-1)
            if record["nelement"] != flat.size or record["sampled"]:
                continue
            candidates = (target, np.asarray(target).T) if np.ndim(target) == 2 else (target,)
            for candidate in candidates:
                want = np.asarray(candidate, dtype=np.float64).reshape(-1)
                for decoded in (raw / SCALE, raw):
                    tolerance = 1e-3 * max(1.0, float(np.abs(want).max()))
                    if np.allclose(decoded, want, atol=tolerance, rtol=0):
                        scan.findings.append(Finding(f"transcript rank {transcript.rank}, message {record['seq']} "
                                                     f"({record['phase']}, {record['op']})", f"un-noised {name}"))
                        break


_ROW = re.compile(r"([^\s,;\"']+)[,\t ]+([^\s,;\"']+)[,\t ]+(\d+(?:\.\d+)?)")
_NUMBER = re.compile(r"-?\d+\.\d+(?:[eE][-+]?\d+)?")


def scan_text_file(path: Path, *, foreign_rows: set[tuple[str, str, float]], foreign_users: set[str],
                   scalars: dict[str, float], scan: LeakageScan) -> None:
    """Rating rows and user ids of other parties, and un-noised scalar aggregates, in one file."""
    scan.files += 1
    text = path.read_text(encoding="utf-8", errors="replace")
    for match in _ROW.finditer(text):
        user, item, value = match.group(1), match.group(2), float(match.group(3))
        if (user, item, value) in foreign_rows:
            scan.findings.append(Finding(str(path), f"another party's rating row {user},{item},{value:g}"))
            break
    if path.suffix == ".csv" and path.name == "recommendations.csv":
        users = {line.split(",")[0] for line in text.splitlines()[1:] if line}
        leaked = sorted(users & foreign_users)
        if leaked:
            scan.findings.append(Finding(str(path), f"recommendations for {len(leaked)} users of other parties"))
    elif path.suffix == ".json":
        strings = _json_strings(json.loads(text))
        leaked = sorted(strings & foreign_users)
        if leaked:
            scan.findings.append(Finding(str(path), f"user ids of other parties: {', '.join(leaked[:5])}"))
    for match in _NUMBER.finditer(text):
        number = float(match.group(0))
        for name, value in scalars.items():
            # scalars as printed (4 digits in logs) or stored: relative agreement to 1e-4
            if value != 0 and math.isfinite(number) and abs(number - value) <= 1e-4 * abs(value) + 5e-5:
                scan.findings.append(Finding(str(path), f"un-noised {name} {value:.6g} (written as {match.group(0)})"))


def _json_strings(value: Any) -> set[str]:
    if isinstance(value, str):
        return {value}
    if isinstance(value, dict):
        return set().union(*(_json_strings(v) for v in value.values()), set(map(str, value)))
    if isinstance(value, list):
        return set().union(set(), *(_json_strings(v) for v in value))
    return set()
