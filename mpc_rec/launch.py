"""``mpc-rec run``: write one config per local party, start them, compare with plaintext.

The launcher plays every organisation at once, so it sees all the data: it splits it,
writes each party's own files, and runs the plaintext reference. The party processes
it starts see only their own files, exactly as on separate machines.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mpc_rec import __version__
from mpc_rec.config import dump_toml
from mpc_rec.data import (
    Ratings, dense_matrices, load_ratings, partition_users, sort_ids, split_train_test,
    synthetic_ratings, write_catalogue, write_ratings_csv,
)
from mpc_rec.errors import ConfigError, InputError, PeerError
from mpc_rec.files import write_text_atomic
from mpc_rec.model import TrainConfig
from mpc_rec.mpc.session import THREADS_ENV, threads_per_process
from mpc_rec.progress import ProgressLine
from mpc_rec.reference import run_reference
from mpc_rec.release import default_epsilon, ledger_path_for, read_user_levels, write_user_levels

SECURITY_NOTES = {
    "ttp": "semi-honest parties; Beaver triples from a separate dealer process that must not collude with any party",
    "insecure-tfp": "INSECURE: party 0 generated every Beaver triple and could read every secret product",
}


# Defaults of a DP run for settings the user leaves out, by epsilon: fewer, damped steps
# (the per-step noise grows with the number of steps) and, at small epsilon, a small
# item step, so that noise does not swamp the user side. Public and data-independent;
# chosen by a plaintext simulation on ML-100K (see protocols/dp-noise.md, "Defaults").
DP_SCHEDULE = (  # (epsilon from, settings)
    (0.0, {"epochs": 10, "momentum": 0.5, "clip_step": 0.1, "item_step": 1.0}),
    (2.0, {"epochs": 10, "momentum": 0.5, "clip_step": 0.3, "item_step": 1.0}),
    (4.0, {"epochs": 10, "momentum": 0.5, "clip_step": 0.3, "item_step": 3.0}),
)


def dp_defaults(epsilon: float) -> dict[str, float]:
    return [settings for start, settings in DP_SCHEDULE if epsilon >= start][-1]


DEFAULT_PRIVACY = {"epsilon": 4.0, "delta": 1e-5, "trusted_parties": 1, "clip_step": 0.1, "clip_eval": 10.0,
                   "item_weight": 5.0, "item_step": 3.0, "budget_epsilon": 50.0, "budget_delta": 1e-3}


@dataclass(frozen=True)
class RunOptions:
    parties: int = 3
    data: Path | None = None
    train: TrainConfig = field(default_factory=TrainConfig)
    test_fraction: float = 0.2
    top_k: int = 10
    rating_range: tuple[float, float] = (1.0, 5.0)
    out: Path = Path("mpc-rec-run")
    timeout_s: float = 30.0
    dealer: str = "ttp"
    progress: bool | None = None
    privacy: dict[str, Any] | None = field(default_factory=lambda: dict(DEFAULT_PRIVACY))
    ledger_dir: Path = Path("mpc-rec-ledger")
    transport: str = "gloo"
    release: dict[str, Any] = field(default_factory=lambda: {"policy": "exact"})
    contributors: int = 0  # >0: users' rows come from this many simulated data holders (mpc_rec/ingest/)
    ingest_deadline_s: float = 1800.0
    paillier_bits: int = 2048
    contributor_faults: dict[str, str] | None = None  # simulated misbehaviour, contributor id -> fault
    transcript_dir: Path | None = None  # `mpc-rec audit`: parties record what they receive, logs kept there
    save_shares: bool = False  # each party keeps its own shares of the trained model (serving: mpc_rec/serving/refine.py)

    @classmethod
    def from_cli(cls, options: dict[str, Any]) -> "RunOptions":
        train_keys = {"epochs": "epochs", "factors": "factors", "learning_rate": "learning_rate",
                      "momentum": "momentum", "regularization": "regularization", "seed": "seed"}
        train = {name: options[key] for key, name in train_keys.items() if options.get(key) is not None}
        privacy = None
        if not options["no_dp"]:
            schedule = dp_defaults(options["epsilon"])
            train = {"epochs": schedule["epochs"], "momentum": schedule["momentum"], **train}
            privacy = dict(DEFAULT_PRIVACY, epsilon=options["epsilon"], delta=options["delta"],
                           trusted_parties=options["dp_trust"] or 1, item_step=schedule["item_step"],
                           clip_step=options["dp_clip"] or schedule["clip_step"], budget_epsilon=options["budget_epsilon"],
                           benchmark_exact_rmse=bool(options.get("benchmark_exact_rmse")))
            if not 1 <= privacy["trusted_parties"] <= options["parties"]:
                raise ConfigError(f"--dp-trust must be between 1 and --parties ({options['parties']})")
        lo, hi = options["rating_range"]
        if not lo < hi:
            raise ConfigError(f"--rating-range: smallest rating {lo} must be below largest {hi}")
        return cls(
            parties=options["parties"], data=options["data"], train=TrainConfig(**train),
            test_fraction=options["test_fraction"], rating_range=(lo, hi),
            out=options["out"], timeout_s=options["timeout_s"],
            dealer="insecure-tfp" if options["insecure_tfp_dealer"] else "ttp",
            progress=options["progress"], privacy=privacy, ledger_dir=options["ledger_dir"],
            transport=options.get("transport", "gloo"),
            release=release_options(options),
            save_shares=bool(options.get("save_shares")),
            **_ingest_options(options),
        )

    def reproducible(self, data_digest: str) -> dict[str, Any]:
        described = asdict(self)
        described.update(data=str(self.data) if self.data else "embedded-synthetic",
                         data_sha256=data_digest, out=str(self.out), train=self.train.to_dict())
        described.pop("progress")
        described["ledger_dir"] = str(self.ledger_dir)
        described["release"] = {k: str(v) if isinstance(v, Path) else v for k, v in self.release.items()}
        described["transcript_dir"] = None if self.transcript_dir is None else str(self.transcript_dir)
        return described


def release_options(options: dict[str, Any]) -> dict[str, Any]:
    """--release, --release-epsilon, --release-budget, --release-users as [release] settings."""
    release = {"policy": options.get("release") or "exact", "budget": options.get("release_budget") or 10.0}
    if options.get("release_epsilon") is not None:
        if release["policy"] != "threshold":
            raise ConfigError("--release-epsilon applies to --release threshold only")
        release["epsilon"] = options["release_epsilon"]
    elif release["policy"] == "threshold":
        raise ConfigError("--release threshold needs --release-epsilon")
    if options.get("release_users") is not None:
        release["users"] = options["release_users"]
    return release
def _ingest_options(options: dict[str, Any]) -> dict[str, Any]:
    contributors = options.get("contributors") or 0
    if not contributors:
        if options.get("contributor_faults") or options.get("insecure_1024_bit_key"):
            raise ConfigError("--contributor-faults and --insecure-1024-bit-key need --contributors")
        return {"top_k": 10 if options["top_k"] is None else options["top_k"]}
    if options["top_k"]:
        raise ConfigError("--contributors: recommendations would have to go back to the contributors; use --top-k 0")
    from mpc_rec.ingest.contributor import FAULTS

    faults = parse_faults(options.get("contributor_faults"), "--contributor-faults", FAULTS)
    return {"top_k": 0, "contributors": contributors, "ingest_deadline_s": options["ingest_deadline"],
            "paillier_bits": 1024 if options.get("insecure_1024_bit_key") else 2048, "contributor_faults": faults or None}


def parse_faults(text: str | None, option: str, known: tuple[str, ...]) -> dict[str, str]:
    """'ID:FAULT,ID:FAULT' (simulated misbehaviour for tests and demos) as {id: fault}."""
    faults = {}
    for item in filter(None, (text or "").split(",")):
        who, _, fault = item.partition(":")
        if fault not in known:
            raise ConfigError(f"{option}: '{item}' is not ID:FAULT with FAULT one of {', '.join(known)}")
        faults[who.strip()] = fault
    return faults


def _load(options: RunOptions) -> tuple[Ratings, str]:
    if options.data is None:
        ratings = synthetic_ratings(seed=options.train.seed)
        content = "\n".join(f"{u},{i},{v!r}" for u, i, v in zip(ratings.users, ratings.items, ratings.values))
        return ratings, hashlib.sha256(content.encode()).hexdigest()
    ratings = load_ratings(options.data, rating_range=options.rating_range)
    return ratings, hashlib.sha256(options.data.read_bytes()).hexdigest()


def free_port() -> int:
    """A loopback port that is free now (for the rendezvous of local runs)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class _Party:
    name: str
    rank: int
    config: Path
    output: Path | None
    staged: Path | None = None
    process: subprocess.Popen | None = None
    log: Path | None = None


