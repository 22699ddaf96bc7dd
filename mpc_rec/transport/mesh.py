"""A full mesh of mutually authenticated TLS 1.3 connections, served by one I/O thread.

Every pair of processes shares one connection: the higher rank connects to the lower,
both present certificates from the pilot CA, and each side checks that the certificate
it got carries the name the configuration puts at that rank. After set-up the sockets
are non-blocking and belong to one I/O thread per process (``Mesh._serve``): it sends what
the protocol queued and reads whatever peers send, into whole messages, while the main
thread computes. So a peer's large send completes while this party is busy (as with
gloo's own threads), two parties sending large tensors to each other cannot deadlock,
and an OpenSSL connection is only ever touched by that one thread. The main thread waits
on a condition; every wait ends after ``timeout_s`` without traffic on the connection it
waits on with "lost contact with <name>".
"""

from __future__ import annotations

import collections
import select
import socket
import ssl
import threading
import time
from typing import Any, Callable

import torch

from mpc_rec.errors import PeerError
from mpc_rec.transport import framing
from mpc_rec.transport.settings import PeerAddress, TlsSettings, certificate_names, fingerprint

_CHUNK = 1 << 20  # bytes handed to one SSL write; keeps reading and writing interleaved
_SMALL = 1 << 16  # messages up to this size are copied into one buffer (one TLS record, one syscall)
_MAX_WAITING = 100_000  # messages received but not yet asked for, per peer
_SOCKET_BUFFER = 4 << 20  # kernel buffers: fewer wake-ups per large transfer on loaded machines


class Link:
    """One authenticated connection to one peer: an outbox and an inbox of whole messages.

    Only the I/O thread reads and writes the socket; the main thread appends to the
    outbox and takes from the inbox (the inbox under the mesh's lock).
    """

    def __init__(self, sock: ssl.SSLSocket, peer: PeerAddress, max_bytes: int):
        self.sock = sock
        self.peer = peer
        self.max_bytes = max_bytes
        self.inbox: collections.deque[tuple[framing.Header, Any]] = collections.deque()
        self.inbox_bytes = 0
        self.outbox: collections.deque[memoryview] = collections.deque()
        self.closed: str | None = None  # why the connection ended, once it has
        self.said_goodbye = False
        self.last_traffic = time.monotonic()  # bytes last moved either way
        self._header = bytearray(framing.HEADER_BYTES)
        self._current: framing.Header | None = None
        self._body: Any = None
        self._view = memoryview(self._header)
        self._got = 0

    @property
    def name(self) -> str:
        return self.peer.name

    def fileno(self) -> int:
        return self.sock.fileno()

    def queue(self, kind: int, payload: memoryview | bytes, dtype: torch.dtype | None = None,
              shape: tuple[int, ...] = ()) -> bool:
        """Queue one message; True when it borrows the caller's memory (a large tensor),
        which must then stay unchanged until the outbox has drained. Small payloads are
        copied; bytes cannot change."""
        if self.closed is not None:
            raise PeerError(f"lost contact with {self.name}: {self.closed}")
        header = framing.encode_header(kind, len(payload), dtype, shape)
        if len(payload) <= _SMALL or isinstance(payload, bytes):
            self.outbox.append(memoryview(header + bytes(payload)) if len(payload) <= _SMALL else memoryview(header))
            if len(payload) > _SMALL:
                self.outbox.extend(memoryview(payload)[start:start + _CHUNK] for start in range(0, len(payload), _CHUNK))
            return False
        chunks = [memoryview(header)] + [payload[start:start + _CHUNK] for start in range(0, len(payload), _CHUNK)]
        self.outbox.extend(chunks)
        return True

    def write(self) -> bool:
        """Send what the socket takes now; True once the outbox is empty."""
        while self.outbox:
            chunk = self.outbox[0]
            try:
                sent = self.sock.send(chunk)
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
                return False
            except (ssl.SSLError, OSError) as exc:
                self.closed = f"connection failed while sending: {exc}"
                return True
            self.last_traffic = time.monotonic()
            if sent == len(chunk):
                self.outbox.popleft()
            else:
                self.outbox[0] = chunk[sent:]
        return True

    def read(self) -> list[tuple[framing.Header, Any]]:
        """Read all that is available; returns the messages completed (headers checked
        before anything is allocated; a hostile header raises PeerError)."""
        completed: list[tuple[framing.Header, Any]] = []
        while self.closed is None:
            try:
                count = self.sock.recv_into(self._view[self._got:])
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                return completed
            except (ssl.SSLError, OSError) as exc:
                self.closed = f"connection failed: {exc}"
                return completed
            if count == 0:
                self.closed = "the connection was closed"
                return completed
            self.last_traffic = time.monotonic()
            self._got += count
            if self._got == len(self._view):
                message = self._advance()
                if message is not None:
                    completed.append(message)
        return completed

    def _advance(self) -> tuple[framing.Header, Any] | None:
        if self._current is None:  # a header is complete: check it before allocating anything
            header = framing.decode_header(self._header, sender=self.name, max_bytes=self.max_bytes)
            self._current = header
            if header.kind == framing.TENSOR:
                self._body = torch.empty(header.shape, dtype=header.dtype)
                target = memoryview(self._body.numpy()).cast("B") if header.length else memoryview(b"")
            else:
                self._body = bytearray(header.length)
                target = memoryview(self._body)
            self._view, self._got = target, 0
            if header.length:
                return None
        message = (self._current, self._body)
        self._current, self._body, self._view, self._got = None, None, memoryview(self._header), 0
        if message[0].kind == framing.BYE:
            self.said_goodbye = True
            return None
        return message


