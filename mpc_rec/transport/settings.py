"""Who is where, and which certificates prove it: the ``[tls]`` section and ``[[peer]]`` list.

A TLS run names every process of the run (compute parties and the dealer) once, by rank,
with the identity its certificate must carry. Validated here, once, into frozen values.
"""

from __future__ import annotations

import hashlib
import re
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mpc_rec.errors import ConfigError

TRANSPORTS = ("gloo", "tls")
_PEER_KEYS = {"rank": int, "name": str, "address": str, "port": int, "fingerprint": str}
_FINGERPRINT = re.compile(r"^sha256:[0-9a-f]{64}$")


@dataclass(frozen=True)
class PeerAddress:
    rank: int
    name: str  # the identity its certificate must carry (subject CN or a DNS subjectAltName)
    address: str
    port: int
    fingerprint: str | None = None  # optional pin on top of the CA: "sha256:<hex of the DER certificate>"


@dataclass(frozen=True)
class TlsSettings:
    ca: Path
    cert: Path
    key: Path
    peers: tuple[PeerAddress, ...]  # indexed by rank
    listen: str | None = None  # bind address; default: this party's own peer address
    max_message_bytes: int = 1 << 30

    def peer(self, rank: int) -> PeerAddress:
        return self.peers[rank]

    def server_context(self) -> ssl.SSLContext:
        return self._context(ssl.PROTOCOL_TLS_SERVER)

    def client_context(self) -> ssl.SSLContext:
        return self._context(ssl.PROTOCOL_TLS_CLIENT)

    def _context(self, protocol: int) -> ssl.SSLContext:
        context = ssl.SSLContext(protocol)
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        # Identity is checked against the rank's configured name, not a host name.
        context.check_hostname = False
        context.verify_mode = ssl.CERT_REQUIRED
        try:
            context.load_verify_locations(cafile=str(self.ca))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"tls.ca {self.ca}: cannot load the pilot CA certificate: {exc}") from None
        try:
            context.load_cert_chain(certfile=str(self.cert), keyfile=str(self.key))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"tls.cert/tls.key {self.cert}, {self.key}: cannot load this party's "
                              f"certificate and key: {exc}") from None
        return context


def certificate_names(peer_cert: dict[str, Any]) -> set[str]:
    """The identities a verified certificate carries: its subject CN and DNS subjectAltNames."""
    names = {value for rdn in peer_cert.get("subject", ()) for key, value in rdn if key == "commonName"}
    names |= {value for kind, value in peer_cert.get("subjectAltName", ()) if kind == "DNS"}
    return names


def fingerprint(der: bytes) -> str:
    return "sha256:" + hashlib.sha256(der).hexdigest()


def parse_tls(network: dict[str, Any], tls: dict[str, Any], peers: Any, *, base: Path, rank: int,
              processes: int, name: str) -> TlsSettings | None:
    """``None`` for plain gloo; otherwise the checked TLS settings of this process."""
    transport = network.get("transport", "gloo")
    if transport not in TRANSPORTS:
        raise ConfigError(f"network.transport must be one of {', '.join(TRANSPORTS)}, got '{transport}'")
    if transport == "gloo":
        if tls or peers:
            raise ConfigError("[tls] and [[peer]] apply only with network.transport = \"tls\"")
        return None
    for key in ("ca", "cert", "key"):
        if key not in tls:
            raise ConfigError(f"missing required setting tls.{key} (network.transport is \"tls\")")
    table = _parse_peers(peers, processes)
    if not 0 <= rank < processes:
        raise ConfigError(f"rank {rank} is outside 0..{processes - 1} for this run")
    if table[rank].name != name:
        raise ConfigError(f"the [[peer]] entry for rank {rank} is named '{table[rank].name}', "
                          f"but this party is '{name}'")
    limit_mb = network.get("max_message_mb", 1024)
    if not 1 <= limit_mb <= 16384:
        raise ConfigError(f"network.max_message_mb must be in 1..16384, got {limit_mb}")
    return TlsSettings(
        ca=(base / tls["ca"]).resolve(), cert=(base / tls["cert"]).resolve(), key=(base / tls["key"]).resolve(),
        peers=table, listen=network.get("listen"), max_message_bytes=limit_mb << 20,
    )


def _parse_peers(peers: Any, processes: int) -> tuple[PeerAddress, ...]:
    if not isinstance(peers, list) or not all(isinstance(p, dict) for p in peers):
        raise ConfigError("network.transport \"tls\" needs one [[peer]] table per process of the run")
    by_rank: dict[int, PeerAddress] = {}
    for entry in peers:
        for key, value in entry.items():
            if key not in _PEER_KEYS:
                raise ConfigError(f"unknown setting peer.{key} (known: {', '.join(_PEER_KEYS)})")
            if isinstance(value, bool) or not isinstance(value, _PEER_KEYS[key]):
                raise ConfigError(f"peer.{key} must be {_PEER_KEYS[key].__name__}, got {value!r}")
        missing = [key for key in ("rank", "name", "address", "port") if key not in entry]
        if missing:
            raise ConfigError(f"a [[peer]] entry lacks {missing[0]}")
        peer = PeerAddress(**entry)
        if not 0 <= peer.rank < processes:
            raise ConfigError(f"peer '{peer.name}' has rank {peer.rank}, outside 0..{processes - 1} for this run")
        if peer.rank in by_rank:
            raise ConfigError(f"two [[peer]] entries have rank {peer.rank}")
        if not 0 < peer.port < 65536:
            raise ConfigError(f"peer '{peer.name}': port {peer.port} is not a TCP port")
        if peer.fingerprint is not None and not _FINGERPRINT.match(peer.fingerprint):
            raise ConfigError(f"peer '{peer.name}': fingerprint must be 'sha256:' and 64 lower-case hex digits")
        by_rank[peer.rank] = peer
    if len(by_rank) != processes:
        absent = sorted(set(range(processes)) - set(by_rank))
        raise ConfigError(f"no [[peer]] entry for rank {absent[0]} (need one for each of the {processes} processes)")
    names = [p.name for p in by_rank.values()]
    if len(set(names)) != len(names):
        raise ConfigError("two [[peer]] entries have the same name; each process needs its own identity")
    return tuple(by_rank[r] for r in range(processes))