def run_local(options: RunOptions) -> dict[str, Any]:
    started = time.perf_counter()
    ratings, digest = _load(options)
    train, test = split_train_test(ratings, test_fraction=options.test_fraction, seed=options.train.seed)
    blocks = partition_users(ratings, options.parties, seed=options.train.seed)
    catalogue = ratings.item_ids()
    options.out.mkdir(parents=True, exist_ok=True)
    staging = options.out / f".staging-{uuid.uuid4().hex[:8]}"
    workdir = Path(tempfile.mkdtemp(prefix="mpc-rec-run-"))
    progress = ProgressLine(total=options.train.epochs, enabled=options.progress)
    try:
        parties, user_blocks = write_deployment(options, workdir, staging, train, test, blocks, catalogue, digest)
        simulation = None
        if options.contributors:
            from mpc_rec.ingest.simulate import ContributorSimulation

            simulation = ContributorSimulation.prepare(options, workdir, parties, train, test, user_blocks, catalogue)
            progress.note(f"{options.contributors} contributors encrypting their rows")
            simulation.start()
        try:
            results = _run_processes(options, parties, workdir, progress)
        finally:
            if simulation is not None:
                simulation.stop()
        secure_s = time.perf_counter() - started
        if simulation is not None:
            ingest_report = next(r for r in results if r["rank"] == 1)["ingest"]["report"]
            user_blocks = simulation.placed_blocks(ingest_report)  # the rows actually aggregated
            placed = [user for block in user_blocks for user in block]
            train, test = (part.subset(np.isin(part.users, placed)) for part in (train, test))
        progress.note("plaintext reference run")
        reference = run_reference(train, test, user_blocks, catalogue, options.train, options.top_k)
        summary = _summarise(options, digest, ratings, train, test, user_blocks, parties, results, reference, secure_s)
        if simulation is not None:
            summary["ingest"] = simulation.summary(ingest_report, results)
        summary["outputs"] = _publish(staging, options.out, parties)
        write_text_atomic(options.out / "summary.json", json.dumps(summary, indent=2) + "\n")
        return summary
    finally:
        progress.close()
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(staging, ignore_errors=True)


