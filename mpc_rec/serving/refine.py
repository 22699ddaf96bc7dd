"""Hybrid serving: a holder's local candidates re-ranked by the secret-shared joint model.

At rest, each compute party keeps its own additive shares of the model it trained
(``mpc-rec run --save-shares``: ``<party dir>/model-shares.npz``, mode 0600). The
model is never opened: a serving session of the same parties (real CrypTen processes
and the TTP dealer) loads the shares and answers one query:

1. the parties agree on the model id, the holder's rank and the public sizes C
   (candidates) and k; the holder is the party whose user asks;
2. the holder secret-shares a one-hot selection of the user's row within its own
   block of users and a C x I one-hot selection of its candidates;
3. on shares: x_u = selection . (P, b) of the holder's block; the candidates' factors
   and biases S Q, S c; scores of the C candidates; secure top-k (mpc.scoring);
4. the k positions (indices into the holder's own candidate list) are opened to the
   holder alone, through the reveal choke point.

The other parties learn C, k and that the holder asked; not the user, the candidates
or the result. See protocols/serving.md.
"""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mpc_rec.errors import DataError, InputError
from mpc_rec.files import write_bytes_atomic

SHARES_FILE = "model-shares.npz"
_PARTS = ("user_factors", "item_factors", "user_bias", "item_bias")
NO_DP_REASON = "no-dp model: exact value, for benchmarking only"


def model_shares_record(session: Any, state: Any, mean: Any, rows_per_party: list[int]) -> dict[str, Any]:
    """This party's own shares of the trained model (int64 ring elements) and a model id all parties share.

    The id mixes a random number from every party, so shares of different runs never pair up.
    """
    import hashlib
    import secrets

    nonces = session.comm.all_gather(torch.tensor([secrets.randbits(63)], dtype=torch.long))
    model_id = hashlib.sha256(json.dumps([int(t[0]) for t in nonces]).encode()).hexdigest()
    arrays = {name: getattr(state, name)._tensor.share.numpy().copy() for name in _PARTS}
    if hasattr(mean, "_tensor"):
        arrays["mean_share"] = mean._tensor.share.numpy().copy()
    else:  # the public midpoint of the rating scale (DP runs)
        arrays["mean_public"] = np.asarray(float(mean), dtype=np.float64)
    return {"arrays": arrays, "meta": {"model_id": model_id, "rank": session.endpoint.rank,
                                       "world_size": session.endpoint.world_size, "rows_per_party": rows_per_party}}


def save_model_shares(path: Path, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    """Write this party's shares; only this party can read the file (0600)."""
    buffer = io.BytesIO()
    np.savez(buffer, meta=np.asarray(json.dumps(meta, sort_keys=True)), **arrays)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))  # write_bytes_atomic keeps an existing file's mode
    os.chmod(path, 0o600)
    write_bytes_atomic(path, buffer.getvalue())