class Mesh:
    """All links of this process, the I/O thread that services them, and the waits on it."""

    def __init__(self, rank: int, links: dict[int, Link], timeout_s: float):
        self.rank = rank
        self.links = links
        self.timeout_s = timeout_s
        self._changed = threading.Condition()  # guards inboxes and failure; signals every event
        self._failure: PeerError | None = None  # a hostile peer: fatal for the whole run
        self._stopping = False
        self._borrowing: set[int] = set()  # peers with queued messages that borrow the caller's memory
        self._wake_reader, self._wake_writer = socket.socketpair()
        for end in (self._wake_reader, self._wake_writer):
            end.setblocking(False)
        self._thread = threading.Thread(target=self._serve, name=f"mpc-rec-tls-rank{rank}", daemon=True)
        self._thread.start()

    def link(self, rank: int) -> Link:
        try:
            return self.links[rank]
        except KeyError:
            raise ValueError(f"rank {rank} is not a peer of rank {self.rank}") from None

    # --- main thread: queue, wait, take -------------------------------------------------------

    def send_tensor(self, tensor: torch.Tensor, dst: int) -> None:
        self.queue_tensor(tensor, dst)
        self.flush(dst)

    def queue_tensor(self, tensor: torch.Tensor, dst: int) -> None:
        data = tensor.detach().contiguous()
        payload = memoryview(data.numpy()).cast("B") if data.numel() else memoryview(b"")
        self.queue(dst, framing.TENSOR, payload, data.dtype, tuple(data.shape))

    def send_object(self, value: Any, dst: int) -> None:
        self.queue(dst, framing.OBJECT, framing.encode_object(value))
        self.flush(dst)

    def queue(self, dst: int, kind: int, payload: memoryview | bytes, dtype: torch.dtype | None = None,
              shape: tuple[int, ...] = ()) -> None:
        self._raise_failure()
        if self.link(dst).queue(kind, payload, dtype, shape):
            self._borrowing.add(dst)
        self._wake()

    def flush(self, dst: int) -> None:
        """Return once nothing queued for dst borrows the caller's memory any more.

        A copied message needs no wait (the I/O thread sends it; a failure surfaces at
        the next wait on that peer); a borrowed one waits until handed to TLS and the kernel.
        """
        if dst not in self._borrowing:
            return
        link = self.link(dst)

        def sent() -> bool:
            if not link.outbox:
                return True
            if link.closed is not None:
                raise PeerError(f"lost contact with {link.name}: {link.closed}")
            return False

        self._wait(sent, link)
        self._borrowing.discard(dst)

    def receive(self, src: int, kind: int) -> Any:
        link = self.link(src)

        def arrived() -> bool:
            if link.inbox:
                return True
            if link.closed is not None or link.said_goodbye:
                reason = link.closed or "it ended its run"
                raise PeerError(f"lost contact with {link.name}: {reason}")
            return False

        self._wait(arrived, link)
        with self._changed:
            header, body = link.inbox.popleft()
            link.inbox_bytes -= header.length
        if header.kind != kind:
            raise PeerError(f"{link.name} sent a {framing.KIND_NAMES[header.kind]} where a "
                            f"{framing.KIND_NAMES[kind]} was expected")
        return body if kind == framing.TENSOR else framing.decode_object(body, sender=link.name)

    def receive_tensor(self, src: int, like: torch.Tensor) -> torch.Tensor:
        received = self.receive(src, framing.TENSOR)
        return framing.expect_tensor(received, like, sender=self.link(src).name)

    def _wait(self, done: Callable[[], bool], waiting_on: Link) -> None:
        """Until done(); PeerError after timeout_s in which no byte moved to or from waiting_on."""
        started = time.monotonic()
        with self._changed:
            while True:
                self._raise_failure()
                if done():
                    return
                quiet_since = max(started, waiting_on.last_traffic)
                remaining = quiet_since + self.timeout_s - time.monotonic()
                if remaining <= 0:
                    raise PeerError(f"lost contact with {waiting_on.name}: nothing received or sent "
                                    f"for {self.timeout_s:g} s")
                self._changed.wait(min(remaining, 1.0))

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise PeerError(str(self._failure))

    def _wake(self) -> None:
        try:
            self._wake_writer.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # a wake-up is already pending, or the mesh is closing

    # --- the I/O thread -------------------------------------------------------------------------

    def _serve(self) -> None:
        try:
            while not self._stopping:
                self._service()
        except BaseException as exc:  # noqa: BLE001 - reported to the main thread, never lost
            with self._changed:
                if self._failure is None:
                    self._failure = PeerError(f"the TLS I/O thread failed: {exc!r}")
                self._changed.notify_all()

    def _service(self) -> None:
        """One pass: wait for a socket (or a wake-up), then move all the bytes that can move.

        Only sockets select() reports ready are touched (plus those with decrypted bytes
        already inside OpenSSL, which select cannot see): trying idle sockets costs an
        exception per attempt, which dominated the cost of bulk transfers.
        """
        open_links = [link for link in self.links.values() if link.closed is None]
        writers = [link for link in open_links if link.outbox]
        buffered = [link for link in open_links if link.sock.pending()]
        readable, writable, _ = select.select([self._wake_reader, *open_links], writers, [], 0 if buffered else 1.0)
        event = False
        if self._wake_reader in readable:
            try:
                while self._wake_reader.recv(4096):
                    pass
            except BlockingIOError:
                pass
        for link in writable:
            event |= link.write()
        for link in set(readable) | set(buffered):
            if link is self._wake_reader:
                continue
            try:
                completed = link.read()
            except PeerError as exc:  # a header no honest peer sends
                link.closed = str(exc)
                with self._changed:
                    self._failure = self._failure or exc
                event = True
                continue
            if completed:
                with self._changed:
                    link.inbox.extend(completed)
                    link.inbox_bytes += sum(header.length for header, _ in completed)
                    # A protocol step leaves a few messages waiting at most; a flood is hostile.
                    if link.inbox_bytes > 2 * link.max_bytes or len(link.inbox) > _MAX_WAITING:
                        link.closed = "it flooded this party"
                        self._failure = self._failure or PeerError(
                            f"{link.name} sent more unrequested data than any protocol step needs")
            event |= bool(completed) or link.closed is not None or link.said_goodbye
        if event:
            with self._changed:
                self._changed.notify_all()

    # --- end of the run -------------------------------------------------------------------------

    def close(self) -> None:
        """Say goodbye, drain until every peer has too (or is gone), then close.

        Closing a socket that still holds unread data makes the kernel reset the
        connection, which can destroy what the peer has not read yet; draining first
        avoids that, and lets each peer tell a finished run from a lost one.
        """
        for rank, link in self.links.items():
            if link.closed is None:
                try:
                    self.queue(rank, framing.BYE, b"")
                except PeerError:
                    pass

        def finished() -> bool:
            return all((link.closed is not None or link.said_goodbye) and (link.closed is not None or not link.outbox)
                       for link in self.links.values())

        deadline = time.monotonic() + self.timeout_s
        with self._changed:
            while not finished() and self._failure is None and time.monotonic() < deadline:
                self._changed.wait(min(1.0, max(0.0, deadline - time.monotonic())))
        self.abort()  # the run's results are complete; a peer that vanished now changes nothing

    def abort(self) -> None:
        """Stop the I/O thread and close every connection, without goodbyes."""
        self._stopping = True
        self._wake()
        if threading.current_thread() is not self._thread:
            self._thread.join(5.0)
        for link in self.links.values():
            link.sock.close()
        self._wake_reader.close()
        self._wake_writer.close()


