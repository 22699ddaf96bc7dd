"""Run a function in real, separate party processes (plus the TTP dealer) over loopback."""

from __future__ import annotations

import multiprocessing as mp
import os
import traceback
from typing import Any, Callable

from mpc_rec.launch import free_port
from mpc_rec.mpc.session import THREADS_ENV, Endpoint, Session, serve_dealer


def _party_main(endpoint: Endpoint, function: Callable, args: tuple, queue: Any) -> None:
    os.environ[THREADS_ENV] = "1"  # several processes share this machine's cores
    try:
        if endpoint.is_dealer:
            serve_dealer(endpoint)
            return
        with Session(endpoint) as session:
            queue.put((endpoint.rank, "ok", function(session, *args)))
    except BaseException:  # report everything to the test, which decides
        queue.put((endpoint.rank, "error", traceback.format_exc()))


def run_parties(function: Callable, world_size: int, *args: Any, dealer: str = "ttp",
                timeout_s: float = 30.0, wait_s: float = 240.0, tls: list[Any] | None = None) -> list[Any]:
    """Call function(session, *args) in each of world_size party processes; rank-ordered results.

    ``tls``: one TlsSettings per process (dealer last) to run over the TLS transport.
    """
    context = mp.get_context("spawn")
    queue = context.Queue()
    rendezvous = f"tcp://127.0.0.1:{free_port()}"
    ranks = range(world_size + (1 if dealer == "ttp" else 0))
    processes = [
        context.Process(target=_party_main, args=(Endpoint(r, world_size, rendezvous, dealer, timeout_s, tls[r] if tls else None), function, args, queue))
        for r in ranks
    ]
    for process in processes:
        process.start()
    results: dict[int, Any] = {}
    try:
        for _ in range(world_size):
            rank, status, value = queue.get(timeout=wait_s)
            if status != "ok":
                raise AssertionError(f"party {rank} failed:\n{value}")
            results[rank] = value
    finally:
        for process in processes:
            process.join(timeout=20)
            if process.is_alive():
                process.kill()
    return [results[r] for r in range(world_size)]