def write_deployment(options, workdir, staging, train, test, blocks, catalogue, dataset="unnamed"):
    write_catalogue(catalogue, workdir / "catalogue.txt")
    names = [f"party-{rank}" for rank in range(len(blocks))] + (["dealer"] if options.dealer == "ttp" else [])
    if options.transport == "tls":  # a throw-away pilot CA and one certificate per process
        from mpc_rec.transport.certs import loopback_tls

        peers, tls = loopback_tls(workdir / "certs", names, [free_port() for _ in names])
        network = {"transport": "tls", "timeout_s": options.timeout_s}
    else:
        peers, tls = None, {}
        network = {"rendezvous": f"tcp://127.0.0.1:{free_port()}", "timeout_s": options.timeout_s}
    common = {"network": network, "dealer": {"kind": options.dealer}}
    with_tls = lambda name: {"tls": tls[name], "peer": peers} if peers else {}  # noqa: E731
    run_id, timestamp = uuid.uuid4().hex, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    parties, user_blocks = [], []
    levels = _release_levels(options, {u for block in blocks for u in block.user_ids()})
    for rank, block in enumerate(blocks):
        name = f"party-{rank}"
        users = set(block.users)
        user_blocks.append(sort_ids(users))
        own_train = train.subset(np.isin(train.users, list(users)))
        own_test = test.subset(np.isin(test.users, list(users)))
        write_ratings_csv(own_train, workdir / f"{name}-train.csv")
        write_ratings_csv(own_test, workdir / f"{name}-test.csv")
        document = {
            "party": {"name": name, "role": "compute", "rank": rank, "world_size": options.parties},
            **common,
            "data": {"train": f"{name}-train.csv", "test": f"{name}-test.csv", "catalogue": "catalogue.txt",
                     "rating_min": options.rating_range[0], "rating_max": options.rating_range[1]},
            "train": options.train.to_dict(),
            "output": {"dir": str((staging / name).resolve()), "top_k": options.top_k,
                       **({"save_shares": True} if options.save_shares else {})},
            **with_tls(name),
        }
        if options.privacy is not None:
            document["privacy"] = {
                **options.privacy, "dataset": dataset, "run_id": run_id, "timestamp": timestamp,
                "ledger": str((options.ledger_dir / f"{name}.json").resolve()),
            }
        document["release"] = _release_section(options, levels, users, workdir / f"{name}-release-users.csv",
                                               ledger_path_for(options.ledger_dir, name), run_id, timestamp)
        if options.transcript_dir is not None:
            document["audit"] = {"transcript": str(options.transcript_dir.resolve())}
        path = workdir / f"{name}.toml"
        write_text_atomic(path, dump_toml(document))
        parties.append(_Party(name, rank, path, options.out / name, staging / name))
    if options.dealer == "ttp":
        document = {"party": {"name": "dealer", "role": "dealer", "rank": options.parties,
                              "world_size": options.parties}, **common, **with_tls("dealer")}
        path = workdir / "dealer.toml"
        write_text_atomic(path, dump_toml(document))
        parties.append(_Party("dealer", options.parties, path, None))
    return parties, user_blocks


