"""Paillier keys: generation (``phe``), fingerprints, and key files.

The public key travels with its fingerprint, the SHA-256 of n (big-endian, minimal
length), so contributors and the aggregator can check out of band that they encrypt to,
and sum under, the key holder's key. The private key lives in the key holder's process
and its key file (mode 0600, written whole or not at all); nothing here sends it anywhere.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from phe import paillier

from mpc_rec.errors import InputError
from mpc_rec.files import write_text_atomic

SECURE_KEY_BITS = (2048, 3072)
INSECURE_TEST_KEY_BITS = 1024  # only with allow_insecure_size=True: fast tests, no security
_PUBLIC_KIND = "mpc-rec paillier public key"
_PRIVATE_KIND = "mpc-rec paillier private key"


def fingerprint_of(n: int) -> str:
    """SHA-256 of n as big-endian bytes of minimal length, in hex (64 characters)."""
    return hashlib.sha256(n.to_bytes((n.bit_length() + 7) // 8, "big")).hexdigest()


@dataclass(frozen=True)
class PublicKey:
    """A Paillier public key (g = n + 1) and its fingerprint."""

    n: int
    fingerprint: str = field(init=False)

    def __post_init__(self) -> None:
        if not isinstance(self.n, int) or isinstance(self.n, bool):
            raise InputError("Paillier public key: n must be an integer")
        if self.n.bit_length() < INSECURE_TEST_KEY_BITS or self.n % 2 == 0:
            raise InputError(
                f"Paillier public key: n must be odd and at least {INSECURE_TEST_KEY_BITS} bits, "
                f"got {self.n.bit_length()} bits"
            )
        object.__setattr__(self, "fingerprint", fingerprint_of(self.n))

    @property
    def bits(self) -> int:
        return self.n.bit_length()

    @property
    def nsquare(self) -> int:
        return self.n * self.n

    @property
    def insecure(self) -> bool:
        """True for test-size keys (below 2048 bits)."""
        return self.bits < SECURE_KEY_BITS[0]

    def check(self, expected_fingerprint: str | None) -> "PublicKey":
        """Return self if its fingerprint is the expected one (None: no check), else raise."""
        if expected_fingerprint is not None and expected_fingerprint.lower() != self.fingerprint:
            raise InputError(
                f"Paillier public key fingerprint {self.fingerprint[:16]}... is not the expected "
                f"{expected_fingerprint[:16]}...: refusing to use this key"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return {"kind": _PUBLIC_KIND, "version": 1, "n": format(self.n, "x"), "fingerprint": self.fingerprint}

    @classmethod
    def from_dict(cls, data: Any, *, expected_fingerprint: str | None = None) -> "PublicKey":
        if not isinstance(data, dict) or data.get("kind") != _PUBLIC_KIND or data.get("version") != 1:
            raise InputError("not an mpc-rec Paillier public key (version 1)")
        key = cls(_hex_int(data.get("n"), "n"))
        if data.get("fingerprint") != key.fingerprint:
            raise InputError("Paillier public key: the stored fingerprint does not match n")
        return key.check(expected_fingerprint)

    def __repr__(self) -> str:
        return f"PublicKey(bits={self.bits}, fingerprint={self.fingerprint[:16]}...)"


class PrivateKey:
    """The key holder's private key: decrypts raw ciphertexts with CRT (``phe``)."""

    def __init__(self, public_key: PublicKey, p: int, q: int):
        if p * q != public_key.n or p == q or min(p, q) < 2:
            raise InputError("Paillier private key: p and q do not match the public key")
        self.public_key = public_key
        self._phe = paillier.PaillierPrivateKey(paillier.PaillierPublicKey(public_key.n), p, q)

    def decrypt_raw(self, ciphertext: int) -> int:
        """The plaintext in [0, n) of a raw ciphertext."""
        return int(self._phe.raw_decrypt(ciphertext))

    def __repr__(self) -> str:  # never show p or q
        return f"PrivateKey(for {self.public_key!r})"


def generate_keypair(key_bits: int = 2048, *, allow_insecure_size: bool = False) -> tuple[PublicKey, PrivateKey]:
    """A fresh key pair from ``phe`` (2048 or 3072 bits; 1024 only with allow_insecure_size)."""
    allowed = SECURE_KEY_BITS + ((INSECURE_TEST_KEY_BITS,) if allow_insecure_size else ())
    if key_bits not in allowed:
        raise InputError(
            f"Paillier key size must be one of {', '.join(map(str, allowed))} bits, got {key_bits}"
        )
    phe_public, phe_private = paillier.generate_paillier_keypair(n_length=key_bits)
    public = PublicKey(int(phe_public.n))
    return public, PrivateKey(public, int(phe_private.p), int(phe_private.q))


def save_public_key(path: str | os.PathLike, key: PublicKey) -> None:
    write_text_atomic(path, json.dumps(key.to_dict(), indent=1) + "\n")


def load_public_key(path: str | os.PathLike, *, expected_fingerprint: str | None = None) -> PublicKey:
    return PublicKey.from_dict(_read_json(path), expected_fingerprint=expected_fingerprint)


def save_private_key(path: str | os.PathLike, key: PrivateKey) -> None:
    """Write the private key whole-or-nothing with mode 0600 from the first byte on."""
    text = json.dumps(
        {
            "kind": _PRIVATE_KIND,
            "version": 1,
            "n": format(key.public_key.n, "x"),
            "p": format(int(key._phe.p), "x"),
            "q": format(int(key._phe.q), "x"),
            "fingerprint": key.public_key.fingerprint,
        },
        indent=1,
    ) + "\n"
    target = os.path.abspath(os.fspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".part", dir=os.path.dirname(target))
    except OSError as exc:
        raise InputError(f"{os.fspath(path)}: cannot write ({exc.strerror or exc})") from None
    try:
        os.fchmod(fd, 0o600)  # mkstemp already creates 0600; say so explicitly
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise InputError(f"{os.fspath(path)}: cannot write ({exc.strerror or exc})") from None
        raise


def load_private_key(path: str | os.PathLike) -> PrivateKey:
    """Read a private key file; refuse one that group or others may read or write."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError as exc:
        raise InputError(f"{os.fspath(path)}: cannot read ({exc.strerror or exc})") from None
    if mode & 0o077:
        raise InputError(
            f"{os.fspath(path)}: private key file has mode {mode:04o}; it must be 0600 "
            f"(run: chmod 600 {os.fspath(path)})"
        )
    data = _read_json(path)
    if not isinstance(data, dict) or data.get("kind") != _PRIVATE_KIND or data.get("version") != 1:
        raise InputError(f"{os.fspath(path)}: not an mpc-rec Paillier private key (version 1)")
    public = PublicKey(_hex_int(data.get("n"), "n"))
    if data.get("fingerprint") != public.fingerprint:
        raise InputError(f"{os.fspath(path)}: the stored fingerprint does not match n")
    return PrivateKey(public, _hex_int(data.get("p"), "p"), _hex_int(data.get("q"), "q"))


def _read_json(path: str | os.PathLike) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise InputError(f"{os.fspath(path)}: cannot read ({exc.strerror or exc})") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"{os.fspath(path)}: not valid JSON ({exc})") from None


def _hex_int(value: Any, name: str) -> int:
    if not isinstance(value, str) or not 0 < len(value) <= 2048:
        raise InputError(f"key field '{name}' must be a hexadecimal string")
    try:
        return int(value, 16)
    except ValueError:
        raise InputError(f"key field '{name}' is not hexadecimal") from None
