"""One party process: read only its own files, run the protocols, write its own outputs."""

from __future__ import annotations

import json
import resource
import time
from typing import Any, Callable

import numpy as np
import torch

from mpc_rec import __version__
from mpc_rec.config import PartyConfig
from mpc_rec.data import dense_matrices, load_ratings, read_catalogue, sort_ids
from mpc_rec.errors import PeerError
from mpc_rec.files import write_text_atomic
from mpc_rec.mpc.scoring import reveal_rows_to_owners, secure_mse, secure_top_k
from mpc_rec.mpc.session import Session, serve_dealer
from mpc_rec.mpc.sharing import agree, share_rows
from mpc_rec.mpc.training import shared_training_data, train_secure

PROTOCOL_VERSION = 1
Reporter = Callable[[dict[str, Any]], None]


def run_party(config: PartyConfig, report: Reporter = lambda event: None) -> dict[str, Any]:
    """Run this process's role to the end; returns its summary (also written to disk)."""
    if config.role == "dealer":
        serve_dealer(config.endpoint)
        return {"role": "dealer", "rank": config.endpoint.rank}
    local = _load_local_data(config)
    try:
        result = _run_protocols(config, local, report)
    except RuntimeError as exc:  # torch.distributed reports lost or silent peers this way
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PeerError(f"party '{config.name}' lost contact with the others: {detail}") from None
    _write_outputs(config, local["users"], local["catalogue"], local["rated"], result)
    return result


def _load_local_data(config: PartyConfig) -> dict[str, Any]:
    catalogue = read_catalogue(config.catalogue_path)
    train = load_ratings(config.train_path, rating_range=config.rating_range)
    test = load_ratings(config.test_path, rating_range=config.rating_range) if config.test_path else None
    users = sort_ids(list(train.users) + (list(test.users) if test is not None else []))
    ratings, mask = dense_matrices(train, users, catalogue)
    local = {"catalogue": catalogue, "users": users, "ratings": ratings, "rated": mask, "test": None}
    if test is not None:
        local["test"] = dense_matrices(test, users, catalogue)
    return local


def public_parameters(config: PartyConfig, catalogue: list[str], evaluate: bool) -> dict[str, Any]:
    """Everything the parties must agree on before any share is sent."""
    return {
        "catalogue": catalogue,
        "training_settings": config.train.to_dict(),
        "dealer": config.endpoint.dealer,
        "top_k": config.top_k,
        "rating_range": list(config.rating_range),
        "evaluation": evaluate,
        "versions": {"mpc_rec": __version__, "protocol": PROTOCOL_VERSION},
    }


def _run_protocols(config: PartyConfig, local: dict[str, Any], report: Reporter) -> dict[str, Any]:
    rank = config.endpoint.rank
    evaluate = local["test"] is not None
    to_tensor = lambda a: torch.as_tensor(a, dtype=torch.float64)  # noqa: E731
    timings: dict[str, Any] = {}
    with Session(config.endpoint) as session:
        started = time.perf_counter()
        rows = agree(session.comm, len(local["users"]), public_parameters(config, local["catalogue"], evaluate))
        ratings = share_rows(to_tensor(local["ratings"]), rows, rank)
        mask = share_rows(to_tensor(local["rated"]), rows, rank, precision=0)
        data = shared_training_data(ratings, mask)
        timings["setup_s"] = time.perf_counter() - started
        before_training = session.traffic()

        def on_epoch(epoch: int, seconds: float) -> None:
            report({"event": "epoch", "epoch": epoch, "epochs": config.train.epochs, "seconds": seconds})

        state, epoch_seconds = train_secure(data, config.train, on_epoch)
        after_training = session.traffic()
        timings["secure_epoch_s"] = float(np.mean(epoch_seconds))
        timings["epoch_s"] = epoch_seconds

        started = time.perf_counter()
        mse = None
        if evaluate:
            test_ratings, test_mask = local["test"]
            shared_test = share_rows(to_tensor(test_ratings), rows, rank)
            shared_test_mask = share_rows(to_tensor(test_mask), rows, rank, precision=0)
            mse = secure_mse(state, data.mean, shared_test, shared_test_mask)
        timings["evaluation_s"] = time.perf_counter() - started
        report({"event": "scoring"})
        started = time.perf_counter()
        my_top = np.zeros((len(local["users"]), 0))
        if config.top_k > 0:
            top = secure_top_k(state, data.mean, mask, config.top_k)
            my_top = reveal_rows_to_owners(top, rows, rank).numpy()
        timings["scoring_s"] = time.perf_counter() - started
        total = session.traffic()
    epochs = config.train.epochs
    return {
        "role": "compute",
        "name": config.name,
        "rank": rank,
        "users": len(local["users"]),
        "rows_per_party": rows,
        "rmse_secure": None if mse is None else float(np.sqrt(max(mse, 0.0))),
        "timing": timings,
        "traffic": {
            "bytes_sent": total["bytes"],
            "rounds": total["rounds"],
            "training_bytes_per_epoch": (after_training["bytes"] - before_training["bytes"]) / epochs,
            "training_rounds_per_epoch": (after_training["rounds"] - before_training["rounds"]) / epochs,
            "counted_by": "CrypTen communicator (elements x 8 bytes per send or collective)",
        },
        "peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "top_indices": np.rint(my_top).astype(np.int64),
    }


def _write_outputs(config: PartyConfig, users: list[str], catalogue: list[str], rated: np.ndarray, result: dict[str, Any]) -> None:
    """Recommendations first, then the summary: a summary on disk means a complete output."""
    lines = ["user,rank,item"]
    for row, user in enumerate(users):
        # Only a user who rated nearly every item can get a rated item back; drop it here.
        fresh = [i for i in result["top_indices"][row] if 0 <= i < len(catalogue) and rated[row, i] == 0]
        lines += [f"{user},{place},{catalogue[i]}" for place, i in enumerate(fresh, start=1)]
    config.output_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(config.output_dir / "recommendations.csv", "\n".join(lines) + "\n")
    summary = {k: v for k, v in result.items() if k != "top_indices"}
    write_text_atomic(config.output_dir / "party.json", json.dumps(summary, indent=2) + "\n")
