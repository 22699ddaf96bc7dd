"""One party process: read only its own files, run the protocols, write its own outputs."""

from __future__ import annotations

import json
import resource
import time
from typing import Any, Callable

import numpy as np
import torch

from mpc_rec import __version__
from mpc_rec.audit import transcript
from mpc_rec.config import PartyConfig
from mpc_rec.data import dense_matrices, load_ratings, read_catalogue, sort_ids
from mpc_rec.dp.reveal import RevealLog, declare_public, noised
from mpc_rec.errors import PeerError
from mpc_rec.files import write_text_atomic
from mpc_rec.mpc.reveal import log_entries, open_rows_to_owners, open_to_all
from mpc_rec.mpc.scoring import secure_mse, secure_top_k
from mpc_rec.mpc.session import Session, serve_dealer
from mpc_rec.mpc.sharing import agree, share_rows
from mpc_rec.mpc.training import shared_training_data, train_secure
from mpc_rec.release import check_user_levels

PROTOCOL_VERSION = 2
NO_DP_REASON = "no-dp run: exact value, for benchmarking only"
EXACT_RMSE_REASON = "benchmark_exact_rmse: the exact test MSE of the DP model, NOT covered by the DP guarantee"
Reporter = Callable[[dict[str, Any]], None]


def run_party(config: PartyConfig, report: Reporter = lambda event: None) -> dict[str, Any]:
    """Run this process's role to the end; returns its summary (also written to disk)."""
    if config.role == "dealer":
        if config.ingest is not None:  # join the rendezvous only once the rows have arrived
            from mpc_rec.ingest.phase import ingest_before_session

            ingest_before_session(config, 0)
        serve_dealer(config.endpoint)
        return {"role": "dealer", "rank": config.endpoint.rank}
    catalogue = read_catalogue(config.catalogue_path)  # public
    plan, ledger_digest = _reserve_budget(config, len(catalogue))  # before any private data is read
    local = _load_local_data(config, catalogue)
    check_user_levels(config.release, local["users"])  # a bad per-user file fails before any MPC work
    if config.ingest is not None:
        from mpc_rec.ingest.phase import ingest_before_session

        local["ingested"] = ingest_before_session(config, len(catalogue))
    try:
        result = _run_protocols(config, local, plan, ledger_digest, report)
    except RuntimeError as exc:  # torch.distributed reports lost or silent peers this way
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PeerError(f"party '{config.name}' lost contact with the others: {detail}") from None
    _write_outputs(config, local, result)
    return result


def _reserve_budget(config: PartyConfig, n_items: int) -> tuple[Any, str | None]:
    """Calibrate the noise for the requested (epsilon, delta) and book it in the ledger."""
    privacy = config.privacy
    if privacy is None:
        return None, None
    from mpc_rec.dp.accounting import calibrate
    from mpc_rec.dp.clipping import ClipBounds
    from mpc_rec.dp.ledger import create_ledger, ledger_digest, reserve_for_plan

    plan = calibrate(
        target_epsilon=privacy.epsilon, delta=privacy.delta, steps=config.train.epochs,
        clip=ClipBounds(step=privacy.clip_step, mean=privacy.clip_eval),
        dimension=n_items * (config.train.factors + 1), parties=config.endpoint.world_size,
        trusted_parties=privacy.trusted_parties,
        mean_releases=1 if config.test_path or config.ingest else 0,  # ingest always brings held-out rows
    )
    if not privacy.ledger.exists():
        privacy.ledger.parent.mkdir(parents=True, exist_ok=True)
        create_ledger(privacy.ledger, total_epsilon=privacy.budget_epsilon, total_delta=privacy.budget_delta)
    reserve_for_plan(privacy.ledger, plan, dataset=privacy.dataset, run_id=privacy.run_id, timestamp=privacy.timestamp)
    return plan, ledger_digest(privacy.ledger)


def _load_local_data(config: PartyConfig, catalogue: list[str]) -> dict[str, Any]:
    if config.ingest is not None:  # no rows of its own: they arrive from contributors
        empty = np.zeros((0, len(catalogue)))
        return {"catalogue": catalogue, "users": [], "ratings": empty, "rated": empty, "test": None, "ingested": None}
    train = load_ratings(config.train_path, rating_range=config.rating_range)
    test = load_ratings(config.test_path, rating_range=config.rating_range) if config.test_path else None
    users = sort_ids(list(train.users) + (list(test.users) if test is not None else []))
    ratings, mask = dense_matrices(train, users, catalogue)
    local = {"catalogue": catalogue, "users": users, "ratings": ratings, "rated": mask, "test": None}
    if test is not None:
        local["test"] = dense_matrices(test, users, catalogue)
    return local


