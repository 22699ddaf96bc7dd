"""Input sharing: each party secret-shares only its own rows; public metadata is agreed.

What each party discloses in the clear: its number of users (the row count of its block)
and digests of the public run parameters. Everything else enters as secret shares.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

from mpc_rec.compat import import_crypten
from mpc_rec.errors import PeerError


def _digest64(value: Any) -> int:
    payload = json.dumps(value, sort_keys=True, separators=(",", ":")).encode()
    return int.from_bytes(hashlib.sha256(payload).digest()[:8], "big", signed=True)


def agree(comm: Any, local_rows: int, public: dict[str, Any]) -> list[int]:
    """Exchange row counts and check every party holds the same public parameters.

    Returns the row count of every party, in rank order. Each public entry is compared
    through a 64-bit digest so a mismatch can name what differs without sending it.
    """
    names = sorted(public)
    mine = torch.tensor([local_rows] + [_digest64(public[n]) for n in names], dtype=torch.long)
    gathered = comm.all_gather(mine)
    for rank, theirs in enumerate(gathered):
        for name, a, b in zip(names, mine[1:].tolist(), theirs[1:].tolist()):
            if a != b:
                raise PeerError(
                    f"party {rank} disagrees on '{name}': the parties must use the same "
                    f"{name.replace('_', ' ')}"
                )
    return [int(t[0]) for t in gathered]


def share_rows(
    local_block: torch.Tensor, rows_per_party: list[int], rank: int, *, precision: int | None = None
) -> Any:
    """Stack every party's private row block into one secret-shared matrix (rank order).

    Party p's block is shared from p alone; the others only learn its shape.
    """
    crypten = import_crypten()
    columns = local_block.shape[1:]
    parts = []
    for owner, rows in enumerate(rows_per_party):
        block = local_block if owner == rank else torch.zeros((rows, *columns), dtype=local_block.dtype)
        parts.append(crypten.cryptensor(block, src=owner, precision=precision))
    return crypten.cat(parts, dim=0)


def share_public(value: torch.Tensor) -> Any:
    """A public value (the same on every party) as a sharing, e.g. the model's start."""
    return import_crypten().cryptensor(value, src=0)


def row_ranges(rows_per_party: list[int]) -> list[slice]:
    starts = [sum(rows_per_party[:p]) for p in range(len(rows_per_party))]
    return [slice(s, s + n) for s, n in zip(starts, rows_per_party)]
