"""``mpc-rec run --mode federated``: holders, compute parties and the dealer on one machine.

The launcher plays every organisation at once: it splits the ratings 80/20, deals users
to H data holders (disjoint), gives each holder its own folder with its own files, plays
the key holder's set-up step (a Paillier key pair; the private half only in party 0's
file, mode 0600), writes one configuration per process, starts N compute parties, the
dealer and H holders, and afterwards reports the run's metrics as the compute parties
released them (the evaluation round: noised, clipped sums; protocols/federated.md).
Holder folders (``OUT/holders/<id>/``) persist across runs, like a device's storage: a
``controls.json`` left there applies to the next run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mpc_rec import __version__
from mpc_rec.config import dump_toml
from mpc_rec.data import Ratings, load_ratings, split_train_test, synthetic_ratings, write_catalogue, write_ratings_csv
from mpc_rec.errors import ConfigError, DataError
from mpc_rec.federated.config import HOLDER_FAULTS
from mpc_rec.federated.holder import peak_memory_mb
from mpc_rec.files import write_text_atomic
from mpc_rec.launch import DEFAULT_PRIVACY, _Party, _wait_all, free_port, parse_faults
from mpc_rec.mpc.session import THREADS_ENV
from mpc_rec.paillier.keys import generate_keypair, save_private_key, save_public_key

DEFAULTS = {"rounds": 5, "factors": 4, "learning_rate": 0.03, "momentum": 0.5, "regularization": 20.0,
            "item_regularization": 10.0, "init_scale": 0.1}


@dataclass(frozen=True)
class FederatedOptions:
    holders: int
    parties: int = 3
    data: Path | None = None
    rounds: int = DEFAULTS["rounds"]
    factors: int = DEFAULTS["factors"]
    learning_rate: float = DEFAULTS["learning_rate"]
    momentum: float = DEFAULTS["momentum"]
    regularization: float = DEFAULTS["regularization"]
    seed: int = 0
    test_fraction: float = 0.2
    rating_range: tuple[float, float] = (1.0, 5.0)
    out: Path = Path("mpc-rec-run")
    timeout_s: float = 30.0
    privacy: dict[str, Any] | None = None  # epsilon, delta, trusted_parties, budget_epsilon; None: --no-dp
    clip: float = 0.1
    ledger_dir: Path = Path("mpc-rec-ledger")
    paillier_bits: int = 2048
    holder_faults: dict[str, str] | None = None
    wait_s: float = 1800.0
    transport: str = "gloo"  # "tls": compute mesh and holder channel over TLS 1.3 with a throw-away pilot CA
    clip_eval: float = DEFAULT_PRIVACY["clip_eval"]  # the joint mode's C_eval
    benchmark_exact_rmse: bool = False  # also open the exact test sums: NOT covered by the DP guarantee

    @property
    def evaluation(self) -> str:
        """The evaluation round's vector (federated/evaluation.py), as in the joint mode: exact without DP."""
        if self.privacy is None:
            return "exact"
        return "clipped+exact" if self.benchmark_exact_rmse else "clipped"

    @classmethod
    def from_cli(cls, options: dict[str, Any]) -> "FederatedOptions":
        holders = options.get("holders")
        if not holders or holders < 1:
            raise ConfigError("--mode federated needs --holders H with H >= 1 (the number of data holders)")
        for flag, name in (("contributors", "--contributors"), ("contributor_faults", "--contributor-faults")):
            if options.get(flag):
                raise ConfigError(f"{name} belongs to the joint mode's row ingest; --mode federated uses --holders")
        if options.get("insecure_tfp_dealer"):
            raise ConfigError("--mode federated always runs the TTP dealer; --insecure-tfp-dealer is not available")
        if options.get("save_shares"):
            raise ConfigError("--save-shares belongs to the joint mode; --mode federated keeps no shared model")
        lo, hi = options["rating_range"]
        if not lo < hi:
            raise ConfigError(f"--rating-range: smallest rating {lo} must be below largest {hi}")
        privacy = None
        if not options["no_dp"]:
            privacy = {"epsilon": options["epsilon"], "delta": options["delta"],
                       "trusted_parties": options["dp_trust"] or 1, "budget_epsilon": options["budget_epsilon"],
                       "budget_delta": 1e-3}
            if not 1 <= privacy["trusted_parties"] <= options["parties"]:
                raise ConfigError(f"--dp-trust must be between 1 and --parties ({options['parties']})")
        faults = parse_faults(options.get("holder_faults"), "--holder-faults", HOLDER_FAULTS)
        pick = lambda key, name: DEFAULTS[name] if options.get(key) is None else options[key]  # noqa: E731
        return cls(holders=holders, parties=options["parties"], data=options["data"], rounds=pick("epochs", "rounds"),
                   factors=pick("factors", "factors"), learning_rate=pick("learning_rate", "learning_rate"),
                   momentum=pick("momentum", "momentum"), regularization=pick("regularization", "regularization"),
                   seed=options["seed"], test_fraction=options["test_fraction"], rating_range=(lo, hi),
                   out=options["out"], timeout_s=options["timeout_s"], privacy=privacy, clip=options["dp_clip"] or cls.clip,
                   ledger_dir=options["ledger_dir"],
                   paillier_bits=1024 if options.get("insecure_1024_bit_key") else 2048, holder_faults=faults or None,
                   transport=options.get("transport", "gloo"),
                   benchmark_exact_rmse=bool(options.get("benchmark_exact_rmse")) and privacy is not None)


