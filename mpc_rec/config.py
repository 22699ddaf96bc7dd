"""Party configuration: TOML in, frozen dataclasses out, validated once at the edge.

A file describes one process of a run (a compute party or the dealer). Relative paths
are resolved against the file's own folder, so a deployment folder can be moved whole.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from mpc_rec.errors import ConfigError
from mpc_rec.model import TrainConfig
from mpc_rec.mpc.session import Endpoint
from mpc_rec.release import ReleaseConfig
from mpc_rec.transport.settings import parse_tls

ROLES = ("compute", "dealer")

_SCHEMA: dict[str, dict[str, type | tuple[type, ...]]] = {
    "party": {"name": str, "role": str, "rank": int, "world_size": int},
    "network": {"rendezvous": str, "timeout_s": (int, float), "transport": str, "listen": str, "max_message_mb": int},
    "tls": {"ca": str, "cert": str, "key": str},  # with [[peer]] entries: see mpc_rec/transport/settings.py
    "dealer": {"kind": str},
    "data": {"train": str, "test": str, "catalogue": str, "rating_min": (int, float), "rating_max": (int, float)},
    "train": {f.name: (int, float) if f.type in ("float",) else int for f in fields(TrainConfig)},
    "output": {"dir": str, "top_k": int, "save_shares": bool},
    "privacy": {
        "epsilon": (int, float), "delta": float, "trusted_parties": int, "clip_step": (int, float),
        "clip_eval": (int, float), "item_weight": (int, float), "item_step": (int, float), "dataset": str, "run_id": str,
        "timestamp": str, "ledger": str, "budget_epsilon": (int, float), "budget_delta": float,
        "benchmark_exact_rmse": bool,
    },
    "release": {"policy": str, "epsilon": (int, float), "budget": (int, float), "ledger": str, "users": str,
                "run_id": str, "timestamp": str},
    "ingest": {  # rows come from contributors through Paillier ingest (mpc_rec/ingest/)
        "address": str, "fingerprint": str, "round": int, "deadline_s": (int, float), "wait_s": (int, float),
        "stat_bits": int, "public_key": str, "private_key": str, "registry": str,
    },
    "audit": {"transcript": str, "max_elements": int},
}
_PRIVACY_REQUIRED = ("epsilon", "dataset", "run_id", "timestamp", "ledger")
_REQUIRED = {
    "compute": [("party", "name"), ("party", "rank"), ("party", "world_size"),
                ("data", "train"), ("data", "catalogue"), ("output", "dir")],
    "dealer": [("party", "rank"), ("party", "world_size")],
}


@dataclass(frozen=True)
class PrivacyConfig:
    """Differential privacy of one run; absent means a labelled no-DP run."""

    epsilon: float
    dataset: str
    run_id: str
    timestamp: str
    ledger: Path
    delta: float = 1e-5
    trusted_parties: int = 1
    clip_step: float = 0.1
    clip_eval: float = 10.0
    item_weight: float = 5.0
    item_step: float = 3.0
    budget_epsilon: float = 10.0
    budget_delta: float = 1e-4
    # Benchmarking only: the exact test RMSE is revealed too, outside the DP guarantee.
    benchmark_exact_rmse: bool = False

    def __post_init__(self) -> None:
        if not self.epsilon > 0 or not 0 < self.delta < 1:
            raise ConfigError(f"privacy: need epsilon > 0 and 0 < delta < 1, got {self.epsilon}, {self.delta}")
        if min(self.clip_step, self.clip_eval, self.item_weight, self.item_step) <= 0:
            raise ConfigError("privacy: clip_step, clip_eval, item_weight and item_step must be positive")
        if not self.budget_epsilon > 0 or not 0 < self.budget_delta < 1:
            raise ConfigError("privacy: budget_epsilon must be positive and budget_delta in (0, 1)")

    def public(self) -> dict[str, Any]:
        """What every party must agree on (the ledger file path is each party's own)."""
        return {k: v for k, v in self.__dict__.items() if k not in ("ledger", "budget_epsilon", "budget_delta")}


@dataclass(frozen=True)
class PartyConfig:
    name: str
    role: str
    endpoint: Endpoint
    train: TrainConfig
    train_path: Path | None
    test_path: Path | None
    catalogue_path: Path | None
    rating_range: tuple[float, float]
    output_dir: Path | None
    top_k: int
    privacy: PrivacyConfig | None = None
    release: ReleaseConfig = ReleaseConfig()
    ingest: Any = None  # mpc_rec.ingest.phase.IngestConfig: rows from contributors, not from [data] train
    transcript_dir: Path | None = None  # [audit]: record every received message there
    transcript_max_elements: int = 32_768
    save_shares: bool = False  # keep this party's shares of the trained model for serving (mpc_rec/serving/refine.py)


def read_toml(path: Path) -> dict[str, Any]:
    """A TOML configuration file as a dict; unreadable or malformed files are a ConfigError."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None


def read_toml_with_schema(path: Path, schema: dict[str, dict[str, Any]],
                          required: list[tuple[str, str]]) -> dict[str, Any]:
    """A flat TOML configuration checked against ``schema`` (table -> key -> type) and ``required`` keys.

    A table whose schema is ``list`` is an array of tables (``[[peer]]``), passed through
    for its own parser (``transport.settings.parse_tls``).
    """
    raw = read_toml(path)
    for table, values in raw.items():
        known = schema.get(table)
        if known is list:
            if not isinstance(values, list):
                raise ConfigError(f"{path}: [{table}] must be an array of tables ([[{table}]])")
            continue
        if known is None or not isinstance(values, dict):
            raise ConfigError(f"{path}: unknown section [{table}] (known: {', '.join(schema)})")
        for key, value in values.items():
            if key not in known or isinstance(value, bool) or not isinstance(value, known[key]):
                raise ConfigError(f"{path}: unknown or mistyped setting {table}.{key} = {str(value)[:60]!r}")
    for table, key in required:
        if key not in raw.get(table, {}):
            raise ConfigError(f"{path}: missing required setting {table}.{key}")
    return raw


def load_party_config(path: str | os.PathLike[str]) -> PartyConfig:
    path = Path(path)
    raw = read_toml(path)
    try:
        return parse_party_config(raw, base=path.parent)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def parse_party_config(raw: dict[str, Any], *, base: Path) -> PartyConfig:
    peers = raw.get("peer")  # [[peer]]: a list of tables, checked with the rest of the TLS settings
    raw = {table: values for table, values in raw.items() if table != "peer"}
    _check_schema(raw)
    section = lambda name: raw.get(name, {})  # noqa: E731
    role = section("party").get("role", "compute")
    if role not in ROLES:
        raise ConfigError(f"party.role must be one of {', '.join(ROLES)}, got '{role}'")
    for table, key in _REQUIRED[role]:
        if (table, key) == ("data", "train") and section("ingest"):
            continue  # the rows arrive from contributors
        if key not in section(table):
            raise ConfigError(f"missing required setting {table}.{key}")

    def resolve(value: str | None) -> Path | None:
        return None if value is None else (base / value).resolve()

    if section("network").get("transport", "gloo") == "gloo" and "rendezvous" not in section("network"):
        raise ConfigError("missing required setting network.rendezvous")
    rank, world_size = section("party")["rank"], section("party")["world_size"]
    dealer = section("dealer").get("kind", "ttp")
    tls = parse_tls(section("network"), section("tls"), peers, base=base, rank=rank,
                    processes=world_size + (1 if dealer == "ttp" else 0),
                    name=section("party").get("name", f"rank{rank}"))
    try:
        endpoint = Endpoint(
            rank=rank,
            world_size=world_size,
            rendezvous=section("network").get("rendezvous", ""),
            dealer=dealer,
            timeout_s=float(section("network").get("timeout_s", 30.0)),
            tls=tls,
        )
        train = TrainConfig(**section("train"))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if role == "dealer" and not endpoint.is_dealer:
        raise ConfigError("a dealer must have dealer.kind = 'ttp' and rank = world_size")
    if role == "compute" and endpoint.rank >= endpoint.world_size:
        raise ConfigError(f"compute party rank must be below world_size {endpoint.world_size}")
    data = section("data")
    rating_range = (float(data.get("rating_min", 1.0)), float(data.get("rating_max", 5.0)))
    if not rating_range[0] < rating_range[1]:
        raise ConfigError(f"data.rating_min must be below data.rating_max, got {rating_range}")
    top_k = section("output").get("top_k", 10)
    if top_k < 0:
        raise ConfigError(f"output.top_k must be 0 (no recommendations) or more, got {top_k}")
    privacy = None
    if section("privacy"):
        missing = [key for key in _PRIVACY_REQUIRED if key not in section("privacy")]
        if missing:
            raise ConfigError(f"missing required setting privacy.{missing[0]}")
        settings = dict(section("privacy"))
        settings["ledger"] = resolve(settings["ledger"])
        privacy = PrivacyConfig(**settings)
        if not 1 <= privacy.trusted_parties <= endpoint.world_size:
            raise ConfigError(f"privacy.trusted_parties must be in 1..{endpoint.world_size}, got {privacy.trusted_parties}")
    release = dict(section("release"))
    for key in ("ledger", "users"):
        if key in release:
            release[key] = resolve(release[key])
    ingest = None
    if section("ingest"):
        from mpc_rec.ingest.phase import IngestConfig

        settings = dict(section("ingest"))
        if "address" not in settings:
            raise ConfigError("missing required setting ingest.address")
        for key in ("public_key", "private_key", "registry"):
            if key in settings:
                settings[key] = resolve(settings[key])
        if "train" in data or "test" in data:
            raise ConfigError("[ingest] is for parties without data.train / data.test (rows come from contributors)")
        ingest = IngestConfig(**settings)
        if role == "compute" and top_k > 0:
            raise ConfigError("output.top_k must be 0 with [ingest]: recommendations would have to go back to the contributors")
        ingest.check_role(endpoint.rank)
    audit = section("audit")
    if audit.get("max_elements", 1) < 1:
        raise ConfigError(f"audit.max_elements must be at least 1, got {audit['max_elements']}")
    return PartyConfig(
        ingest=ingest,
        transcript_dir=resolve(audit.get("transcript")),
        transcript_max_elements=audit.get("max_elements", 32_768),
        privacy=privacy,
        release=ReleaseConfig(**release),
        name=section("party").get("name", f"rank{endpoint.rank}"),
        role=role,
        endpoint=endpoint,
        train=train,
        train_path=resolve(data.get("train")),
        test_path=resolve(data.get("test")),
        catalogue_path=resolve(data.get("catalogue")),
        rating_range=rating_range,
        output_dir=resolve(section("output").get("dir")),
        top_k=top_k,
        save_shares=section("output").get("save_shares", False),
    )


def _check_schema(raw: dict[str, Any]) -> None:
    for table, values in raw.items():
        if table not in _SCHEMA:
            raise ConfigError(f"unknown section [{table}] (known: {', '.join(_SCHEMA)})")
        if not isinstance(values, dict):
            raise ConfigError(f"'{table}' must be a [section]")
        for key, value in values.items():
            if key not in _SCHEMA[table]:
                raise ConfigError(f"unknown setting {table}.{key} (known: {', '.join(_SCHEMA[table])})")
            expected = _SCHEMA[table][key]
            if isinstance(value, bool) != (expected is bool) or not isinstance(value, expected):
                names = expected.__name__ if isinstance(expected, type) else " or ".join(t.__name__ for t in expected)
                raise ConfigError(f"{table}.{key} must be {names}, got {value!r}")


def dump_toml(document: dict[str, dict[str, Any]]) -> str:
    """Our configs are flat tables of strings, numbers and booleans (a list of them: [[table]])."""
    lines = []
    for table, values in document.items():
        for entry in values if isinstance(values, list) else [values]:
            lines += _dump_table(f"[[{table}]]" if isinstance(values, list) else f"[{table}]", table, entry)
    return "\n".join(lines)


def _dump_table(title: str, table: str, values: dict[str, Any]) -> list[str]:
    lines = [title]
    for key, value in values.items():
        if isinstance(value, str):
            escaped = value.replace("\\", "\\\\").replace('"', '\\"')
            lines.append(f'{key} = "{escaped}"')
        elif isinstance(value, bool):
            lines.append(f"{key} = {'true' if value else 'false'}")
        elif isinstance(value, (int, float)):
            lines.append(f"{key} = {value!r}")
        else:
            raise TypeError(f"cannot write {table}.{key}={value!r} to TOML")
    lines.append("")
    return lines