# --- set-up -------------------------------------------------------------------------------


def connect_mesh(settings: TlsSettings, rank: int, timeout_s: float) -> Mesh:
    """Connect to every lower rank, accept every higher rank, authenticate each one."""
    me = settings.peer(rank)
    higher = [p for p in settings.peers if p.rank > rank]
    listener = None
    if higher:
        listener = socket.socket(socket.AF_INET6 if ":" in (settings.listen or me.address) else socket.AF_INET)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind((settings.listen or me.address, me.port))
        except OSError as exc:
            listener.close()
            raise PeerError(f"{me.name} cannot listen on {settings.listen or me.address}:{me.port}: {exc.strerror}") from None
        listener.listen(len(higher))
    links: dict[int, Link] = {}
    try:
        client = settings.client_context()
        for peer in settings.peers[:rank]:
            links[peer.rank] = _connect(client, settings, me, peer, timeout_s)
        if listener is not None:
            server = settings.server_context()
            while len(links) < len(settings.peers) - 1:
                link = _accept(listener, server, settings, me, links, timeout_s)
                links[link.peer.rank] = link
    except BaseException:
        for link in links.values():
            link.sock.close()
        raise
    finally:
        if listener is not None:
            listener.close()
    for link in links.values():
        link.sock.setblocking(False)
    return Mesh(rank, links, timeout_s)


