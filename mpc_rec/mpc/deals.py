"""The dealer's correlations as objects, and rank 0's line to the dealer.

Every party draws its shares of a correlation from the AES stream it shares with the
dealer, in the order the dealer draws them (``mpc.dealer``); rank 0 receives instead
its share of whatever depends non-linearly on the sum. A ``Deal`` is one correlation:
``draw`` takes this party's shares, ``fill`` takes rank 0's part of the dealer's reply.
A ``Bundle`` is several deals drawn together and answered by one request.

The reply to a request need not be read at once. The fused step asks for the next
epoch's bundle at the start of the current one, so the dealer computes it while the
parties compute, instead of rank 0 (and, behind it, everyone) waiting for it. Rank 0
reads every unread reply, oldest first, before it sends another request, so requests
and replies stay in order on the line, and a request never waits behind an unread reply
(with gloo, a send completes only once the peer receives: the two would deadlock).
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch

from mpc_rec.compat import import_crypten
from mpc_rec.errors import PeerError
from mpc_rec.mpc.dealer import MAX_ELEMENTS, partner_shapes
from mpc_rec.mpc.prg import random_ring_elements


def comm() -> Any:
    return import_crypten().communicator.get()


def rank() -> int:
    return comm().get_rank()


def draw(shape: Any) -> torch.Tensor:
    """This party's next draw from the stream it shares with the dealer."""
    from crypten.mpc.provider.ttp_provider import TTPClient

    return random_ring_elements(shape, generator=TTPClient.get().get_generator())


# --- rank 0's line to the dealer ----------------------------------------------------------

_unread: list["Bundle"] = []  # rank 0: bundles whose reply is still on the line, oldest first


def send_request(name: str, args: list[Any], kwargs: dict[str, Any] | None = None) -> None:
    """Send one request to the dealer (rank 0), after reading every reply still unread."""
    read_unread()
    line = comm()
    line.send_obj({"function": name, "device": None, "args": list(args), "kwargs": kwargs or {}},
                  line.get_ttp_rank(), line.ttp_group)


def receive_reply() -> torch.Tensor:
    """The dealer's reply to the oldest unanswered request, its announced size checked first."""
    line = comm()
    dealer = line.get_ttp_rank()
    size = line.recv_obj(dealer, line.ttp_group)
    limit = line.mesh.link(dealer).max_bytes // 8 if hasattr(line, "mesh") else MAX_ELEMENTS
    if (not isinstance(size, (list, tuple)) or len(size) > 8
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in size)
            or math.prod(size) > limit):
        raise PeerError(f"the dealer announced an invalid result size {str(size)[:80]}")
    result = torch.empty(tuple(size), dtype=torch.long)
    line.broadcast(result, dealer, line.ttp_comm_group)
    return result


def read_unread() -> None:
    while _unread:
        _unread.pop(0)._read()


def request(name: str, *args: Any, **kwargs: Any) -> torch.Tensor:
    """A request answered at once."""
    send_request(name, list(args), kwargs)
    return receive_reply()