def public_parameters(config: PartyConfig, catalogue: list[str], evaluate: bool, plan: Any, ledger: str | None) -> dict[str, Any]:
    """Everything the parties must agree on before any share is sent."""
    return {
        "catalogue": catalogue,
        "training_settings": config.train.to_dict(),
        "dealer": config.endpoint.dealer,
        "top_k": config.top_k,
        "rating_range": list(config.rating_range),
        "evaluation": evaluate,
        "privacy_settings": None if config.privacy is None else config.privacy.public(),
        "noise_plan": None if plan is None else plan.digest(),
        "privacy_ledger": ledger,
        "versions": {"mpc_rec": __version__, "protocol": PROTOCOL_VERSION},
    }


def _run_protocols(config: PartyConfig, local: dict[str, Any], plan: Any, ledger: str | None, report: Reporter) -> dict[str, Any]:
    from mpc_rec.mpc.privacy import noised_item_aggregates, private_mse, private_training_data

    rank = config.endpoint.rank
    ingested = local.get("ingested")
    evaluate = local["test"] is not None or ingested is not None
    to_tensor = lambda a: torch.as_tensor(a, dtype=torch.float64)  # noqa: E731
    reveals = RevealLog(plan_digest=None if plan is None else plan.digest())
    timings: dict[str, Any] = {}
    with Session(config.endpoint) as session:
        if config.transcript_dir is not None:  # `mpc-rec audit`
            transcript.install(config.transcript_dir, rank, config.transcript_max_elements)
        transcript.set_phase("agreement")
        started = time.perf_counter()
        public = public_parameters(config, local["catalogue"], evaluate, plan, ledger)
        if ingested is None:
            rows = agree(session.comm, len(local["users"]), public)
            transcript.set_phase("input-sharing")
            ratings = share_rows(to_tensor(local["ratings"]), rows, rank)
            mask = share_rows(to_tensor(local["rated"]), rows, rank, precision=0)
        else:
            from mpc_rec.ingest.phase import public_description, shared_inputs

            rows = agree(session.comm, 0, {**public, "ingest": public_description(ingested)})
            transcript.set_phase("input-sharing")
            ratings, mask, *ingested_test = shared_inputs(session, ingested, len(local["catalogue"]), config.rating_range)
        transcript.set_phase("training-setup")
        if plan is None:
            data, hook = shared_training_data(ratings, mask), None
        else:
            midpoint = sum(config.rating_range) / 2
            privacy = config.privacy
            data = private_training_data(ratings, mask, midpoint=midpoint, item_weight=privacy.item_weight,
                                         item_step=privacy.item_step)
            hook = noised_item_aggregates(plan, factors=config.train.factors, item_step=privacy.item_step)
        timings["setup_s"] = time.perf_counter() - started
        before_training = session.traffic()

        def on_epoch(epoch: int, seconds: float) -> None:
            report({"event": "epoch", "epoch": epoch, "epochs": config.train.epochs, "seconds": seconds})
            transcript.set_phase(f"training-epoch-{epoch + 1}")

        transcript.set_phase("training-epoch-1")
        state, epoch_seconds, step_setup_seconds = train_secure(data, config.train, on_epoch, item_aggregates=hook)
        timings["setup_s"] += step_setup_seconds
        after_training = session.traffic()
        model_shares = None
        if config.save_shares:  # this party's own shares, kept for serving and never opened
            from mpc_rec.serving.refine import model_shares_record

            model_shares = model_shares_record(session, state, data.mean, rows)
        timings["secure_epoch_s"] = float(np.mean(epoch_seconds))
        timings["epoch_s"] = epoch_seconds

        report({"event": "scoring"})
        transcript.set_phase("evaluation")
        started = time.perf_counter()
        mse = exact_mse = None
        if evaluate:
            if ingested is None:
                test_ratings, test_mask = local["test"]
                shared_test = share_rows(to_tensor(test_ratings), rows, rank)
                shared_test_mask = share_rows(to_tensor(test_mask), rows, rank, precision=0)
            else:
                shared_test, shared_test_mask = ingested_test
            if plan is None:
                tagged = declare_public(secure_mse(state, data.mean, shared_test, shared_test_mask), reason=NO_DP_REASON)
            else:
                value = private_mse(state, data.mean, shared_test, shared_test_mask, plan)
                tagged = noised(value, plan=plan, release="mean", index=0, aggregate="test MSE")
            with transcript.phase("evaluation-reveal"):
                mse = float(open_to_all(tagged, name="test MSE", log=reveals))
            if plan is not None and config.privacy.benchmark_exact_rmse:
                exact = declare_public(secure_mse(state, data.mean, shared_test, shared_test_mask), reason=EXACT_RMSE_REASON)
                with transcript.phase("evaluation-reveal"):
                    exact_mse = float(open_to_all(exact, name="exact test MSE (benchmarking)", log=reveals))
        timings["evaluation_s"] = time.perf_counter() - started
        started = time.perf_counter()
        my_top = np.zeros((len(local["users"]), 0))
        transcript.set_phase("top-k")
        if config.top_k > 0:
            top = secure_top_k(state, data.mean, mask, config.top_k)
            if plan is None:
                tagged = declare_public(top, reason=NO_DP_REASON)
            else:
                tagged = noised(top, plan=plan, release="step", index=plan.steps - 1,
                                aggregate="top-k: own users' data and the noised item side (joint DP)")
            with transcript.phase("top-k-reveal"):
                my_top = open_rows_to_owners(tagged, rows, rank, name="top-k item indices", log=reveals).numpy()
        timings["scoring_s"] = time.perf_counter() - started
        total = session.traffic()
        transcript.close()
    epochs = config.train.epochs
    return {
        "role": "compute",
        "name": config.name,
        "rank": rank,
        "users": len(local["users"]) if ingested is None else sum(ingested.rows),
        "rows_per_party": rows,
        "ingest": None if ingested is None else {
            "rows_per_contributor": ingested.rows, "seconds_before_session": ingested.seconds,
            "report": ingested.report,  # the aggregator's only
        },
        "rmse_secure": None if mse is None else float(np.sqrt(max(mse, 0.0))),
        "rmse_exact_unprotected": None if exact_mse is None else float(np.sqrt(max(exact_mse, 0.0))),
        "privacy": _privacy_record(config, plan, ledger),
        "reveals": log_entries(reveals),
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
        "model_shares": model_shares,
    }


