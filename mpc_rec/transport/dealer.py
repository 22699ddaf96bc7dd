"""The TTP dealer over the TLS transport.

CrypTen's ``TTPServer`` talks to torch.distributed directly and runs whatever function
name party 0 sends (``getattr(self, function)``). Here the same dealer class (CrypTen's
tuple arithmetic plus mpc-rec's own requests, ``mpc_rec.mpc.dealer``) is served over the
TLS communicator, and a request is checked first: the function must be one CrypTen lists
in ``TTP_FUNCTIONS`` or a public method the dealer class itself defines (so new dealer
requests are served without touching this module); arguments may only be integers,
lists of them (sizes, segments), and the names of torch's product operations; every
flat list of integers is bounded as a size before anything is allocated.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch

from mpc_rec.errors import PeerError
from mpc_rec.transport.communicator import TlsCommunicator

PRODUCT_OPS = frozenset({"mul", "matmul", "conv1d", "conv2d", "conv_transpose1d", "conv_transpose2d"})
_MAX_DIMS = 8
_MAX_ITEMS = 4096


def _check_argument(value: Any, limit: int, where: str) -> Any:
    if isinstance(value, bool):
        raise PeerError(f"{where}: booleans are not dealer arguments")
    if isinstance(value, int):
        if not -(2**31) <= value < 2**31:
            raise PeerError(f"{where}: integer argument out of range")
        return value
    if isinstance(value, str):
        if value not in PRODUCT_OPS:
            raise PeerError(f"{where}: '{value[:40]}' is not a product the dealer computes")
        return value
    if isinstance(value, list) and value and all(isinstance(v, list) for v in value):
        # e.g. truncation segments [[count, bits], ...]: integer tuples, each bounded; the
        # dealer method that receives them checks what they mean.
        if len(value) > _MAX_ITEMS or not all(len(v) <= _MAX_DIMS and all(
                isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= limit for d in v) for v in value):
            raise PeerError(f"{where}: malformed list argument")
        return value
    if isinstance(value, list):
        if len(value) > _MAX_DIMS or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d for d in value):
            raise PeerError(f"{where}: a size must be a list of at most {_MAX_DIMS} non-negative integers")
        if math.prod(value) > limit:
            raise PeerError(f"{where}: size {value} is over the message limit")
        return torch.Size(value)
    raise PeerError(f"{where}: argument of type {type(value).__name__} not accepted")


def checked_request(message: Any, functions: list[str], limit: int, sender: str) -> tuple[str, list[Any], dict[str, Any]]:
    where = f"dealer request from {sender}"
    if not isinstance(message, dict) or set(message) != {"function", "device", "args", "kwargs"}:
        raise PeerError(f"{where}: not a request")
    function = message["function"]
    if function not in functions:
        raise PeerError(f"{where}: '{str(function)[:40]}' is not a dealer function")
    if message["device"] not in (None, "cpu"):
        raise PeerError(f"{where}: device {str(message['device'])[:40]} not served")
    if not isinstance(message["args"], list) or not isinstance(message["kwargs"], dict):
        raise PeerError(f"{where}: malformed arguments")
    args = [_check_argument(a, limit, where) for a in message["args"]]
    kwargs = {k: _check_argument(v, limit, where) for k, v in message["kwargs"].items()}
    return function, args, kwargs


def served_functions(server_class: type) -> list[str]:
    """CrypTen's tuple requests and the public methods the dealer class adds to them."""
    from crypten.mpc.provider import ttp_provider

    added = [name for klass in server_class.__mro__ if klass is not ttp_provider.TTPServer
             and issubclass(klass, ttp_provider.TTPServer)
             for name, value in vars(klass).items() if callable(value) and not name.startswith("_")]
    return list(ttp_provider.TTP_FUNCTIONS) + added


def serve(server_class: type) -> None:
    """Serve party 0's requests until it says "terminate"; CrypTen must be initialised here.

    ``server_class``: CrypTen's TTPServer or a subclass; its request methods are used, its
    own loop (torch.distributed, pickle) is not.
    """
    from mpc_rec.mpc import prg

    comm = TlsCommunicator.get()
    parties = comm.get_world_size()
    functions = served_functions(server_class)
    server = server_class.__new__(server_class)
    server.device = "cpu"
    server.generators = [torch.Generator(device="cpu") for _ in range(parties)]
    server.generators_cuda = [None] * parties
    for rank, generator in enumerate(server.generators):
        key = os.urandom(32)
        prg.bind_key(generator, key)
        comm.send_key(key, rank)
    limit = comm.mesh.link(0).max_bytes // 8
    sender = comm.mesh.link(0).name
    while True:
        message = comm.recv_obj(0, comm.ttp_group)
        if message == "terminate":
            return
        function, args, kwargs = checked_request(message, functions, limit, sender)
        try:
            result = getattr(server, function)(*args, **kwargs)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise PeerError(f"dealer request from {sender} cannot be served: {str(exc).splitlines()[0][:120]}") from None
        comm.send_obj(list(result.size()), 0, comm.ttp_group)
        comm.broadcast(result, comm.get_ttp_rank(), comm.ttp_comm_group)
