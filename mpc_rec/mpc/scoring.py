"""Secure scoring: top-k indices and the test MSE, computed on shares (opened in mpc.reveal).

Top-k runs k rounds of a secure one-hot argmax over each user's item scores. Keys are
made unique (score, then item index), so "key >= row maximum" marks exactly one item:
no equality test and no random tie-breaking (CrypTen's argmax spends most of its
comparisons on those). Items the user rated in training are pushed below every
candidate before the first round.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from mpc_rec.compat import import_crypten
from mpc_rec.model import ModelState, predictions, squared_error_sum
from mpc_rec.mpc.training import divide

# Scores of observed-rating models stay within a few units of the rating scale; these
# offsets exceed any such score, so excluded and already-picked items sink to the bottom.
_EXCLUDED_OFFSET = 1_000
_PICKED_OFFSET = 4 * _EXCLUDED_OFFSET


def secure_top_k(state: ModelState, mean: Any, exclude_mask: Any, k: int) -> Any:
    """Item indices (users x k, best first) as a sharing; nothing is revealed here."""
    n_items = exclude_mask.size(1)
    index_bits = max(1, math.ceil(math.log2(n_items)))
    scores = predictions(state, mean) - exclude_mask * _EXCLUDED_OFFSET
    # key = score * 2^b + index / 2^16: ordered by score at 2^-16 resolution, ties
    # broken by item index, so every key in a row is distinct.
    tie_break = torch.arange(n_items, dtype=torch.float64) / 2**16
    keys = scores * (2**index_bits) + tie_break
    index_values = torch.arange(n_items, dtype=torch.float64)
    picks = []
    for _ in range(k):
        one_hot = keys >= _row_maximum(keys).unsqueeze(1)
        picks.append((one_hot * index_values).sum(1))
        keys = keys - one_hot * (_PICKED_OFFSET * 2**index_bits)
    return _stack(picks)


def _row_maximum(keys: Any) -> Any:
    """Maximum of each row by a tournament: ceil(log2 I) rounds, I - 1 comparisons a row."""
    crypten = import_crypten()
    while keys.size(1) > 1:
        half = keys.size(1) // 2
        left, right, rest = keys[:, :half], keys[:, half:2 * half], keys[:, 2 * half:]
        larger = right + (left >= right) * (left - right)
        keys = crypten.cat([larger, rest], dim=1) if rest.size(1) else larger
    return keys[:, 0]


def _stack(columns: list[Any]) -> Any:
    return import_crypten().stack(columns, dim=1)


def secure_mse(state: ModelState, mean: Any, test_ratings: Any, test_mask: Any) -> Any:
    """Exact mean squared test error, as a sharing (opened only through mpc.reveal)."""
    n_users, n_items = test_mask.size()
    sse = squared_error_sum(state, mean, test_ratings, test_mask)
    return divide(sse, test_mask.sum(), count_max=n_users * n_items)