def _hello(me: PeerAddress, processes: int) -> bytes:
    payload = framing.encode_object({"rank": me.rank, "name": me.name, "processes": processes,
                                     "wire": framing.VERSION})
    return framing.encode_header(framing.HELLO, len(payload)) + payload


def _read_hello(sock: ssl.SSLSocket, sender: str) -> dict[str, Any]:
    header = framing.decode_header(_recv_exact(sock, framing.HEADER_BYTES, sender), sender=sender, max_bytes=0)
    if header.kind != framing.HELLO:
        raise PeerError(f"{sender} did not open with a hello message")
    hello = framing.decode_object(_recv_exact(sock, header.length, sender), sender=sender)
    if not isinstance(hello, dict) or not isinstance(hello.get("rank"), int) or isinstance(hello.get("rank"), bool):
        raise PeerError(f"{sender} sent a malformed hello message")
    return hello


def _recv_exact(sock: ssl.SSLSocket, size: int, sender: str) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise PeerError(f"{sender} closed the connection during set-up")
        data += chunk
    return bytes(data)


def _check_identity(sock: ssl.SSLSocket, expected: PeerAddress, where: str) -> None:
    """The certificate verified against the pilot CA must also name the party at this rank."""
    names = certificate_names(sock.getpeercert() or {})
    if expected.name not in names:
        raise PeerError(f"{where}: certificate identifies {', '.join(sorted(names)) or 'nobody'}, but rank "
                        f"{expected.rank} is '{expected.name}' in this configuration; refused")
    if expected.fingerprint is not None:
        seen = fingerprint(sock.getpeercert(binary_form=True))
        if seen != expected.fingerprint:
            raise PeerError(f"{where}: certificate of '{expected.name}' is {seen}, not the pinned "
                            f"{expected.fingerprint}; refused")


