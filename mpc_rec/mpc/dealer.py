"""The dealer's correlated randomness for the fused training step (see protocols/dealer.md).

Client and server draw from the same per-party AES-CTR streams in the same order, as
CrypTen's own TTP tuples do: every quantity is drawn from party 0's stream, then party
1's, ...; each party draws its own share of each quantity in that order; rank 0 receives
its share of whatever depends non-linearly on the sum (it cannot be drawn). The request
names below are the wire names of the dealer protocol.

- ``mf_mask_setup``: a random sharing [A] that the dealer keeps for the whole run, so the
  training mask M is opened once as M - A and every epoch's M * X needs only X - B opened.
- ``mf_mask_product``: fresh [B] and [A * B] for that kept A.
- ``mf_truncation``: [r], [r >> bits] (logical shift) and [msb(r)] for exact truncation
  with one opening (``fused.truncate``).
- ``mf_error_triple``: one [A] (n x I) with any number of partners [B_j], [C_j] where
  C_j = A B_j or A^T B_j, so one opening of E - A serves every product with E.
- ``mf_epoch``: every correlation of one fused training epoch (``epoch_requests``), in
  order, answered by one reply; party 0 asks for the next epoch's at the start of the
  current one, so the dealer computes it while the parties compute (``mpc.deals``).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from mpc_rec.errors import PeerError
from mpc_rec.mpc import ring
from mpc_rec.mpc.prg import random_ring_elements

# Bound the dealer's work per request: a party (rank 0) asks, the dealer obeys only sizes
# it can serve in memory. 2^28 int64 elements = 2 GiB.
MAX_ELEMENTS = 2**28


def _elements(shape: Any) -> int:
    dims = [int(d) for d in shape]
    if any(d < 0 for d in dims) or math.prod(dims) > MAX_ELEMENTS:
        raise PeerError(f"dealer: refused a request for shape {dims} (limit {MAX_ELEMENTS} elements)")
    return math.prod(dims)


def truncation_correlation(r: torch.Tensor, bits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(r >> bits as unsigned, msb(r)) for ring elements r stored as int64."""
    return (r >> bits) & ((1 << (64 - bits)) - 1), (r < 0).to(torch.int64)


def partner_shapes(n: int, i: int, partners: list[list[int]]) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """(shape of B_j, shape of C_j) for partners [transposed, columns]."""
    shapes = []
    for transposed, cols in partners:
        shapes.append(((n, cols), (i, cols)) if transposed else ((i, cols), (n, cols)))
    return shapes


def epoch_requests(n: int, i: int, k: int, private: bool, shared_items: bool) -> list[tuple[str, list[Any]]]:
    """The dealer requests of one fused epoch (``fused.FusedStep.epoch``), in the order it uses them.

    n users, i items, k factors; ``private``: the differentially private item side (E
    goes to the hook instead of E^T P); ``shared_items``: item counts are shared, so the
    count-weighted penalty multiplies the item side too.
    """
    parameters = [n * k, i * k, n, i]
    weighted = n * k + n + (i * k + i if shared_items else 0)
    requests: list[tuple[str, list[Any]]] = [
        ("mf_truncation", [[[n * k, 2], [i * k, 2]]]),  # P, Q to 2^14
        ("additive", [[n, k], [k, i], "matmul"]),  # P Q^T
        ("mf_mask_product", [[n, i]]),  # M * pred
        ("mf_error_triple", [n, i, [[0, k]] if private else [[0, k], [1, k]]]),  # E Q (, E^T P)
        ("mf_truncation", [[[n * k, 28], [n, 28]] if private else [[size, 28] for size in parameters]]),
    ]
    if private:
        requests.append(("mf_truncation", [[[n * i, 12]]]))  # E to 2^16 for the hook
    requests += [
        ("additive", [[weighted], [weighted], "mul"]),  # count-weighted penalty
        ("mf_truncation", [[[size, 16] for size in parameters]]),  # velocity
        ("mf_truncation", [[[size, 16] for size in parameters]]),  # parameters
    ]
    return requests