def _privacy_record(config: PartyConfig, plan: Any, ledger: str | None) -> dict[str, Any]:
    if plan is None:
        return {"mode": "no-dp", "note": "no differential privacy: outputs are exact (benchmarking only)"}
    return {
        "mode": "dp",
        "epsilon": plan.epsilon,
        "delta": plan.delta,
        "target_epsilon": plan.target_epsilon,
        "mechanism": plan.mechanism,
        "accountant": plan.accountant,
        "noise_multiplier": plan.noise_multiplier,
        "sigma_total": plan.sigma_total,
        "sigma_party": plan.sigma_party,
        "eval_sigma_total": plan.mean_sigma_total,
        "clipping": {"step": plan.clip.step, "eval": plan.clip.mean},
        "trust": plan.trust_assumption,
        "neighbouring": "user-level (all ratings of one user), replace-one",
        "global_mean": "public midpoint of the rating scale (no budget)",
        "item_penalty_weight": config.privacy.item_weight,
        "item_step": config.privacy.item_step,
        "benchmark_exact_rmse": ("the exact test RMSE was revealed too: NOT covered by the DP guarantee"
                                 if config.privacy.benchmark_exact_rmse else False),
        "dataset": config.privacy.dataset,
        "ledger_digest": ledger,
        "plan": plan.to_dict(),
    }


def _write_outputs(config: PartyConfig, local: dict[str, Any], result: dict[str, Any]) -> None:
    """Recommendations first, then the summary: a summary on disk means a complete output.

    The release policy (mpc_rec.release) turns each user's revealed top-k into the list
    the user is shown; explanations are computed here, from this party's own data only.
    """
    from mpc_rec.explain import explain
    from mpc_rec.release import release_lists

    users, catalogue, rated = local["users"], local["catalogue"], local["rated"]
    ranked, unrated = [], []
    for row in range(len(users)):
        # Only a user who rated nearly every item can get a rated item back; drop it here.
        ranked.append([catalogue[i] for i in result["top_indices"][row] if 0 <= i < len(catalogue) and rated[row, i] == 0])
        unrated.append([catalogue[i] for i in np.flatnonzero(rated[row] == 0)])
    shown, record = release_lists(config.release, users, ranked, unrated, top_k=config.top_k) if config.top_k else (ranked, None)
    lines = ["user,rank,item"]
    for user, items in zip(users, shown):
        lines += [f"{user},{place},{item}" for place, item in enumerate(items, start=1)]
    config.output_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(config.output_dir / "recommendations.csv", "\n".join(lines) + "\n")
    if config.top_k:
        explained = explain(users, catalogue, local["ratings"], rated, shown)
        write_text_atomic(config.output_dir / "explanations.json", json.dumps(explained, indent=1) + "\n")
    if result["model_shares"] is not None:
        from mpc_rec.serving.refine import SHARES_FILE, save_model_shares

        shares = result["model_shares"]
        save_model_shares(config.output_dir / SHARES_FILE, shares["arrays"], {
            **shares["meta"], "users": users, "catalogue": catalogue,
            "plan": None if result["privacy"]["mode"] == "no-dp" else result["privacy"]["plan"]})
    summary = {k: v for k, v in result.items() if k not in ("top_indices", "model_shares")}
    summary["release"] = record
    write_text_atomic(config.output_dir / "party.json", json.dumps(summary, indent=2) + "\n")
