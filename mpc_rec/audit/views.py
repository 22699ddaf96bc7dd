"""Statistics on party views: uniformity, independence, and a trained distinguisher.

A secure view consists of ring elements X - A with fresh uniform masks A (and dealer
corrections, equally uniform), so every byte and bit of every such message is uniform,
consecutive values are independent, nothing correlates with the inputs, and no classifier
can tell which of two same-shaped inputs produced a view. Messages of the agreement
phase (public digests) and of the declared reveals are excluded: those are outputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

from mpc_rec.audit.transcript import Transcript

NOT_MASKED = ("agreement", "evaluation-reveal", "top-k-reveal")
_CHUNK = 64  # values per distinguisher sample


def masked_messages(transcript: Transcript) -> list[dict[str, Any]]:
    """Received messages that the protocols say carry only masked values."""
    return [r for r in transcript.messages() if not r["phase"].startswith(NOT_MASKED) and r["dtype"] == "int64"]


def view_values(transcript: Transcript, records: list[dict[str, Any]] | None = None) -> np.ndarray:
    records = masked_messages(transcript) if records is None else records
    parts = [transcript.values(r).view(np.uint64) for r in records]
    return np.concatenate(parts) if parts else np.zeros(0, np.uint64)


def split_domains(transcript: Transcript) -> tuple[np.ndarray, np.ndarray]:
    """Masked values over the whole ring, and masked single bits.

    Arithmetic openings are uniform on Z_2^64; the B2A step of a comparison opens
    x XOR r for one random bit r, uniform on {0, 1}. A message is taken as a bit
    message when every value is 0 or 1 (a ring-uniform message of m values does so
    with probability 2^-63m); its bits are then tested for balance, so a leaked 0/1
    plaintext (the rating mask, say) still shows.
    """
    ring, bits = [], []
    for record in masked_messages(transcript):
        values = transcript.values(record).view(np.uint64)
        (bits if values.size and values.max() <= 1 else ring).append(values)
    join = lambda parts: np.concatenate(parts) if parts else np.zeros(0, np.uint64)  # noqa: E731
    return join(ring), join(bits)


def bit_balance(bits: np.ndarray) -> tuple[float, float]:
    """p-values: share of ones is 1/2 (binomial), and disjoint pairs are independent."""
    n = len(bits)
    if n < 200:  # too few opened bits to test
        return 1.0, 1.0
    ones = int(bits.sum())
    balance = float(stats.binomtest(ones, n, 0.5).pvalue)
    b = bits.astype(np.int64)
    table = np.zeros((2, 2))
    np.add.at(table, (b[:-1:2], b[1::2]), 1)
    serial = float(stats.chi2_contingency(table, correction=False).pvalue) if table.min() > 0 else 0.0
    return balance, serial


def unmasked_values(transcript: Transcript) -> list[tuple[dict[str, Any], np.ndarray, np.ndarray]]:
    """Openings of Beaver products combined with this party's own draws for that triple.

    Returns (opening record, x + (own a), y + (own b)): the operands themselves when the
    party drew the whole masks (TFP party 0), uniform noise when it holds only shares.
    """
    records = transcript.records
    pairs = []
    i = 0
    while i < len(records):
        record = records[i]
        if record["kind"] == "local-triple" and record["part"] == 0 and i + 1 < len(records):
            a_rec, b_rec = record, records[i + 1]
            for j in range(i + 2, min(i + 12, len(records) - 1)):
                eps, delta = records[j], records[j + 1]
                if (eps["kind"] == "message" and eps["op"] == "all_reduce" and eps["part"] == 0
                        and delta["part"] == 1 and eps["shape"] == a_rec["shape"] and delta["shape"] == b_rec["shape"]):
                    x = transcript.values(eps).view(np.uint64) + transcript.values(a_rec).view(np.uint64)
                    y = transcript.values(delta).view(np.uint64) + transcript.values(b_rec).view(np.uint64)
                    pairs.append((dict(eps, operation=a_rec.get("operation")), x, y))
                    i = j
                    break
        i += 1
    return pairs


@dataclass
class Uniformity:
    values: int
    byte_p: float  # chi-square over 8 byte positions x 256 values, smallest p times 8
    bit_p: float  # per-bit-position frequency, smallest p times 64
    low_magnitude: int  # |value| < 2^32 as a signed ring element
    low_magnitude_expected: float
    low_magnitude_p: float
    byte_histogram: np.ndarray  # 8 x 256 counts

    @property
    def p_value(self) -> float:
        return min(self.byte_p, self.bit_p, self.low_magnitude_p)


def uniformity(values: np.ndarray) -> Uniformity:
    as_bytes = values.astype("<u8").view(np.uint8).reshape(-1, 8)
    histogram = np.stack([np.bincount(as_bytes[:, k], minlength=256) for k in range(8)])
    n = len(values)
    byte_p = 1.0
    if n >= 256 * 5:
        byte_p = min(1.0, 8 * min(stats.chisquare(histogram[k]).pvalue for k in range(8)))
    bits = np.unpackbits(as_bytes, axis=1, bitorder="little").sum(axis=0)  # 64 positions
    z = (bits - n / 2) / math.sqrt(max(n, 1) / 4)
    bit_p = min(1.0, 64 * float(2 * stats.norm.sf(np.abs(z)).min())) if n else 1.0
    signed = values.view(np.int64)
    low = int(np.count_nonzero(np.abs(signed.astype(np.float64)) < 2.0**32))
    expected = n * 2.0**-31
    low_p = float(stats.poisson.sf(low - 1, expected)) if low else 1.0
    return Uniformity(n, byte_p, bit_p, low, expected, low_p, histogram)


def serial_independence(values: np.ndarray) -> float:
    """Top nibbles of consecutive values: chi-square test of a 16 x 16 contingency table."""
    if len(values) < 16 * 16 * 10:
        return 1.0
    top = (values >> np.uint64(60)).astype(np.int64)
    table = np.zeros((16, 16))
    np.add.at(table, (top[:-1:2], top[1::2]), 1)  # disjoint pairs: independent samples
    return float(stats.chi2_contingency(table, correction=False).pvalue)


def input_correlation(transcript: Transcript, joint_inputs: list[np.ndarray]) -> float:
    """p-value that masked messages shaped like an input matrix correlate with it (Fisher z)."""
    zs = []
    for record in masked_messages(transcript):
        for matrix in joint_inputs:
            if tuple(record["shape"]) in (matrix.shape, matrix.T.shape):
                target = matrix if tuple(record["shape"]) == matrix.shape else matrix.T
                flat = target.reshape(-1)
                if record["sampled"]:
                    from mpc_rec.audit.transcript import sample_positions

                    flat = flat[sample_positions(flat.size, record["stored"])]
                u = transcript.values(record).astype(np.float64) / 2.0**63
                if flat.std() == 0 or len(u) < 10:
                    continue
                r = np.corrcoef(u, flat)[0, 1]
                zs.append(np.arctanh(np.clip(r, -0.999999, 0.999999)) * math.sqrt(len(u) - 3))
    if not zs:
        return 1.0
    combined = sum(zs) / math.sqrt(len(zs))
    return float(2 * stats.norm.sf(abs(combined)))


def features(values: np.ndarray) -> np.ndarray:
    """Per chunk of 64 values: bit frequencies, top-byte histogram, spread of the value."""
    usable = len(values) // _CHUNK * _CHUNK
    chunks = values[:usable].reshape(-1, _CHUNK)
    as_bytes = chunks.astype("<u8").view(np.uint8).reshape(len(chunks), _CHUNK, 8)
    bits = np.unpackbits(as_bytes, axis=2, bitorder="little").mean(axis=1)  # chunks x 64
    top = as_bytes[:, :, 7] >> 4
    top_hist = np.stack([(top == v).mean(axis=1) for v in range(16)], axis=1)
    u = chunks.view(np.int64).astype(np.float64) / 2.0**63
    spread = np.stack([u.mean(axis=1), u.std(axis=1), np.abs(u).mean(axis=1)], axis=1)
    return np.concatenate([bits, top_hist, spread], axis=1)


@dataclass
class Distinguisher:
    accuracy: float
    low: float
    high: float
    test_samples: int
    train_samples: int

    @property
    def at_chance(self) -> bool:
        return self.low <= 0.5 <= self.high or self.high < 0.5


def wilson(successes: int, n: int, confidence: float = 0.99) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    z = stats.norm.ppf(0.5 + confidence / 2)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def distinguish(values_a: np.ndarray, values_b: np.ndarray, *, max_samples: int = 20_000, seed: int = 0) -> Distinguisher:
    """Logistic regression telling view A from view B; accuracy on held-out chunks, 99% Wilson CI."""
    rng = np.random.default_rng(seed)
    fa, fb = features(values_a), features(values_b)
    count = min(len(fa), len(fb), max_samples)
    if count < 20:
        return Distinguisher(0.5, 0.0, 1.0, 0, 0)
    fa, fb = fa[rng.choice(len(fa), count, replace=False)], fb[rng.choice(len(fb), count, replace=False)]
    x = np.concatenate([fa, fb])
    y = np.concatenate([np.zeros(count), np.ones(count)])
    order = rng.permutation(len(x))
    x, y = x[order], y[order]
    half = len(x) // 2
    mean, std = x[:half].mean(axis=0), x[:half].std(axis=0) + 1e-12
    x = (x - mean) / std
    weights = _fit_logistic(x[:half], y[:half])
    logits = np.c_[x[half:], np.ones(len(x) - half)] @ weights
    correct = int(((logits > 0) == (y[half:] == 1)).sum())
    n_test = len(x) - half
    low, high = wilson(correct, n_test)
    return Distinguisher(correct / n_test, low, high, n_test, half)


def _fit_logistic(x: np.ndarray, y: np.ndarray, *, l2: float = 1e-2, steps: int = 25) -> np.ndarray:
    """Newton's method on the L2-regularised log loss (features standardised)."""
    design = np.c_[x, np.ones(len(x))]
    w = np.zeros(design.shape[1])
    for _ in range(steps):
        p = 1 / (1 + np.exp(-np.clip(design @ w, -30, 30)))
        gradient = design.T @ (p - y) / len(y) + l2 * w
        hessian = (design * (p * (1 - p))[:, None]).T @ design / len(y) + l2 * np.eye(len(w))
        w -= np.linalg.solve(hessian, gradient)
    return w
