"""One CrypTen process: rendezvous, dealer choice, bounded waits, traffic counters.

CrypTen keeps its communicator and configuration as module globals and reads rank and
rendezvous from environment variables; this module is the only place that sets them, and
only inside a party or dealer process (never at import).
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from mpc_rec.compat import import_crypten
from mpc_rec.errors import ConfigError

DEALERS = {"ttp": "TTP", "insecure-tfp": "TFP"}
# Intra-op threads per process, set by whoever starts several processes on one machine.
# torch defaults to one thread per core in every process; N parties and a dealer on
# fewer cores then spin against each other (small int64 ops took 15 ms instead of 20 us).
THREADS_ENV = "MPC_REC_THREADS"


def threads_per_process(processes: int) -> int:
    return max(1, (os.cpu_count() or 1) // processes)


@dataclass(frozen=True)
class Endpoint:
    """Where a process sits in a run: ``rank == world_size`` is the dealer."""

    rank: int
    world_size: int
    rendezvous: str
    dealer: str = "ttp"
    timeout_s: float = 30.0
    tls: Any = None  # mpc_rec.transport.settings.TlsSettings; None: plain gloo (trusted networks only)

    def __post_init__(self) -> None:
        if self.dealer not in DEALERS:
            raise ConfigError(f"unknown dealer '{self.dealer}' (choose ttp or insecure-tfp)")
        if self.world_size < 2:
            raise ConfigError(f"world_size must be at least 2, got {self.world_size}")
        last = self.world_size if self.dealer == "ttp" else self.world_size - 1
        if not 0 <= self.rank <= last:
            raise ConfigError(f"rank {self.rank} is outside 0..{last} for this run")
        if self.tls is None and not self.rendezvous.startswith("tcp://"):
            raise ConfigError(f"rendezvous must be tcp://HOST:PORT, got '{self.rendezvous}'")
        if not 0 < self.timeout_s <= 3600:
            raise ConfigError(f"timeout_s must be in (0, 3600], got {self.timeout_s}")

    @property
    def is_dealer(self) -> bool:
        return self.dealer == "ttp" and self.rank == self.world_size


def _configure(endpoint: Endpoint) -> Any:
    os.environ.update(
        WORLD_SIZE=str(endpoint.world_size),
        RANK=str(endpoint.rank),
        RENDEZVOUS=endpoint.rendezvous,
        DISTRIBUTED_BACKEND="gloo",
    )
    crypten = import_crypten()
    import torch
    import torch.distributed.distributed_c10d as c10d

    if os.environ.get(THREADS_ENV, "").isdigit() and int(os.environ[THREADS_ENV]) >= 1:
        torch.set_num_threads(int(os.environ[THREADS_ENV]))

    from mpc_rec.mpc import crypten_fixes, prg

    prg.install()
    crypten_fixes.install()
    if endpoint.tls is not None:
        from mpc_rec.transport.communicator import install

        install(endpoint.tls, rank=endpoint.rank, world_size=endpoint.world_size, timeout_s=endpoint.timeout_s)

    # CrypTen passes no timeout to torch.distributed; this default bounds every wait
    # (rendezvous, send, receive), so a dead or silent peer ends the run instead of hanging.
    c10d.default_pg_timeout = timedelta(seconds=endpoint.timeout_s)
    crypten.cfg.mpc.provider = DEALERS[endpoint.dealer]
    crypten.cfg.communicator.verbose = True  # CrypTen counts bytes and rounds only when verbose
    return crypten


class Session:
    """A compute party's CrypTen session; use as a context manager."""

    def __init__(self, endpoint: Endpoint):
        if endpoint.is_dealer:
            raise ConfigError("the dealer runs serve_dealer(), not a Session")
        self.endpoint = endpoint
        self.crypten = _configure(endpoint)

    def __enter__(self) -> "Session":
        self.crypten.init()
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        # After a peer failure the process group is unusable and shutting it down can
        # block; the caller exits the process instead.
        if exc_type is None:
            self.crypten.uninit()

    @property
    def comm(self) -> Any:
        return self.crypten.communicator.get()

    def traffic(self) -> dict[str, float]:
        stats = self.comm.get_communication_stats()
        return {"bytes": int(stats["bytes"]), "rounds": int(stats["rounds"])}


def serve_dealer(endpoint: Endpoint) -> None:
    """Run the trusted dealer (CrypTen's TTPServer plus mpc.dealer's requests) until rank 0 ends the run."""
    if not endpoint.is_dealer:
        raise ConfigError("serve_dealer needs the dealer rank (rank == world_size, dealer ttp)")
    crypten = _configure(endpoint)
    from mpc_rec.mpc.dealer import make_server_class

    if endpoint.tls is not None:
        from mpc_rec.transport import dealer

        crypten.init()
        dealer.serve(make_server_class())
        crypten.uninit()
        return
    import torch

    # TTPServer draws the seeds it shares with each party from torch's global generator,
    # which starts from a fixed default seed in every new process: reseed it from the OS.
    torch.manual_seed(secrets.randbits(63))
    make_server_class()()