def _release_levels(options: RunOptions, all_users: set[str]) -> dict[str, float] | None:
    """The per-user file, checked against every user of the data before anything starts."""
    users_file = options.release.get("users")
    if users_file is None:
        return None
    default = default_epsilon(options.release["policy"], options.release.get("epsilon"))
    return read_user_levels(Path(users_file), default, all_users)


def _release_section(options, levels, users, users_path, ledger, run_id, timestamp) -> dict[str, Any]:
    section = {k: v for k, v in options.release.items() if k != "users"}
    if levels is not None:  # each holder gets only its own users' choices
        write_user_levels(users_path, {u: e for u, e in levels.items() if u in users})
        section["users"] = str(users_path)
    if section["policy"] == "threshold" or levels is not None:
        section.update(ledger=str(ledger), run_id=run_id, timestamp=timestamp)
    return section


def _read_party_summary(party: _Party) -> dict[str, Any]:
    return json.loads((party.staged / "party.json").read_text())


def _run_processes(options: RunOptions, parties: list[_Party], workdir: Path, progress: ProgressLine) -> list[dict[str, Any]]:
    progress.note(f"starting {options.parties} parties" + (" and the dealer" if options.dealer == "ttp" else ""))
    environment = {**os.environ, THREADS_ENV: str(threads_per_process(len(parties)))}
    if options.transcript_dir is not None:
        options.transcript_dir.mkdir(parents=True, exist_ok=True)
    for party in parties:
        party.log = (options.transcript_dir or workdir) / f"{party.name}.log"
        command = [sys.executable, "-m", "mpc_rec", "party", "--config", str(party.config)]
        if party.rank == 0:
            command.append("--events")
        with open(party.log, "wb") as log:
            party.process = subprocess.Popen(
                command, stdout=subprocess.PIPE if party.rank == 0 else log, stderr=log,
                stdin=subprocess.DEVNULL, env=environment,
            )
    reader = threading.Thread(target=_follow_events, args=(parties[0].process.stdout, progress), daemon=True)
    reader.start()
    failure = _wait_all(parties, grace_s=options.timeout_s + 10)
    reader.join(timeout=5)
    if failure is not None:
        raise failure
    return [_read_party_summary(party) for party in parties if party.output is not None]


def _follow_events(stream, progress: "ProgressLine") -> None:
    for raw in stream:
        try:
            event = json.loads(raw)
        except ValueError:
            continue
        if event.get("event") == "epoch":
            progress.update(event["epoch"], f"secure epoch {event['epoch']}/{event['epochs']}")
        elif event.get("event") == "scoring":
            progress.note("secure scoring and evaluation")


_REFUSAL_GRACE_S = 3.0


