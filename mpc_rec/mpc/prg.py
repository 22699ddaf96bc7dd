"""AES-256-CTR in place of torch's Mersenne Twister for every CrypTen random tensor.

CrypTen draws shares, zero-sharings and dealer tuples with ``torch.randint`` on seeded
``torch.Generator`` objects. Mersenne Twister is not a cryptographic generator: its
state can be recovered from its outputs. ``install()`` replaces CrypTen's two sampling
functions so that each generator becomes an AES-256-CTR keystream (about 3x faster
here, too). Keys:
- a party's private ("local") generator: a fresh 256-bit key from the OS;
- generators shared with a peer or the dealer: SHA-256 of the 64-bit seed CrypTen
  exchanged. Their strength is therefore that of the 64-bit seed, which CrypTen also
  sends over the (unencrypted) transport; the TLS transport instead agrees a 256-bit key
  per shared generator over its authenticated channel (``bind_key``).
Parties that share a seed make the same draws in the same order (CrypTen relies on that
already), so their keystreams stay in step.
"""

from __future__ import annotations

import hashlib
import math
import os
from typing import Any

import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from mpc_rec.compat import import_crypten

_MODULES_USING_RNG = (
    "crypten.common.rng",
    "crypten.mpc.primitives.arithmetic",
    "crypten.mpc.primitives.binary",
    "crypten.mpc.provider.ttp_provider",
    "crypten.mpc.provider.tfp_provider",
)
_streams: dict[int, tuple[int, Any]] = {}
_bound_keys: dict[int, bytes] = {}


def bind_key(generator: torch.Generator, key: bytes) -> None:
    """Key this generator's stream with a 256-bit key agreed with its peer, not its seed."""
    if len(key) != 32:
        raise ValueError("a generator key has 32 bytes")
    _bound_keys[id(generator)] = key
    _streams.pop(id(generator), None)


def _keystream(generator: torch.Generator) -> Any:
    seed = generator.initial_seed()
    entry = _streams.get(id(generator))
    if entry is None or entry[0] != seed:
        bound = _bound_keys.get(id(generator))
        if bound is not None:  # the seed still enters, so a reseeded generator never repeats a stream
            key = hashlib.sha256(b"mpc-rec/aes-ctr/bound/v1/" + bound + seed.to_bytes(8, "little")).digest()
        elif generator is import_crypten().generators["local"].get(torch.device("cpu")):
            key = os.urandom(32)
        else:
            key = hashlib.sha256(b"mpc-rec/aes-ctr/v1/" + seed.to_bytes(8, "little")).digest()
        entry = (seed, Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor())
        _streams[id(generator)] = entry
    return entry[1]


def _local_generator() -> torch.Generator:
    return import_crypten().generators["local"][torch.device("cpu")]


def random_ring_elements(size: Any, ring_size: int = 2**64, generator: torch.Generator | None = None, **_: Any) -> torch.Tensor:
    """Uniform elements of Z_2^64 as int64 (CrypTen's generate_random_ring_element)."""
    if ring_size != 2**64:
        raise ValueError("mpc-rec's generator serves the 64-bit ring only")
    shape = torch.Size([size] if isinstance(size, int) else size)
    if math.prod(shape) == 0:
        return torch.empty(shape, dtype=torch.int64)
    stream = _keystream(generator if generator is not None else _local_generator())
    size = 8 * math.prod(shape)
    # The keystream is written straight into the tensor's (uninitialised) memory: building
    # it through bytes objects cost two more copies of each draw, 10x the AES work itself.
    out = torch.empty(size + _CTR_SLACK, dtype=torch.uint8)
    stream.update_into(_zeros(size), out.numpy())
    return out[:size].view(torch.int64).reshape(shape)


_CTR_SLACK = 15  # update_into wants room for a partial block
_zero_buffer = memoryview(b"")


def _zeros(size: int) -> memoryview:
    """size zero bytes to encrypt, from one buffer kept at the largest size drawn so far."""
    global _zero_buffer
    if len(_zero_buffer) < size:
        _zero_buffer = memoryview(bytes(size))
    return _zero_buffer[:size]


def random_bits(size: Any, bitlength: int | None = None, generator: torch.Generator | None = None, **kwargs: Any) -> torch.Tensor:
    """Uniform k-bit values (CrypTen's generate_kbit_random_tensor)."""
    values = random_ring_elements(size, generator=generator, **kwargs)
    if bitlength is None or bitlength == 64:
        return values
    return values & ((1 << bitlength) - 1)


def install() -> None:
    """Route CrypTen's random tensors through AES-CTR (idempotent; call before init)."""
    import importlib

    for name in _MODULES_USING_RNG:
        module = importlib.import_module(name)
        if hasattr(module, "generate_random_ring_element"):
            module.generate_random_ring_element = random_ring_elements
        if hasattr(module, "generate_kbit_random_tensor"):
            module.generate_kbit_random_tensor = random_bits
