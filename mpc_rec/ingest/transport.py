"""The ingest channel: length-prefixed JSON over TCP, served by the aggregator.

Every request is one connection: a header frame (a JSON object with "kind"), an
optional body frame, then one reply (header frame, optional body frame). A frame is
8 bytes of big-endian length and that many bytes. Nothing is pickled.

With gloo (trusted networks) this channel is neither encrypted nor authenticated (see the
protocol file): contributions are Paillier ciphertexts, but assumption 2 (the key holder
never sees what contributors send to the aggregator) then rests on the network. With the
TLS transport it runs over TLS 1.3 with the pilot's certificates (``ChannelTls``): every
client checks that the aggregator's certificate chains to the pilot CA and names the
aggregator; compute parties and the dealer present their own certificates, and the
requests only they may make (``party_kinds``) are refused from anyone else. Contributors
are not pilot parties: they connect without a certificate and may only contribute or
withdraw.
"""

from __future__ import annotations

import json
import socket
import socketserver
import ssl
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from mpc_rec.errors import ConfigError, PeerError

MAX_HEADER_BYTES = 64 << 10
_LENGTH = struct.Struct(">Q")


class FrameTooLarge(PeerError):
    pass


@dataclass(frozen=True)
class ChannelTls:
    """TLS on the ingest channel. Client side: ``context`` verifies the server against the
    pilot CA and ``aggregator`` is the name its certificate must carry. Server side:
    ``context`` presents the aggregator's certificate; ``party_kinds`` maps each request
    kind reserved to pilot parties to the names allowed to make it."""

    context: ssl.SSLContext
    aggregator: str = ""
    party_kinds: dict[str, frozenset[str]] = field(default_factory=dict)


def aggregator_client_tls(ca: Path, name: str, config_path: Path) -> ChannelTls:
    """TLS 1.3 that authenticates the aggregator (pilot CA, and its name) for a client that
    holds no pilot certificate of its own (a contributor, a federated data holder)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False  # the name is checked against the certificate instead
    try:
        context.load_verify_locations(cafile=str(ca))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{config_path}: aggregator.ca {ca}: cannot load the pilot CA certificate: "
                          f"{getattr(exc, 'strerror', None) or exc}") from None
    return ChannelTls(context, aggregator=name)


def _names(sock: ssl.SSLSocket) -> set[str]:
    from mpc_rec.transport.settings import certificate_names

    return certificate_names(sock.getpeercert() or {})


def parse_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"ingest address must be HOST:PORT, got '{address}'")
    return host, int(port)


def send_frame(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(_LENGTH.pack(len(payload)) + payload)


def recv_frame(sock: socket.socket, limit: int) -> bytes:
    size = _LENGTH.unpack(_recv_exact(sock, _LENGTH.size))[0]
    if size > limit:
        raise FrameTooLarge(f"message of {size} bytes exceeds the limit of {limit}")
    return _recv_exact(sock, size)


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise PeerError("the connection closed in the middle of a message")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _json_object(raw: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise PeerError(f"{what} is not UTF-8 JSON") from None
    if not isinstance(value, dict):
        raise PeerError(f"{what} must be a JSON object")
    return value


def _header(raw: bytes) -> dict[str, Any]:
    value = _json_object(raw, "a request header")
    if not isinstance(value.get("kind"), str):
        raise PeerError("a request header must name its 'kind'")
    return value


def request(address: str, header: dict[str, Any], body: bytes | None = None, *, wait_s: float,
            reply_limit: int = MAX_HEADER_BYTES, tls: ChannelTls | None = None) -> tuple[dict[str, Any], bytes | None]:
    """Send one request and return (reply header, reply body or None).

    Connecting is retried until ``wait_s`` has passed (the aggregator may not be up yet);
    the reply is awaited for at most the rest of ``wait_s``.
    """
    host, port = parse_address(address)
    end = time.monotonic() + wait_s
    while True:
        try:
            sock = socket.create_connection((host, port), timeout=max(1.0, end - time.monotonic()))
            break
        except OSError as exc:
            if time.monotonic() >= end:
                raise PeerError(f"cannot reach the aggregator at {address}: {exc.strerror or exc}") from None
            time.sleep(0.2)
    with sock:
        try:
            sock.settimeout(max(1.0, end - time.monotonic()))
            if tls is not None:
                sock = tls.context.wrap_socket(sock, server_side=False)
                if tls.aggregator not in _names(sock):
                    raise PeerError(f"the server at {address} is not '{tls.aggregator}': its certificate names "
                                    f"{', '.join(sorted(_names(sock))) or 'nobody'}; refused")
            send_frame(sock, json.dumps({**header, "body": body is not None}).encode())
            if body is not None:
                send_frame(sock, body)
            reply = _json_object(recv_frame(sock, MAX_HEADER_BYTES), "a reply")
            reply_body = recv_frame(sock, reply_limit) if reply.get("body") else None
        except ssl.SSLError as exc:
            raise PeerError(f"TLS with the aggregator at {address} failed: {exc.reason or exc}") from None
        except socket.timeout:
            raise PeerError(f"the aggregator at {address} did not answer within {wait_s:.0f} s") from None
        except OSError as exc:
            raise PeerError(f"lost the connection to the aggregator at {address}: {exc.strerror or exc}") from None
    return reply, reply_body


Handler = Callable[[dict[str, Any], bytes | None], tuple[dict[str, Any], bytes | None]]


class Server:
    """A threaded TCP server calling ``handle(header, body)`` for each request.

    ``body_limit(header)`` says how large a body that header may bring; a larger one is
    refused by a reply without reading it.
    """

    def __init__(self, address: str, handle: Handler, body_limit: Callable[[dict[str, Any]], int],
                 io_timeout_s: float, tls: ChannelTls | None = None):
        outer = self

        class _Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                sock = self.request
                sock.settimeout(io_timeout_s)
                try:
                    if tls is not None:
                        sock = tls.context.wrap_socket(sock, server_side=True)
                    header = _header(recv_frame(sock, MAX_HEADER_BYTES))
                    allowed = tls.party_kinds.get(header["kind"]) if tls is not None else None
                    if allowed is not None and not allowed & _names(sock):
                        reason = (f"a '{header['kind'][:40]}' request needs the certificate of "
                                  f"{' or '.join(sorted(allowed))}; refused")
                        outer.refused.append(reason)
                        reply, reply_body = {"status": "rejected", "reason": reason}, None
                    else:
                        body = recv_frame(sock, body_limit(header)) if header.get("body") else None
                        reply, reply_body = handle(header, body)
                except FrameTooLarge as exc:
                    reply, reply_body = {"status": "rejected", "reason": str(exc)}, None
                    outer.refused.append(str(exc))
                except (PeerError, OSError) as exc:  # ssl.SSLError included: a failed handshake
                    outer.refused.append(str(exc))
                    return
                try:
                    send_frame(sock, json.dumps({**reply, "body": reply_body is not None}).encode())
                    if reply_body is not None:
                        send_frame(sock, reply_body)
                except OSError:
                    pass  # the client gave up; nothing of the round depends on the reply

        class _TCPServer(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self.refused: list[str] = []  # requests dropped before they could be read
        host, port = parse_address(address)
        try:
            self._server = _TCPServer((host, port), _Handler)
        except OSError as exc:
            raise ConfigError(f"cannot listen for contributors on {address}: {exc.strerror or exc}") from None
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