def _wait_all(parties: list[_Party], grace_s: float) -> InputError | PeerError | None:
    """Wait for every process; after the first failure give the rest grace_s, then kill.

    A party that refused its input (exit 2: bad data, an exhausted privacy budget) gives
    the rest only a few seconds: its reason is the run's, and they would otherwise wait
    out their connection timeout for it.
    """
    deadline = None
    first_failure = None
    while True:
        running = [p for p in parties if p.process.poll() is None]
        for party in parties:
            code = party.process.returncode
            if code not in (None, 0) and first_failure is None:
                first_failure = party
                deadline = time.monotonic() + (_REFUSAL_GRACE_S if code == InputError.exit_code else grace_s)
        if not running:
            break
        if deadline is not None and time.monotonic() > deadline:
            for party in running:
                party.process.kill()
                party.process.wait()
            break
        time.sleep(0.05)
    if first_failure is None:
        return None
    code = first_failure.process.returncode
    error = InputError if code == InputError.exit_code else PeerError  # keep "bad input" as such
    return error(f"{first_failure.name} failed (exit {code}): {_last_error(first_failure.log)}")


def _last_error(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("mpc-rec: error:")]
    if errors:
        return errors[-1].removeprefix("mpc-rec: error: ")
    return lines[-1] if lines else "no output"


def _publish(staging: Path, out: Path, parties: list[_Party]) -> dict[str, str]:
    """Move each party's finished outputs from staging into place, replacing older runs."""
    outputs = {}
    for party in parties:
        if party.output is None:
            continue
        if party.output.exists():
            shutil.rmtree(party.output)
        party.staged.rename(party.output)
        outputs[party.name] = str(party.output)
    return outputs


def _summarise(options, digest, ratings, train, test, user_blocks, parties, results, reference, secure_s):
    rank0 = next(r for r in results if r["rank"] == 0)
    secure_epoch = rank0["timing"]["secure_epoch_s"]
    plain_epoch = reference["plaintext_epoch_s"]
    rmse_secure = rank0["rmse_secure"]
    return {
        "mpc_rec_version": __version__,
        "dealer": options.dealer,
        "privacy": rank0["privacy"],
        "reveals": rank0["reveals"],
        "security": SECURITY_NOTES[options.dealer],
        "config": options.reproducible(digest),
        "data": {
            "users": len(ratings.user_ids()), "items": len(ratings.item_ids()),
            "train_ratings": len(train), "test_ratings": len(test),
            "users_per_party": [len(b) for b in user_blocks],
        },
        "metrics": {
            "rmse_secure": rmse_secure,
            **({"rmse_exact_unprotected": rank0["rmse_exact_unprotected"]}
               if rank0.get("rmse_exact_unprotected") is not None else {}),
            "rmse_plaintext": reference["rmse"],
            "rmse_difference": abs(rmse_secure - reference["rmse"]),
            "rmse_global_mean": reference["rmse_global_mean"],
            "top_k_agreement": _top_k_agreement(parties, reference),
        },
        "timing": {
            "secure_epoch_s": secure_epoch,
            "plaintext_epoch_s": plain_epoch,
            "secure_over_plaintext": secure_epoch / plain_epoch if plain_epoch > 0 else None,
            "secure_setup_s": rank0["timing"]["setup_s"],
            "secure_scoring_s": rank0["timing"]["scoring_s"],
            "secure_run_s": secure_s,
        },
        "parties": [
            {"name": r["name"], "rank": r["rank"], "users": r["users"],
             "bytes_sent": r["traffic"]["bytes_sent"], "rounds": r["traffic"]["rounds"],
             "training_bytes_per_epoch": r["traffic"]["training_bytes_per_epoch"],
             "training_rounds_per_epoch": r["traffic"]["training_rounds_per_epoch"],
             "peak_memory_mb": r["peak_memory_mb"]}
            for r in results
        ],
        "traffic_counted_by": rank0["traffic"]["counted_by"],
        "release": _release_summary(results),
        "budget": _budget_summary(options, parties, rank0["privacy"]),
    }


def _budget_summary(options: RunOptions, parties: list[_Party], privacy: dict[str, Any]) -> dict[str, Any] | None:
    """Each party's ledger after this run: total, spent and left for this run's data set."""
    if privacy["mode"] != "dp":
        return None
    from mpc_rec.dp.ledger import load_ledger

    dataset, ledgers = privacy["dataset"], {}
    for party in parties:
        if party.output is None:
            continue
        ledger = load_ledger(options.ledger_dir / f"{party.name}.json")
        spent, left = ledger.spent(dataset), ledger.remaining(dataset)
        ledgers[party.name] = {"total_epsilon": ledger.total.epsilon, "spent_epsilon": spent.epsilon,
                               "left_epsilon": left.epsilon, "total_delta": ledger.total.delta,
                               "spent_delta": spent.delta, "left_delta": left.delta,
                               "runs": len(ledger.datasets.get(dataset, ())), "digest": ledger.digest()}
    return {"dataset": dataset, "composition": "basic (runs on one data set add up)", "ledgers": ledgers}