def make_server_class() -> type:
    """CrypTen's TTPServer plus the fused-step requests (import CrypTen lazily)."""
    from crypten.mpc.provider import TTPServer

    ring.warm_up()

    class FusedDealer(TTPServer):
        _kept_mask: torch.Tensor | None = None

        def _get_additive_PRSS(self, size: Any, remove_rank: bool = False) -> torch.Tensor:
            """The sum of every party's draw (rank 0's left out with remove_rank), summed in place."""
            generators = self._get_generators(device=self.device)[1 if remove_rank else 0:]
            total = random_ring_elements(size, generator=generators[0])
            for generator in generators[1:]:
                total += random_ring_elements(size, generator=generator)
            return total

        def _share_zero_for_rank0(self, value: torch.Tensor) -> torch.Tensor:
            value -= self._get_additive_PRSS(value.size(), remove_rank=True)
            return value

        def additive(self, size0: Any, size1: Any, op: str, *args: Any, **kwargs: Any) -> torch.Tensor:
            """CrypTen's triple request; the users x items matmul of P Q^T runs in a ring kernel."""
            if op != "matmul" or len(size0) != 2 or len(size1) != 2 or args or kwargs:
                return super().additive(size0, size1, op, *args, **kwargs)
            _elements([size0[0], size1[1]])
            a = self._get_additive_PRSS(size0)
            b = self._get_additive_PRSS(size1)
            return self._share_zero_for_rank0(torch.from_numpy(ring.wide_product(a.numpy(), b.numpy())))

        def mf_mask_setup(self, shape: list[int]) -> torch.Tensor:
            _elements(shape)
            self._kept_mask = self._get_additive_PRSS(torch.Size(shape))
            return torch.empty(0, dtype=torch.int64)

        def mf_mask_product(self, shape: list[int]) -> torch.Tensor:
            _elements(shape)
            if self._kept_mask is None or list(self._kept_mask.shape) != list(shape):
                raise PeerError(f"dealer: mask product for shape {list(shape)} without a matching mask set-up")
            b = self._get_additive_PRSS(torch.Size(shape))
            return self._share_zero_for_rank0(self._kept_mask * b)

        def mf_truncation(self, segments: list[list[int]]) -> torch.Tensor:
            if not segments or any(len(s) != 2 or not 1 <= s[1] <= 60 for s in segments):
                raise PeerError(f"dealer: malformed truncation request {segments!r:.80}")
            size = _elements([sum(s[0] for s in segments)])
            bits = torch.cat([torch.full((int(n),), int(b), dtype=torch.int64) for n, b in segments])
            high, msb = truncation_correlation(self._get_additive_PRSS(torch.Size([size])), bits)
            return torch.cat([self._share_zero_for_rank0(high), self._share_zero_for_rank0(msb)])

        def mf_error_triple(self, n: int, i: int, partners: list[list[int]]) -> torch.Tensor:
            _elements([n, i])
            shapes = partner_shapes(n, i, partners)
            for b_shape, _ in shapes:
                _elements(b_shape)
            a = self._get_additive_PRSS(torch.Size([n, i]))
            bs = [self._get_additive_PRSS(torch.Size(b_shape)) for b_shape, _ in shapes]
            if [p[0] for p in partners] in ([0], [0, 1]):  # the training step's E Q (and E^T P): one pass
                products = [torch.from_numpy(c) for c in ring.mask_products(a.numpy(), *(b.numpy() for b in bs))]
            else:
                products = [(a.t() if p[0] else a).matmul(b) for p, b in zip(partners, bs)]
            return torch.cat([self._share_zero_for_rank0(c).flatten() for c in products])

        def mf_epoch(self, n: int, i: int, k: int, private: int, shared_items: int) -> torch.Tensor:
            if private not in (0, 1) or shared_items not in (0, 1) or min(n, i, k) < 1:
                raise PeerError(f"dealer: malformed epoch request {[n, i, k, private, shared_items]}")
            _elements([n, i, 4])  # what one epoch's correlations hold, at most
            parts = [getattr(self, name)(*args).flatten()
                     for name, args in epoch_requests(n, i, k, bool(private), bool(shared_items))]
            return torch.cat(parts)

    return FusedDealer