def load_model_shares(path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    name = os.fspath(path)
    try:
        with np.load(name, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
        meta = json.loads(str(arrays.pop("meta")))
    except (OSError, ValueError, EOFError, KeyError) as exc:
        raise DataError(f"{name}: not a readable model shares file ({exc})") from None
    needed = ("model_id", "rank", "world_size", "rows_per_party", "users", "catalogue", "plan")
    if not isinstance(meta, dict) or any(key not in meta for key in needed):
        raise DataError(f"{name}: model shares file without its description")
    if any(arrays.get(part) is None or arrays[part].dtype != np.int64 for part in _PARTS):
        raise DataError(f"{name}: model shares must be int64 ring elements")
    return arrays, meta


def _shared(share: np.ndarray) -> Any:
    from mpc_rec.compat import import_crypten

    return import_crypten().mpc.MPCTensor.from_shares(torch.from_numpy(share))


def refine_party(session: Any, shares_path: str, query: dict[str, Any] | None) -> dict[str, Any]:
    """One compute party's part of a refinement; ``query`` only at the holder."""
    from mpc_rec.compat import import_crypten
    from mpc_rec.dp.accounting import NoisePlan
    from mpc_rec.dp.reveal import RevealLog, declare_public, guard_reveal, noised
    from mpc_rec.model import ModelState
    from mpc_rec.mpc.reveal import log_entries
    from mpc_rec.mpc.scoring import secure_top_k
    from mpc_rec.mpc.sharing import agree, row_ranges

    crypten = import_crypten()
    arrays, meta = load_model_shares(shares_path)
    rank = session.endpoint.rank
    if meta["rank"] != rank or meta["world_size"] != session.endpoint.world_size:
        raise DataError(f"{shares_path}: shares of rank {meta['rank']} of {meta['world_size']}, "
                        f"but this is rank {rank} of {session.endpoint.world_size}")
    started = time.perf_counter()
    rows = meta["rows_per_party"]
    n_items = len(meta["catalogue"])
    sizes = torch.tensor([-1, 0, 0] if query is None else [rank, len(query["positions"]), query["k"]], dtype=torch.long)
    gathered = [t.tolist() for t in session.comm.all_gather(sizes)]
    asked = [g for g in gathered if g[0] >= 0]
    if len(asked) != 1:
        raise InputError(f"a refinement needs exactly one asking holder, got {len(asked)}")
    holder, n_candidates, k = asked[0]
    agree(session.comm, 0, {"model_id": meta["model_id"], "query": [holder, n_candidates, k]})
    if not 1 <= k <= n_candidates <= n_items:
        raise InputError(f"need 1 <= k <= candidates <= {n_items} items, got k={k}, candidates={n_candidates}")

    own_rows = rows[holder]
    user_pick = torch.zeros(own_rows, dtype=torch.float64)
    selection = torch.zeros((n_candidates, n_items), dtype=torch.float64)
    if query is not None:
        user_pick[query["row"]] = 1.0
        selection[torch.arange(n_candidates), torch.as_tensor(query["positions"])] = 1.0
    shared_pick = crypten.cryptensor(user_pick, src=holder)
    shared_selection = crypten.cryptensor(selection, src=holder)

    block = row_ranges(rows)[holder]
    user_factors, item_factors, user_bias, item_bias = (_shared(arrays[name]) for name in _PARTS)
    picked_factors = shared_pick.unsqueeze(0).matmul(user_factors[block])  # 1 x K
    picked_bias = (shared_pick * user_bias[block]).sum().unsqueeze(0)  # 1
    state = ModelState(picked_factors, shared_selection.matmul(item_factors), picked_bias,
                       shared_selection.matmul(item_bias))
    # mu and b_u shift every candidate alike: the order needs neither, so mu is left at 0.
    top = secure_top_k(state, torch.tensor(0.0, dtype=torch.float64), torch.zeros(1, n_candidates), k)

    log = RevealLog(plan_digest=None if meta["plan"] is None else NoisePlan.from_dict(meta["plan"]).digest())
    if meta["plan"] is None:
        tagged = declare_public(top, reason=NO_DP_REASON)
    else:
        plan = NoisePlan.from_dict(meta["plan"])
        tagged = noised(top, plan=plan, release="step", index=plan.steps - 1,
                        aggregate="re-ranked top-k: the holder's own user and candidates, the noised item side (joint DP)")
    opened = guard_reveal(tagged, name="re-ranked top-k positions (to the asking holder only)", log=log)
    positions = opened.get_plain_text(dst=holder)
    result = {"rank": rank, "reveals": log_entries(log), "seconds": time.perf_counter() - started,
              "traffic": session.traffic(), "candidates": n_candidates, "k": k}
    if query is not None:
        result["order"] = [int(p) for p in np.rint(positions.numpy()[0]).astype(np.int64)]
    return result


def find_holder(run_dir: Path, user: str) -> tuple[list[Path], int, dict[str, Any]]:
    """Every party's shares file in a local run folder, the rank holding ``user`` and its description."""
    paths = sorted(run_dir.glob(f"party-*/{SHARES_FILE}"), key=lambda p: int(p.parent.name.split("-")[-1]))
    if not paths:
        raise InputError(f"{run_dir}: no {SHARES_FILE} under party-*/ (train with `mpc-rec run --save-shares`)")
    for path in paths:
        _, meta = load_model_shares(path)
        if user in meta["users"]:
            return paths, int(meta["rank"]), meta
    raise InputError(f"user {user!r} is in no party's part of the shared model in {run_dir}")


def refine_local(run_dir: Path, user: str, candidates: list[str], k: int, *, timeout_s: float = 120.0) -> tuple[list[str], dict[str, Any]]:
    """Re-rank ``candidates`` for ``user`` with the parties' shares (one local process each)."""
    from mpc_rec.serving.processes import run_session

    paths, holder, meta = find_holder(Path(run_dir), user)
    catalogue = {item: j for j, item in enumerate(meta["catalogue"])}
    missing = [item for item in candidates if item not in catalogue]
    if missing:
        raise DataError(f"candidate item {missing[0]!r} is not in the shared model's catalogue")
    if not candidates:
        return [], {"candidates": 0}
    k = min(k, len(candidates))
    query = {"row": meta["users"].index(user), "positions": [catalogue[item] for item in candidates], "k": k}
    started = time.perf_counter()
    results = run_session(refine_party, [(str(path), query if rank == holder else None) for rank, path in enumerate(paths)],
                          timeout_s=timeout_s)
    mine = results[holder]
    record = {"holder_rank": holder, "candidates": len(candidates), "k": k, "mpc_seconds": mine["seconds"],
              "session_seconds": time.perf_counter() - started, "reveals": mine["reveals"],
              "bytes_per_party": [r["traffic"]["bytes"] for r in results]}
    return [candidates[p] for p in mine["order"]], record