def _release_summary(results: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Run-level view of the release policy: counts per party; per-user detail stays in party.json."""
    records = [(r["name"], r.get("release")) for r in results]
    if all(record is None for _, record in records):
        return None
    first = next(record for _, record in records if record is not None)
    return {
        "policy": first["policy"], "epsilon": first["epsilon"], "budget_per_user": first["budget_per_user"],
        "composition": first["composition"], "mechanism": first["mechanism"],
        "parties": {name: {"releases": record["releases"], "per_user_overrides": record["per_user_overrides"]}
                    for name, record in records if record is not None},
    }


def _top_k_agreement(parties: list[_Party], reference: dict[str, Any]) -> float:
    """Share of the plaintext reference's top-k items that the secure run also chose."""
    chosen: dict[str, set[str]] = {}
    for party in parties:
        if party.output is None:
            continue
        lines = (party.staged / "recommendations.csv").read_text().splitlines()[1:]
        for line in lines:
            user, _, item = line.split(",")
            chosen.setdefault(user, set()).add(item)
    hits = sum(len(chosen.get(user, set()) & set(items)) for user, items in reference["top_items"].items())
    # total is 0 when no recommendations were asked for (--top-k 0)
    total = sum(len(items) for items in reference["top_items"].values())
    return hits / total if total else None


def format_summary(summary: dict[str, Any]) -> str:
    m, t = summary["metrics"], summary["timing"]
    privacy = summary["privacy"]
    if privacy["mode"] == "dp":
        privacy_line = (f"  privacy: ({privacy['epsilon']:.3g}, {privacy['delta']:.0e})-DP per user, "
                        f"noise sigma {privacy['sigma_total']:.3g} per step, clip {privacy['clipping']['step']:g}; "
                        f"{privacy['trust']}")
    else:
        privacy_line = "  privacy: ** NO DIFFERENTIAL PRIVACY (--no-dp): outputs are exact **"
    lines = [
        f"mpc-rec run: {len(summary['parties'])} parties, dealer {summary['dealer']}"
        + ("  ** INSECURE DEALER **" if summary["dealer"] != "ttp" else ""),
        privacy_line,
        f"  data: {summary['data']['users']} users x {summary['data']['items']} items, "
        f"{summary['data']['train_ratings']} train / {summary['data']['test_ratings']} test ratings",
        f"  test RMSE: secure{' (a noised DP release)' if privacy['mode'] == 'dp' else ''} {m['rmse_secure']:.4f}, "
        f"plaintext reference without DP {m['rmse_plaintext']:.4f} "
        f"(global mean {m['rmse_global_mean']:.4f})"
        + (f"; exact RMSE of the DP model {m['rmse_exact_unprotected']:.4f} (revealed for benchmarking, NOT DP)"
           if "rmse_exact_unprotected" in m else "")
        + (f"; top-k agreement with plaintext {m['top_k_agreement']:.1%}" if m["top_k_agreement"] is not None else ""),
        f"  epoch: secure {t['secure_epoch_s']:.3f} s, plaintext {t['plaintext_epoch_s']:.4f} s "
        f"({t['secure_over_plaintext']:.0f}x); secure run {t['secure_run_s']:.1f} s",
        f"  outputs: {Path(summary['outputs'][summary['parties'][0]['name']]).parent}/"
        " (summary.json, one folder per party)",
    ]
    ingest = summary.get("ingest")
    if ingest is not None:
        lines.insert(3, (
            f"  ingest: {ingest['contributors_aggregated']} of {ingest['contributors_registered']} contributors "
            f"aggregated ({ingest['users_aggregated']} users; {len(ingest['rejected'])} refusal(s), "
            f"{len(ingest['withdrawn'])} withdrawn, {len(ingest['dropped'])} dropped); "
            f"{ingest['ciphertexts_per_contributor']:.0f} ciphertexts, {ingest['bytes_per_contributor'] / 1024:.0f} KiB "
            f"per contributor; {ingest['paillier']['key_bits']}-bit key"
            + ("  ** INSECURE TEST-SIZE KEY **" if ingest["paillier"]["key_bits"] < 2048 else "")))
    return "\n".join(lines)
