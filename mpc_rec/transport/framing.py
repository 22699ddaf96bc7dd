"""Wire format of the TLS transport: one fixed header per message, then its body.

Everything a peer sends is checked against this module before anything is allocated or
interpreted: the header has a fixed size and layout, the dtype comes from an allow-list,
the body length must equal what the shape and dtype imply and stay under a limit.
Objects travel as JSON (never pickle), so a message cannot carry code.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any

import torch

from mpc_rec.errors import PeerError

MAGIC = b"MPCR"
VERSION = 1
MAX_DIMS = 8
MAX_DIM = 1 << 40  # any single dimension; the byte limit below binds first in practice
MAX_OBJECT_BYTES = 1 << 20  # JSON control messages are small; tensors carry the bulk
_HEADER = struct.Struct(f"<4sBBBBQ{MAX_DIMS}Q")
HEADER_BYTES = _HEADER.size

# Message kinds
TENSOR, OBJECT, HELLO, BYE = 1, 2, 3, 4
KIND_NAMES = {TENSOR: "tensor", OBJECT: "object", HELLO: "hello", BYE: "goodbye"}

# The only element types a peer may send (code on the wire -> torch dtype).
DTYPES: dict[int, torch.dtype] = {
    1: torch.int64, 2: torch.int32, 3: torch.int16, 4: torch.int8, 5: torch.uint8,
    6: torch.float64, 7: torch.float32, 8: torch.bool,
}
DTYPE_CODES = {dtype: code for code, dtype in DTYPES.items()}


@dataclass(frozen=True)
class Header:
    kind: int
    dtype: torch.dtype | None
    shape: tuple[int, ...]
    length: int


def encode_header(kind: int, length: int, dtype: torch.dtype | None = None, shape: tuple[int, ...] = ()) -> bytes:
    if len(shape) > MAX_DIMS:
        raise ValueError(f"tensors of more than {MAX_DIMS} dimensions cannot be sent")
    code = 0 if dtype is None else DTYPE_CODES.get(dtype)
    if code is None:
        raise ValueError(f"dtype {dtype} is not on the transport's allow-list")
    dims = list(shape) + [0] * (MAX_DIMS - len(shape))
    return _HEADER.pack(MAGIC, VERSION, kind, code, len(shape), length, *dims)


def decode_header(raw: bytes | bytearray | memoryview, *, sender: str, max_bytes: int) -> Header:
    """Validate a received header; any inconsistency is the sender's fault (PeerError)."""
    magic, version, kind, code, ndim, length, *dims = _HEADER.unpack(raw)
    if magic != MAGIC:
        raise PeerError(f"{sender} sent bytes that are not an mpc-rec message (bad magic {bytes(magic)!r})")
    if version != VERSION:
        raise PeerError(f"{sender} speaks wire version {version}, this party speaks {VERSION}")
    if kind not in KIND_NAMES:
        raise PeerError(f"{sender} sent an unknown message kind {kind}")
    if kind == TENSOR:
        if code not in DTYPES:
            raise PeerError(f"{sender} sent a tensor with dtype code {code}, which is not allowed")
        if ndim > MAX_DIMS or any(dims[ndim:]):
            raise PeerError(f"{sender} sent a malformed tensor shape")
        shape = tuple(dims[:ndim])
        if any(d > MAX_DIM for d in shape):
            raise PeerError(f"{sender} sent a tensor dimension over {MAX_DIM}")
        dtype = DTYPES[code]
        expected = math.prod(shape) * dtype.itemsize
        if expected > max_bytes:
            raise PeerError(f"{sender} announced a {expected}-byte tensor, over the {max_bytes}-byte limit")
        if length != expected:
            raise PeerError(f"{sender} sent a tensor whose length {length} does not match shape {shape} and {dtype}")
        return Header(kind, dtype, shape, length)
    if code or ndim or any(dims):
        raise PeerError(f"{sender} sent a malformed {KIND_NAMES[kind]} header")
    if length > MAX_OBJECT_BYTES:
        raise PeerError(f"{sender} announced a {length}-byte {KIND_NAMES[kind]}, over the {MAX_OBJECT_BYTES}-byte limit")
    return Header(kind, None, (), length)


def _plain(value: Any) -> Any:
    """Tuples and torch.Size become lists; anything JSON cannot say is refused here, locally."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise TypeError("only string keys can be sent")
        return {k: _plain(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot send a {type(value).__name__} as an object (JSON only)")


def encode_object(value: Any) -> bytes:
    payload = json.dumps(_plain(value), separators=(",", ":"), allow_nan=False).encode()
    if len(payload) > MAX_OBJECT_BYTES:
        raise ValueError(f"object of {len(payload)} bytes is over the {MAX_OBJECT_BYTES}-byte limit")
    return payload


def decode_object(payload: bytes | bytearray, *, sender: str) -> Any:
    try:
        return json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise PeerError(f"{sender} sent an object that is not valid JSON") from None


def expect_tensor(received: torch.Tensor, like: torch.Tensor, *, sender: str) -> torch.Tensor:
    """A received tensor must have the dtype and element count the receiver expects.

    Shapes may differ only as gloo allows (CrypTen sends a 0-d seed into a 1-element
    buffer); the result always takes the receiver's shape.
    """
    if received.dtype != like.dtype or received.numel() != like.numel():
        raise PeerError(f"{sender} sent a {received.dtype} tensor of shape {tuple(received.shape)}; "
                        f"expected {like.dtype} of shape {tuple(like.shape)}")
    return received.reshape(like.shape)