def ttp_request(self: Any, func_name: str, device: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
    """CrypTen's TTPClient.ttp_request, on this line (installed by crypten_fixes)."""
    if device is not None and torch.device(device).type != "cpu":
        raise ValueError("mpc-rec's dealer serves CPU tensors only")
    return request(func_name, *args, **kwargs)


# --- correlations -----------------------------------------------------------------------------


class Deal(Protocol):
    """One correlation from the dealer: ``request`` names the dealer method and its arguments."""

    request: tuple[str, list[Any]]
    reply_elements: int

    def draw(self) -> None: ...

    def fill(self, reply: torch.Tensor) -> None: ...


class TruncationDeal(Deal):
    """[r], [r >> bits] and [msb(r)] for ``fused.truncate``; segments [[size, bits], ...]."""

    def __init__(self, segments: list[list[int]]):
        self.segments = [[int(n), int(b)] for n, b in segments]
        self.size = sum(n for n, _ in self.segments)
        self.request = ("mf_truncation", [self.segments])
        self.reply_elements = 2 * self.size

    def draw(self) -> None:
        self.r = draw(self.size)
        if rank() != 0:
            self.high, self.msb = draw(self.size), draw(self.size)

    def fill(self, reply: torch.Tensor) -> None:
        self.high, self.msb = reply[: self.size], reply[self.size:]


def product_shape(size0: Any, size1: Any, op: str) -> torch.Size:
    """The shape of ``op`` ("mul" or "matmul") of tensors of these sizes, by torch's rules.

    Computed, not inferred on torch's meta device: that takes 50-100 ms per call here.
    """
    size0, size1 = list(size0), list(size1)
    if op == "mul":
        return torch.Size(_broadcast(size0, size1))
    if op != "matmul" or not size0 or not size1:
        raise ValueError(f"no product shape for {op} of {size0} and {size1}")
    inner0 = size0[-1]
    inner1 = size1[0] if len(size1) == 1 else size1[-2]
    if inner0 != inner1:
        raise ValueError(f"matmul of {size0} and {size1}: inner sizes differ")
    if len(size0) == 1 and len(size1) == 1:
        return torch.Size([])
    if len(size0) == 1:
        return torch.Size(size1[:-2] + size1[-1:])
    if len(size1) == 1:
        return torch.Size(size0[:-1])
    return torch.Size(_broadcast(size0[:-2], size1[:-2]) + [size0[-2], size1[-1]])


def _broadcast(size0: list[int], size1: list[int]) -> list[int]:
    """torch's broadcasting of two shapes (``torch.broadcast_shapes`` imports sympy on its
    first call: half a second, which landed in the first training epoch)."""
    length = max(len(size0), len(size1))
    padded0, padded1 = [1] * (length - len(size0)) + size0, [1] * (length - len(size1)) + size1
    if any(a != b and 1 not in (a, b) for a, b in zip(padded0, padded1)):
        raise ValueError(f"shapes {size0} and {size1} do not broadcast")
    return [b if a == 1 else a for a, b in zip(padded0, padded1)]


class TripleDeal(Deal):
    """A Beaver triple [a], [b], [a op b] for op "mul" or "matmul"."""

    def __init__(self, size0: list[int], size1: list[int], op: str):
        if op not in ("mul", "matmul"):
            raise ValueError(f"no triples for {op!r}")
        self.size0, self.size1, self.op = list(size0), list(size1), op
        self.shape = product_shape(self.size0, self.size1, op)
        self.request = ("additive", [self.size0, self.size1, op])
        self.reply_elements = math.prod(self.shape)

    def draw(self) -> None:
        self.a, self.b = draw(self.size0), draw(self.size1)
        if rank() != 0:
            self.c = draw(self.shape)

    def fill(self, reply: torch.Tensor) -> None:
        self.c = reply.reshape(self.shape)


class MaskProductDeal(Deal):
    """[B] and [A_M * B] for the dealer's kept mask A_M (``fused.MaskedProduct``)."""

    def __init__(self, shape: list[int]):
        self.shape = list(shape)
        self.request = ("mf_mask_product", [self.shape])
        self.reply_elements = math.prod(self.shape)

    def draw(self) -> None:
        self.b = draw(self.shape)
        if rank() != 0:
            self.c = draw(self.shape)

    def fill(self, reply: torch.Tensor) -> None:
        self.c = reply.reshape(self.shape)


class ErrorTripleDeal(Deal):
    """[A] (n x I) with partners [B_j] and [C_j] = [A B_j] or [A^T B_j] (``dealer.py``)."""

    def __init__(self, n: int, i: int, partners: list[list[int]]):
        self.n, self.i, self.partners = n, i, [list(p) for p in partners]
        self.shapes = partner_shapes(n, i, self.partners)
        self.request = ("mf_error_triple", [n, i, self.partners])
        self.reply_elements = sum(math.prod(c) for _, c in self.shapes)

    def draw(self) -> None:
        self.a = draw((self.n, self.i))
        self.bs = [draw(b_shape) for b_shape, _ in self.shapes]
        if rank() != 0:
            self.cs = [draw(c_shape) for _, c_shape in self.shapes]

    def fill(self, reply: torch.Tensor) -> None:
        parts = reply.split([math.prod(c) for _, c in self.shapes])
        self.cs = [part.reshape(c_shape) for part, (_, c_shape) in zip(parts, self.shapes)]


DEALS = {"mf_truncation": TruncationDeal, "additive": TripleDeal, "mf_mask_product": MaskProductDeal,
         "mf_error_triple": ErrorTripleDeal}


def deals_for(requests: list[tuple[str, list[Any]]]) -> list[Deal]:
    return [DEALS[name](*args) for name, args in requests]


class Bundle:
    """Deals drawn together; rank 0's shares come in one reply to ``request``."""

    def __init__(self, deals: list[Deal], request: tuple[str, list[Any]]):
        self.deals, self.request = deals, request
        self._sent = False

    def send(self) -> "Bundle":
        """Every party draws its shares now; rank 0 asks the dealer and reads the reply later."""
        for deal in self.deals:
            deal.draw()
        if rank() == 0:
            send_request(*self.request)
            _unread.append(self)
        self._sent = True
        return self

    def _read(self) -> None:
        reply = receive_reply().flatten()
        expected = [deal.reply_elements for deal in self.deals]
        if reply.numel() != sum(expected):
            raise PeerError(f"the dealer's reply to {self.request[0]} has {reply.numel()} elements, not {sum(expected)}")
        for deal, part in zip(self.deals, reply.split(expected)):
            deal.fill(part)

    def ready(self) -> list[Deal]:
        """The deals, with rank 0's reply read (waiting for the dealer if it is still computing)."""
        if not self._sent:
            raise RuntimeError("a bundle is sent before it is used")
        if self in _unread:
            read_unread()
        return self.deals


def fetch(deal: Deal) -> Deal:
    """One deal, drawn and answered now."""
    Bundle([deal], deal.request).send().ready()
    return deal
