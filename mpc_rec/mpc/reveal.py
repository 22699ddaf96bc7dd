"""The one place where shared values are opened.

Every opening goes through ``guard_reveal``: the value must be tagged as noised under
the run's noise plan or declared public with a reason (``--no-dp`` runs declare their
outputs public "for benchmarking" and say so in every output). The reveal log records
what was opened, to whom and under which tag.
"""

from __future__ import annotations

from typing import Any

import torch

from mpc_rec.dp.reveal import RevealLog, Tagged, guard_reveal
from mpc_rec.mpc.sharing import row_ranges


def open_to_all(tagged: Tagged, *, name: str, log: RevealLog) -> torch.Tensor:
    shared = guard_reveal(tagged, name=f"{name} (to all parties)", log=log)
    return shared.get_plain_text()


def open_ring_to_all(tagged: Tagged, *, name: str, log: RevealLog) -> torch.Tensor:
    """Like ``open_to_all`` but the exact ring elements (int64, units of 2^-precision):
    decoding to floating point (float32 for shares built from ring elements) would round."""
    shared = guard_reveal(tagged, name=f"{name} (to all parties)", log=log)
    return shared._tensor.reveal()


def open_rows_to_owners(tagged: Tagged, rows_per_party: list[int], rank: int, *, name: str, log: RevealLog) -> torch.Tensor:
    """Open each party's row block to that party alone; returns this party's block."""
    shared = guard_reveal(tagged, name=f"{name} (each party's rows to that party only)", log=log)
    mine = None
    for owner, rows in enumerate(row_ranges(rows_per_party)):
        value = shared[rows].get_plain_text(dst=owner)
        if owner == rank:
            mine = value
    return mine


def log_entries(log: RevealLog) -> list[dict[str, Any]]:
    """The reveal log as JSON-ready records for the run summary."""
    records = []
    for name, tag in log.entries:
        record = {"value": name, "tag": type(tag).__name__}
        record.update({k: v for k, v in vars(tag).items()})
        records.append(record)
    return records
