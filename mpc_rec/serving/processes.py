"""Start a serving session's compute parties and the TTP dealer as local processes.

For one machine (tests, trials and ``mpc-rec`` serving commands): each party process
gets only its own arguments (its own data, or its own share files), over loopback.
Organisations on separate machines run the same party functions from their own
processes; nothing here is needed for that.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_module
from typing import Any, Callable, Sequence

from mpc_rec.errors import InputError, MpcRecError, PeerError
from mpc_rec.launch import free_port
from mpc_rec.mpc.session import THREADS_ENV, Endpoint, Session, serve_dealer, threads_per_process


def _main(endpoint: Endpoint, function: Callable, args: tuple, results: Any) -> None:
    os.environ[THREADS_ENV] = str(threads_per_process(endpoint.world_size + 1))
    try:
        if endpoint.is_dealer:
            serve_dealer(endpoint)
            return
        with Session(endpoint) as session:
            results.put((endpoint.rank, "ok", function(session, *args)))
    except InputError as exc:  # the party's own input is bad: its one line, its exit code
        results.put((endpoint.rank, "input", str(exc)))
    except MpcRecError as exc:
        results.put((endpoint.rank, "error", f"{type(exc).__name__}: {exc}"))
    except BaseException as exc:  # noqa: BLE001 - reported to the launcher, which decides
        results.put((endpoint.rank, "error", f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"))


def run_session(function: Callable, per_party_args: Sequence[tuple], *, timeout_s: float = 120.0,
                wait_s: float = 600.0) -> list[Any]:
    """function(session, *per_party_args[r]) in each party process (plus the dealer); rank-ordered results."""
    world_size = len(per_party_args)
    context = mp.get_context("spawn")  # a fresh interpreter: CrypTen's globals start clean
    results = context.Queue()
    rendezvous = f"tcp://127.0.0.1:{free_port()}"
    processes = [
        context.Process(target=_main, args=(Endpoint(rank, world_size, rendezvous, "ttp", timeout_s), function,
                                            per_party_args[rank] if rank < world_size else (), results))
        for rank in range(world_size + 1)
    ]
    for process in processes:
        process.start()
    collected: dict[int, Any] = {}
    try:
        for _ in range(world_size):
            try:
                rank, status, value = results.get(timeout=wait_s)
            except queue_module.Empty:
                raise PeerError(f"a serving party gave no answer within {wait_s:.0f} s") from None
            if status == "input":
                raise InputError(value)
            if status != "ok":
                raise PeerError(f"serving party {rank} failed: {value}")
            collected[rank] = value
    finally:
        for process in processes:
            process.join(timeout=20)
            if process.is_alive():
                process.kill()
    return [collected[r] for r in range(world_size)]