def _load(options: FederatedOptions) -> tuple[Ratings, str]:
    if options.data is None:
        ratings = synthetic_ratings(seed=options.seed)
        content = "\n".join(f"{u},{i},{v!r}" for u, i, v in zip(ratings.users, ratings.items, ratings.values))
        return ratings, hashlib.sha256(content.encode()).hexdigest()
    ratings = load_ratings(options.data, rating_range=options.rating_range)
    return ratings, hashlib.sha256(options.data.read_bytes()).hexdigest()


def deal_users(ratings: Ratings, holders: int, *, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(sorted user ids, holder of each user): users dealt round-robin after a seeded shuffle."""
    user_ids = np.unique(ratings.users.astype(str))
    if len(user_ids) < holders:
        raise DataError(f"cannot deal {len(user_ids)} users to {holders} holders (--holders is larger than the user count)")
    holder_of_user = np.empty(len(user_ids), dtype=np.int64)
    holder_of_user[np.random.default_rng([seed, 11]).permutation(len(user_ids))] = np.arange(len(user_ids)) % holders
    return user_ids, holder_of_user


def holder_of(ratings: Ratings, user_ids: np.ndarray, holder_of_user: np.ndarray) -> np.ndarray:
    """The holder of each rating (vectorised lookup of its user)."""
    return holder_of_user[np.searchsorted(user_ids, ratings.users.astype(str))]


def _item_mean_rmse(train: Ratings, test: Ratings, catalogue: list[str], mean: float) -> float:
    """The plaintext item-mean baseline (the launcher sees all data; a reference only)."""
    index = {item: k for k, item in enumerate(catalogue)}
    tr = np.fromiter((index[i] for i in train.items), dtype=np.int64, count=len(train))
    te = np.fromiter((index[i] for i in test.items), dtype=np.int64, count=len(test))
    sums, counts = np.bincount(tr, train.values, len(catalogue)), np.bincount(tr, minlength=len(catalogue))
    means = np.where(counts > 0, sums / np.maximum(counts, 1), mean)
    return float(np.sqrt(np.mean((means[te] - test.values) ** 2)))


def run_federated(options: FederatedOptions) -> dict[str, Any]:
    started = time.perf_counter()
    ratings, digest = _load(options)
    train, test = split_train_test(ratings, test_fraction=options.test_fraction, seed=options.seed)
    catalogue = ratings.item_ids()
    user_ids, holder_of_user = deal_users(ratings, options.holders, seed=options.seed)
    train_holder, test_holder = holder_of(train, user_ids, holder_of_user), holder_of(test, user_ids, holder_of_user)
    holder_ids = [f"h{k + 1:03d}" for k in range(options.holders)]
    unknown = sorted(set(options.holder_faults or {}) - set(holder_ids))
    if unknown:
        raise ConfigError(f"--holder-faults names unknown holder(s) {', '.join(unknown)} (ids are h001..h{options.holders:03d})")
    options.out.mkdir(parents=True, exist_ok=True)
    staging = options.out / f".staging-{uuid.uuid4().hex[:8]}"
    workdir = Path(tempfile.mkdtemp(prefix="mpc-rec-fed-"))
    run_id, timestamp = uuid.uuid4().hex, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    try:
        write_catalogue(catalogue, workdir / "catalogue.txt")
        public_key, private_key = generate_keypair(options.paillier_bits, allow_insecure_size=options.paillier_bits < 2048)
        save_private_key(workdir / "party-0-paillier-private.json", private_key)
        save_public_key(workdir / "paillier-public.json", public_key)
        del private_key  # from here on only party 0's process reads it, from its file
        max_users = int(np.bincount(holder_of_user, minlength=options.holders).max())
        channel = f"127.0.0.1:{free_port()}"
        release = workdir / "release" / "items.npz"
        release.parent.mkdir()
        network = _network(options, workdir)
        processes = _write_parties(options, workdir, staging, channel, release, holder_ids, max_users, run_id,
                                   timestamp, digest, public_key.fingerprint, network)
        holders_root = options.out / "holders"
        for k, hid in enumerate(holder_ids):
            processes.append(_write_holder(options, workdir, holders_root / hid, hid, train.subset(train_holder == k),
                                           test.subset(test_holder == k), channel, release, max_users, run_id,
                                           public_key.fingerprint, tls=network["tls"] is not None))
        results = _run(processes, options)
        secure_s = time.perf_counter() - started
        summary = _summarise(options, processes, results, holder_ids, holders_root, train, test, catalogue, secure_s,
                             digest, run_id)
        outputs = {}
        for party in processes:
            if party.output is not None:
                if party.output.exists():
                    shutil.rmtree(party.output)
                party.staged.rename(party.output)
                outputs[party.name] = str(party.output)
        summary["outputs"] = outputs
        write_text_atomic(options.out / "summary.json", json.dumps(summary, indent=2) + "\n")
        return summary
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(staging, ignore_errors=True)


def _network(options: FederatedOptions, workdir: Path) -> dict[str, Any]:
    """The compute parties' and the dealer's [network] (and, over TLS, [tls] and [[peer]]) settings.

    ``--transport tls``: a throw-away pilot CA and one certificate per compute party and the
    dealer (as the joint mode's ``launch.write_deployment``); holders get only the CA.
    """
    names = [f"party-{rank}" for rank in range(options.parties)] + ["dealer"]
    if options.transport != "tls":
        return {"network": {"rendezvous": f"tcp://127.0.0.1:{free_port()}"}, "tls": None, "peers": None}
    from mpc_rec.transport.certs import loopback_tls

    peers, tls = loopback_tls(workdir / "certs", names, [free_port() for _ in names])
    return {"network": {"transport": "tls"}, "tls": tls, "peers": peers}


def _with_network(network: dict[str, Any], name: str, timeout_s: float) -> dict[str, Any]:
    sections: dict[str, Any] = {"network": {**network["network"], "timeout_s": timeout_s}}
    if network["tls"] is not None:
        sections.update(tls=network["tls"][name], peer=network["peers"])
    return sections


def _write_parties(options, workdir, staging, channel, release, holder_ids, max_users, run_id, timestamp, digest,
                   fingerprint, network) -> list[_Party]:
    parties = []
    for rank in range(options.parties):
        name = f"party-{rank}"
        document: dict[str, Any] = {
            "party": {"name": name, "rank": rank, "world_size": options.parties},
            **_with_network(network, name, options.timeout_s),
            "federated": {"catalogue": "catalogue.txt", "release": str(release), "channel": channel,
                          "holders": ",".join(holder_ids), "rounds": options.rounds, "factors": options.factors,
                          "learning_rate": options.learning_rate, "momentum": options.momentum,
                          "item_regularization": DEFAULTS["item_regularization"], "init_scale": DEFAULTS["init_scale"],
                          "seed": options.seed, "clip": options.clip, "max_users": max_users, "run_id": run_id,
                          "wait_s": options.wait_s, "deadline_s": options.wait_s,
                          "rating_min": options.rating_range[0], "rating_max": options.rating_range[1],
                          "clip_eval": options.clip_eval, "evaluation": options.evaluation},
            "paillier": {"fingerprint": fingerprint},
            "output": {"dir": str((staging / name).resolve())},
        }
        if rank == 0:
            document["paillier"]["private_key"] = "party-0-paillier-private.json"
        if rank == 1:
            document["paillier"]["public_key"] = "paillier-public.json"
        if options.privacy is not None:
            document["privacy"] = {**options.privacy, "dataset": digest, "timestamp": timestamp,
                                   "ledger": str((options.ledger_dir / f"{name}.json").resolve())}
        path = workdir / f"{name}.toml"
        write_text_atomic(path, dump_toml(document))
        parties.append(_Party(name, rank, path, options.out / name, staging / name))
    # The dealer sits idle while holders work (a round needs no Beaver triples), so it
    # waits on its peers (gloo or TLS) as long as a round may take.
    dealer = {"party": {"name": "dealer", "role": "dealer", "rank": options.parties, "world_size": options.parties},
              **_with_network(network, "dealer", min(3600.0, options.wait_s + 60)),
              "dealer": {"kind": "ttp"}}
    write_text_atomic(workdir / "dealer.toml", dump_toml(dealer))
    parties.append(_Party("dealer", options.parties, workdir / "dealer.toml", None))
    return parties


def _write_holder(options, workdir, folder: Path, hid, own_train, own_test, channel, release, max_users, run_id,
                  fingerprint, *, tls: bool) -> _Party:
    folder.mkdir(parents=True, exist_ok=True)
    write_ratings_csv(own_train, folder / "train.csv")
    data = {"train": "train.csv", "rating_min": options.rating_range[0], "rating_max": options.rating_range[1]}
    if len(own_test):
        write_ratings_csv(own_test, folder / "test.csv")
        data["test"] = "test.csv"
    elif (folder / "test.csv").exists():
        (folder / "test.csv").unlink()
    shutil.copyfile(workdir / "paillier-public.json", folder / "paillier-public.json")
    document = {
        "holder": {"id": hid, "dir": ".", "workers": 1},
        "data": data,
        "federated": {"release": str(release), "aggregator": channel, "rounds": options.rounds,
                      "regularization": options.regularization, "clip": options.clip, "max_users": max_users,
                      "max_holders": options.holders, "run_id": run_id, "wait_s": options.wait_s,
                      "clip_eval": options.clip_eval, "evaluation": options.evaluation},
        "key": {"public_key": "paillier-public.json", "fingerprint": fingerprint},
    }
    if tls:  # the holder authenticates the aggregator; it has no pilot certificate of its own
        shutil.copyfile(workdir / "certs" / "ca.pem", folder / "pilot-ca.pem")
        document["aggregator"] = {"ca": "pilot-ca.pem", "name": "party-1"}
    elif (folder / "pilot-ca.pem").exists():
        (folder / "pilot-ca.pem").unlink()
    if options.holder_faults and hid in options.holder_faults:
        document["simulate"] = {"fault": options.holder_faults[hid]}
    path = folder / "holder.toml"
    write_text_atomic(path, dump_toml(document))
    return _Party(hid, -1, path, None)


def _run(processes: list[_Party], options: FederatedOptions) -> list[dict[str, Any]]:
    compute = [p for p in processes if p.rank >= 0]
    environment = {**os.environ, THREADS_ENV: str(max(1, (os.cpu_count() or 1) // len(compute)))}
    logs = Path(tempfile.mkdtemp(prefix="mpc-rec-fed-logs-"))
    try:
        for party in processes:
            party.log = logs / f"{party.name}.log"
            if party.rank < 0:
                command = ["holder", "--config", str(party.config)]
            elif party.output is None:
                command = ["party", "--config", str(party.config)]
            else:
                command = ["federated-party", "--config", str(party.config)]
            with open(party.log, "wb") as log:
                party.process = subprocess.Popen([sys.executable, "-m", "mpc_rec", *command], stdout=log, stderr=log,
                                                 stdin=subprocess.DEVNULL, env=environment)
        failure = _wait_all(processes, grace_s=5.0)
        if failure is not None:
            raise failure
        return [json.loads((p.staged / "party.json").read_text()) for p in processes if p.output is not None]
    finally:
        for party in processes:  # e.g. after Ctrl-C: leave no process of this run behind
            if party.process is not None and party.process.poll() is None:
                party.process.kill()
                party.process.wait()
        shutil.rmtree(logs, ignore_errors=True)


def _summarise(options, processes, results, holder_ids, holders_root, train, test, catalogue, secure_s, digest, run_id):
    records = {hid: json.loads((holders_root / hid / "holder.json").read_text()) for hid in holder_ids}
    rank0 = next(r for r in results if r["rank"] == 0)
    evaluation = rank0["evaluation"]  # what the compute parties released; the holders report no metric
    round_s = [r["seconds"] for r in rank0["rounds"]]
    mean = sum(options.rating_range) / 2
    holder_rows = []
    for hid, record in records.items():
        sent = [r["bytes_sent"] for r in record["rounds"]]
        holder_rows.append({"id": hid, "users": record["users"], "train_ratings": record["train_ratings"],
                            "bytes_sent_per_round": float(np.mean(sent)) if sent else 0.0,
                            "bytes_sent_total": int(sum(sent)) + record["evaluation"]["bytes_sent"],
                            "evaluation_bytes_sent": record["evaluation"]["bytes_sent"],
                            "ciphertexts_per_round": record["rounds"][0]["ciphertexts"] if record["rounds"] else 0,
                            "round_work_s": float(np.mean([r["seconds"] for r in record["rounds"]])) if sent else 0.0,
                            "encrypt_s": float(np.mean([r["encrypt_s"] for r in record["rounds"]])) if sent else 0.0,
                            "peak_memory_mb": record["peak_memory_mb"]})
    metrics = {
        "rmse": evaluation["rmse"], "recall_at_10": evaluation["recall"],
        "test_ratings": len(test),  # the launcher's own split (it deals the data)
        "rmse_item_mean_baseline": _item_mean_rmse(train, test, catalogue, mean),
        "released_sums": evaluation["released_sums"],
        "evaluation": ("exact sums revealed by the compute parties (--no-dp: not differentially private)"
                       if evaluation["kind"] == "exact" else
                       f"DP release: per-user clipped sums (C_eval {evaluation['clip_eval']:g}), noised in MPC "
                       f"(sigma {evaluation['noise_sigma']:.4g}), opened by the compute parties; "
                       "a user-clipped, user-weighted RMSE (protocols/federated.md, 'Metrics')"),
    }
    if "rmse_exact_unprotected" in evaluation:
        metrics.update(rmse_exact_unprotected=evaluation["rmse_exact_unprotected"],
                       recall_exact_unprotected=evaluation["recall_exact_unprotected"])
        if evaluation["kind"] != "exact":
            metrics["exact_note"] = "--benchmark-exact-rmse: exact test sums, NOT covered by the DP guarantee"
    return {
        "mpc_rec_version": __version__,
        "mode": "federated",
        "dealer": "ttp",
        "privacy": rank0["privacy"],
        "reveals": rank0["reveals"],
        "security": "semi-honest compute parties, holders and dealer; holders send only Paillier ciphertexts; "
                    "the key holder (party 0) and the aggregator (party 1) must not collude",
        "config": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in options.__dict__.items()},
                   "data_sha256": digest, "run_id": run_id, "paillier_key": (
                       "INSECURE test-size key" if options.paillier_bits < 2048 else "production size")},
        "data": {"users": len(np.unique(train.users.astype(str))), "items": len(catalogue), "train_ratings": len(train),
                 "test_ratings": len(test), "holders": len(holder_ids)},
        "metrics": metrics,
        "evaluation": evaluation,
        "timing": {"round_s": round_s, "round_s_mean": float(np.mean(round_s)) if round_s else None,
                   "run_s": secure_s},
        "launcher_peak_memory_mb": peak_memory_mb(),  # it loads and deals all data (the simulation harness)
        "holders": holder_rows,
        "parties": [{"name": r["name"], "rank": r["rank"], "bytes_sent": r["traffic"]["bytes_sent"],
                     "peak_memory_mb": r["peak_memory_mb"]} for r in results],
        "rounds": rank0["rounds"],
        "refused": next((r["refused"] for r in results if r["rank"] == 1), None),
    }


def format_federated_summary(summary: dict[str, Any]) -> str:
    m, t, privacy = summary["metrics"], summary["timing"], summary["privacy"]
    if privacy["mode"] == "dp":
        privacy_line = (f"  privacy: ({privacy['epsilon']:.3g}, {privacy['delta']:.0e})-DP per user over "
                        f"{privacy['rounds']} rounds, noise sigma {privacy['sigma_total']:.3g} per round, "
                        f"clip {privacy['clipping']['step']:g}; {privacy['trust']}")
    else:
        privacy_line = "  privacy: ** NO DIFFERENTIAL PRIVACY (--no-dp): item sums revealed exactly **"
    holders = summary["holders"]
    figure = lambda value: "n/a (noised count not positive)" if value is None else f"{value:.4f}"  # noqa: E731
    lines = [
        f"mpc-rec run --mode federated: {len(holders)} holders, {len(summary['parties'])} compute parties, dealer ttp"
        + ("  ** INSECURE TEST-SIZE PAILLIER KEY **" if summary["config"]["paillier_bits"] < 2048 else ""),
        privacy_line,
        f"  data: {summary['data']['users']} users x {summary['data']['items']} items, "
        f"{summary['data']['train_ratings']} train / {summary['data']['test_ratings']} test ratings",
        f"  test RMSE {figure(m['rmse'])}, recall@10 {figure(m['recall_at_10'])} "
        + ("(exact: --no-dp)" if privacy["mode"] != "dp" else f"(DP release, noise sigma {summary['evaluation']['noise_sigma']:.3g} "
           f"on the clipped sums)") + f"; item-mean baseline RMSE {m['rmse_item_mean_baseline']:.4f}",
        *([f"  exact test RMSE {figure(m['rmse_exact_unprotected'])}, recall@10 "
           f"{figure(m['recall_exact_unprotected'])}  ** NOT covered by the DP guarantee (--benchmark-exact-rmse) **"]
          if "exact_note" in m else []),
        f"  round: {t['round_s_mean']:.2f} s on average; run {t['run_s']:.1f} s; "
        f"{np.mean([h['bytes_sent_per_round'] for h in holders]) / 1024:.0f} KiB sent per holder per round",
        f"  outputs: {summary['config']['out']}/ (summary.json, one folder per party, holders/<id>/)",
    ]
    return "\n".join(lines)
