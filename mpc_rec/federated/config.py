"""Configuration files of the federated mode: one per data holder, one per compute party.

TOML in, frozen dataclasses out, validated once (unknown or mistyped settings are a
ConfigError naming the file and the setting). Relative paths resolve against the file's
folder. The dealer uses the ordinary party configuration (``mpc-rec party``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mpc_rec.config import read_toml_with_schema
from mpc_rec.errors import ConfigError
from mpc_rec.ingest.transport import ChannelTls, aggregator_client_tls
from mpc_rec.federated.evaluation import EVALUATIONS, MIN_CLIP
from mpc_rec.mpc.session import Endpoint
from mpc_rec.transport.settings import parse_tls

DEFAULT_CLIP_EVAL = 10.0  # the joint mode's C_eval default (mpc_rec.launch.DEFAULT_PRIVACY)
HOLDER_FAULTS = ("garbage",)  # simulated misbehaviour for tests: send bytes that are not a contribution
_NUMBER = (int, float)

_HOLDER_SCHEMA = {
    "holder": {"id": str, "dir": str, "workers": int},
    "data": {"train": str, "test": str, "rating_min": _NUMBER, "rating_max": _NUMBER},
    "federated": {"release": str, "aggregator": str, "rounds": int, "regularization": _NUMBER, "clip": _NUMBER,
                  "max_users": int, "max_holders": int, "run_id": str, "wait_s": _NUMBER, "top_k": int,
                  "clip_eval": _NUMBER, "evaluation": str},
    "key": {"public_key": str, "fingerprint": str},
    "aggregator": {"ca": str, "name": str},  # TLS to the aggregator: the pilot CA and the name it must show
    "simulate": {"fault": str},
}
_PARTY_SCHEMA = {
    "party": {"name": str, "rank": int, "world_size": int},
    "network": {"rendezvous": str, "timeout_s": _NUMBER, "transport": str, "listen": str, "max_message_mb": int},
    "tls": {"ca": str, "cert": str, "key": str},  # with [[peer]]: mpc_rec/transport/settings.py
    "peer": list,
    "federated": {"catalogue": str, "release": str, "channel": str, "holders": str, "rounds": int, "factors": int,
                  "learning_rate": _NUMBER, "momentum": _NUMBER, "item_regularization": _NUMBER,
                  "init_scale": _NUMBER, "seed": int, "clip": _NUMBER, "max_users": int, "run_id": str,
                  "wait_s": _NUMBER, "deadline_s": _NUMBER, "rating_min": _NUMBER, "rating_max": _NUMBER,
                  "clip_eval": _NUMBER, "evaluation": str},
    "paillier": {"fingerprint": str, "public_key": str, "private_key": str},
    "privacy": {"epsilon": _NUMBER, "delta": float, "trusted_parties": int, "dataset": str, "timestamp": str,
                "ledger": str, "budget_epsilon": _NUMBER, "budget_delta": float},
    "output": {"dir": str},
}


def _evaluation(path: Path, federated: dict[str, Any]) -> tuple[float, str]:
    """(clip_eval, evaluation kind) of the evaluation round (mpc_rec/federated/evaluation.py)."""
    clip_eval = float(federated.get("clip_eval", DEFAULT_CLIP_EVAL))
    if not clip_eval >= MIN_CLIP:
        raise ConfigError(f"{path}: federated.clip_eval must be at least {MIN_CLIP}, got {clip_eval}")
    kind = federated.get("evaluation", "clipped")
    if kind not in EVALUATIONS:
        raise ConfigError(f"{path}: federated.evaluation must be one of {', '.join(EVALUATIONS)}, got '{kind}'")
    return clip_eval, kind


def _positive(path: Path, name: str, value: float) -> float:
    if not value > 0:
        raise ConfigError(f"{path}: {name} must be positive, got {value}")
    return float(value)


@dataclass(frozen=True)
class HolderConfig:
    id: str
    dir: Path  # the holder's own folder: state, controls.json, its copy of items.npz, metrics
    train: Path
    test: Path | None
    rating_range: tuple[float, float]
    release: Path  # where the compute parties publish items.npz
    aggregator: str
    rounds: int
    regularization: float
    clip: float
    max_users: int
    max_holders: int
    run_id: str
    wait_s: float
    public_key: Path
    fingerprint: str
    top_k: int = 10
    workers: int | None = None
    fault: str | None = None
    tls: ChannelTls | None = None  # [aggregator] ca and name: the holder channel runs over TLS (pilot CA)
    clip_eval: float = DEFAULT_CLIP_EVAL
    evaluation: str = "clipped"


def load_holder_config(path: str | os.PathLike[str]) -> HolderConfig:
    path = Path(path)
    raw = read_toml_with_schema(path, _HOLDER_SCHEMA, [("holder", "id"), ("holder", "dir"), ("data", "train"),
                                       ("federated", "release"), ("federated", "aggregator"),
                                       ("federated", "rounds"), ("federated", "clip"), ("federated", "max_users"),
                                       ("federated", "max_holders"), ("federated", "run_id"),
                                       ("key", "public_key"), ("key", "fingerprint")])
    get = lambda table, key, default=None: raw.get(table, {}).get(key, default)  # noqa: E731
    resolve = lambda value: None if value is None else (path.parent / value).resolve()  # noqa: E731
    fault = get("simulate", "fault")
    if fault is not None and fault not in HOLDER_FAULTS:
        raise ConfigError(f"{path}: simulate.fault must be one of {', '.join(HOLDER_FAULTS)}, got '{fault}'")
    rounds = get("federated", "rounds")
    if rounds < 1 or get("federated", "max_users") < 1 or get("federated", "max_holders") < 1:
        raise ConfigError(f"{path}: federated.rounds, max_users and max_holders must be at least 1")
    lo, hi = float(get("data", "rating_min", 1.0)), float(get("data", "rating_max", 5.0))
    if not lo < hi:
        raise ConfigError(f"{path}: data.rating_min must be below data.rating_max")
    if (get("aggregator", "ca") is None) != (get("aggregator", "name") is None):
        raise ConfigError(f"{path}: aggregator.ca and aggregator.name go together (TLS to the aggregator)")
    tls = None if get("aggregator", "ca") is None else aggregator_client_tls(resolve(get("aggregator", "ca")),
                                                                             get("aggregator", "name"), path)
    clip_eval, evaluation = _evaluation(path, raw.get("federated", {}))
    return HolderConfig(
        id=get("holder", "id"), dir=resolve(get("holder", "dir")), train=resolve(get("data", "train")),
        test=resolve(get("data", "test")), rating_range=(lo, hi), release=resolve(get("federated", "release")),
        aggregator=get("federated", "aggregator"), rounds=rounds,
        regularization=_positive(path, "federated.regularization", get("federated", "regularization", 20.0)),
        clip=_positive(path, "federated.clip", get("federated", "clip")),
        max_users=get("federated", "max_users"), max_holders=get("federated", "max_holders"),
        run_id=get("federated", "run_id"), wait_s=_positive(path, "federated.wait_s", get("federated", "wait_s", 600.0)),
        public_key=resolve(get("key", "public_key")), fingerprint=get("key", "fingerprint"),
        top_k=get("federated", "top_k", 10), workers=get("holder", "workers"), fault=fault, tls=tls,
        clip_eval=clip_eval, evaluation=evaluation,
    )


@dataclass(frozen=True)
class PrivacySettings:
    epsilon: float
    delta: float
    trusted_parties: int
    dataset: str
    timestamp: str
    ledger: Path
    budget_epsilon: float
    budget_delta: float


@dataclass(frozen=True)
class ComputeConfig:
    name: str
    endpoint: Endpoint
    catalogue: Path
    release: Path  # party 0 publishes items.npz here
    channel: str  # the aggregator's (rank 1) holder channel, HOST:PORT
    holders: tuple[str, ...]
    rounds: int
    factors: int
    learning_rate: float
    momentum: float
    item_regularization: float
    init_scale: float
    seed: int
    clip: float
    max_users: int
    run_id: str
    wait_s: float
    deadline_s: float
    rating_range: tuple[float, float]
    output_dir: Path
    fingerprint: str
    public_key: Path | None
    private_key: Path | None
    privacy: PrivacySettings | None
    clip_eval: float = DEFAULT_CLIP_EVAL
    evaluation: str = "clipped"

    def public(self) -> dict[str, Any]:
        """What every compute party must agree on before the first round."""
        return {"holders": list(self.holders), "rounds": self.rounds, "factors": self.factors,
                "learning_rate": self.learning_rate, "momentum": self.momentum,
                "item_regularization": self.item_regularization, "init_scale": self.init_scale, "seed": self.seed,
                "clip": self.clip, "max_users": self.max_users, "run_id": self.run_id, "fingerprint": self.fingerprint,
                "rating_range": list(self.rating_range), "clip_eval": self.clip_eval, "evaluation": self.evaluation,
                "privacy": None if self.privacy is None else {
                    "epsilon": self.privacy.epsilon, "delta": self.privacy.delta,
                    "trusted_parties": self.privacy.trusted_parties, "dataset": self.privacy.dataset}}


def load_compute_config(path: str | os.PathLike[str]) -> ComputeConfig:
    path = Path(path)
    required = [("party", "name"), ("party", "rank"), ("party", "world_size"),
                *[("federated", key) for key in ("catalogue", "release", "channel", "holders", "rounds", "factors",
                                                  "clip", "max_users", "run_id")],
                ("paillier", "fingerprint"), ("output", "dir")]
    raw = read_toml_with_schema(path, _PARTY_SCHEMA, required)
    fed = raw["federated"]
    resolve = lambda value: None if value is None else (path.parent / value).resolve()  # noqa: E731
    holders = [h.strip() for h in fed["holders"].split(",")]
    if not all(holders) or len(set(holders)) != len(holders):
        raise ConfigError(f"{path}: federated.holders must list distinct holder ids, separated by commas")
    rank, world_size = raw["party"]["rank"], raw["party"]["world_size"]
    network = raw.get("network", {})
    try:
        if network.get("transport", "gloo") == "gloo" and "rendezvous" not in network:
            raise ConfigError("missing required setting network.rendezvous")
        # The TLS mesh names every process, the dealer (rank world_size) included.
        tls = parse_tls(network, raw.get("tls", {}), raw.get("peer"), base=path.parent, rank=rank,
                        processes=world_size + 1, name=raw["party"]["name"])
        endpoint = Endpoint(rank=rank, world_size=world_size, rendezvous=network.get("rendezvous", ""), dealer="ttp",
                            timeout_s=float(network.get("timeout_s", 30.0)), tls=tls)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    if endpoint.is_dealer:
        raise ConfigError(f"{path}: the dealer runs `mpc-rec party`, not a federated compute party")
    paillier = raw["paillier"]
    if rank == 0 and "private_key" not in paillier:
        raise ConfigError(f"{path}: missing required setting paillier.private_key (the key holder, rank 0)")
    if rank == 1 and "public_key" not in paillier:
        raise ConfigError(f"{path}: missing required setting paillier.public_key (the aggregator, rank 1)")
    privacy = None
    if "privacy" in raw:
        p = raw["privacy"]
        for key in ("epsilon", "dataset", "timestamp", "ledger"):
            if key not in p:
                raise ConfigError(f"{path}: missing required setting privacy.{key}")
        privacy = PrivacySettings(float(p["epsilon"]), float(p.get("delta", 1e-5)), int(p.get("trusted_parties", 1)),
                                  p["dataset"], p["timestamp"], resolve(p["ledger"]),
                                  float(p.get("budget_epsilon", 50.0)), float(p.get("budget_delta", 1e-3)))
        if not 1 <= privacy.trusted_parties <= world_size:
            raise ConfigError(f"{path}: privacy.trusted_parties must be in 1..{world_size}")
    if fed["rounds"] < 1 or fed["factors"] < 1 or fed["max_users"] < 1:
        raise ConfigError(f"{path}: federated.rounds, factors and max_users must be at least 1")
    clip_eval, evaluation = _evaluation(path, fed)
    if (evaluation == "exact") != (privacy is None):
        raise ConfigError(f"{path}: federated.evaluation = 'exact' is for runs without [privacy] and only for them")
    momentum = float(fed.get("momentum", 0.5))
    if not 0 <= momentum < 1:
        raise ConfigError(f"{path}: federated.momentum must be in [0, 1)")
    return ComputeConfig(
        name=raw["party"]["name"], endpoint=endpoint, catalogue=resolve(fed["catalogue"]),
        release=resolve(fed["release"]), channel=fed["channel"], holders=tuple(holders), rounds=fed["rounds"],
        factors=fed["factors"], learning_rate=_positive(path, "federated.learning_rate", fed.get("learning_rate", 0.01)),
        momentum=momentum, item_regularization=float(fed.get("item_regularization", 10.0)),
        init_scale=_positive(path, "federated.init_scale", fed.get("init_scale", 0.1)), seed=int(fed.get("seed", 0)),
        clip=_positive(path, "federated.clip", fed["clip"]), max_users=fed["max_users"], run_id=fed["run_id"],
        wait_s=_positive(path, "federated.wait_s", fed.get("wait_s", 600.0)),
        deadline_s=_positive(path, "federated.deadline_s", fed.get("deadline_s", 600.0)),
        rating_range=(float(fed.get("rating_min", 1.0)), float(fed.get("rating_max", 5.0))),
        output_dir=resolve(raw["output"]["dir"]), fingerprint=paillier["fingerprint"],
        public_key=resolve(paillier.get("public_key")), private_key=resolve(paillier.get("private_key")),
        privacy=privacy, clip_eval=clip_eval, evaluation=evaluation,
    )