def _tuned(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # many small protocol rounds
    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        sock.setsockopt(socket.SOL_SOCKET, option, _SOCKET_BUFFER)


def _connect(context: ssl.SSLContext, settings: TlsSettings, me: PeerAddress, peer: PeerAddress,
             timeout_s: float) -> Link:
    where = f"{peer.name} at {peer.address}:{peer.port}"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            raw = socket.create_connection((peer.address, peer.port), timeout=max(0.1, deadline - time.monotonic()))
            break
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise PeerError(f"lost contact with {peer.name}: could not connect to {peer.address}:{peer.port} "
                                f"within {timeout_s:g} s ({exc.strerror or exc})") from None
            time.sleep(0.2)
    raw.settimeout(timeout_s)
    _tuned(raw)
    try:
        sock = context.wrap_socket(raw, server_side=False)
        _check_identity(sock, peer, where)
        sock.sendall(_hello(me, len(settings.peers)))
        hello = _read_hello(sock, peer.name)
    except ssl.SSLError as exc:
        raw.close()
        raise PeerError(f"TLS with {where} failed: {_reason(exc)}") from None
    except socket.timeout:
        raw.close()
        raise PeerError(f"lost contact with {peer.name}: no TLS set-up within {timeout_s:g} s") from None
    except OSError as exc:
        raw.close()
        raise PeerError(f"lost contact with {peer.name} during TLS set-up: {exc}") from None
    except PeerError:
        raw.close()
        raise
    if hello["rank"] != peer.rank:
        sock.close()
        raise PeerError(f"{where} says it is rank {hello['rank']}, but the configuration puts it at rank {peer.rank}")
    return Link(sock, peer, settings.max_message_bytes)


def _accept(listener: socket.socket, context: ssl.SSLContext, settings: TlsSettings, me: PeerAddress,
            links: dict[int, Link], timeout_s: float) -> Link:
    waiting = [p.name for p in settings.peers if p.rank > me.rank and p.rank not in links]
    listener.settimeout(timeout_s)
    try:
        raw, address = listener.accept()
    except socket.timeout:
        raise PeerError(f"lost contact with {waiting[0]}: it did not connect within {timeout_s:g} s") from None
    where = f"connection from {address[0]}:{address[1]}"
    raw.settimeout(timeout_s)
    _tuned(raw)
    try:
        sock = context.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
        try:
            sock.do_handshake()
        except ssl.SSLError:
            _linger(sock)
            raise
        hello = _read_hello(sock, where)
        rank = hello["rank"]
        if not me.rank < rank < len(settings.peers) or rank in links:
            raise PeerError(f"{where} claims rank {rank}, which is not expected to connect here")
        peer = settings.peer(rank)
        _check_identity(sock, peer, where)
        sock.sendall(_hello(me, len(settings.peers)))
    except ssl.SSLError as exc:
        raw.close()
        raise PeerError(f"refused {where}: TLS failed: {_reason(exc)}") from None
    except socket.timeout:
        raw.close()
        raise PeerError(f"{where} sent no TLS set-up within {timeout_s:g} s") from None
    except OSError as exc:
        raw.close()
        raise PeerError(f"{where} failed during TLS set-up: {exc}") from None
    except PeerError:
        raw.close()
        raise
    return Link(sock, peer, settings.max_message_bytes)


def _linger(sock: ssl.SSLSocket) -> None:
    """After refusing a handshake, let the peer read the alert before the connection goes.

    Closing with the peer's bytes still unread makes the kernel reset the connection,
    and the peer may then lose the alert that says why it was refused."""
    try:
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(1.0)
        while sock.recv(4096):
            pass
    except OSError:
        pass
    sock.close()


def _reason(exc: ssl.SSLError) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate rejected: {exc.verify_message} (not a certificate of the pilot CA)"
    reason = str(getattr(exc, "reason", None) or exc)
    if "ALERT" in reason:
        return f"the peer rejected the handshake ({reason}): our certificate is not one its pilot CA issued, or it failed"
    return reason
