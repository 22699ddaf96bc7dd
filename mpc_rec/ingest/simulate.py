"""``mpc-rec run --contributors M``: the launcher's side of simulated data holders.

The launcher already wrote one configuration per compute party with that party's own
rows (launch.write_deployment). Here it instead cuts every party's row block into
contiguous pieces, one per contributor (so the joint matrix has the same row order as
the ordinary run), plays the key holder's set-up step (a key pair, private half 0600 in
party 0's files), rewrites the compute parties' configurations to take their rows from
the ingest round, writes one configuration per contributor, and runs the contributors
as separate processes, at most one per core at a time.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mpc_rec.config import dump_toml
from mpc_rec.data import write_ratings_csv
from mpc_rec.errors import ConfigError
from mpc_rec.files import write_text_atomic
from mpc_rec.ingest.codes import IngestSpec
from mpc_rec.paillier._crypto import available_cores
from mpc_rec.paillier.keys import generate_keypair, save_private_key, save_public_key

@dataclass
class _Contributor:
    id: str
    users: list[str]
    config: Path
    log: Path
    fault: str | None = None
    process: subprocess.Popen | None = None
    exit_code: int | None = None
    result: dict[str, Any] | None = None


@dataclass
class ContributorSimulation:
    contributors: list[_Contributor]
    key_bits: int
    spec: IngestSpec
    deadline_s: float
    _thread: threading.Thread | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    started: float = 0.0
    finished: float | None = None

    @classmethod
    def prepare(cls, options: Any, workdir: Path, parties: list[Any], train: Any, test: Any,
                user_blocks: list[list[str]], catalogue: list[str]) -> "ContributorSimulation":
        pieces = _cut(user_blocks, options.contributors)
        faults = dict(options.contributor_faults or {})
        ids = [f"c{index + 1:03d}" for index in range(len(pieces))]
        unknown = sorted(set(faults) - set(ids))
        if unknown:
            raise ConfigError(f"--contributor-faults names unknown contributor(s) {', '.join(unknown)} (ids are c001..c{len(ids):03d})")
        key_bits = options.paillier_bits
        public_key, private_key = generate_keypair(key_bits, allow_insecure_size=key_bits < 2048)
        save_private_key(workdir / "party-0-paillier-private.json", private_key)
        save_public_key(workdir / "paillier-public.json", public_key)
        del private_key  # from here on only party 0's process reads it, from its file
        round_id, address = 0, f"127.0.0.1:{_free_port()}"
        wait_s = options.ingest_deadline_s + 3600.0
        registry = {"round": round_id, "contributors": [{"id": cid, "rows": len(users)} for cid, users in zip(ids, pieces)]}
        write_text_atomic(workdir / "ingest-registry.json", json.dumps(registry, indent=1) + "\n")
        aggregator_tls: dict[str, str] = {}  # over TLS, contributors authenticate the aggregator too
        for party in parties:
            document = tomllib.loads(party.config.read_text(encoding="utf-8"))
            if document.get("network", {}).get("transport") == "tls":
                name = next(peer["name"] for peer in document["peer"] if peer["rank"] == 1)
                aggregator_tls = {"ca": document["tls"]["ca"], "name": name}
            if document["party"]["role"] == "dealer":
                document["ingest"] = {"address": address, "round": round_id, "deadline_s": options.ingest_deadline_s,
                                      "wait_s": wait_s}
            else:
                rank = document["party"]["rank"]
                for name in ("train", "test"):
                    (workdir / document["data"].pop(name)).unlink()  # compute parties hold no rows now
                document["output"]["top_k"] = 0
                section = {"address": address, "fingerprint": public_key.fingerprint, "round": round_id,
                           "deadline_s": options.ingest_deadline_s, "wait_s": wait_s}
                if rank == 0:
                    section["private_key"] = "party-0-paillier-private.json"
                if rank == 1:
                    section.update(public_key="paillier-public.json", registry="ingest-registry.json")
                document["ingest"] = section
            write_text_atomic(party.config, dump_toml(document))
        contributors = []
        for cid, users in zip(ids, pieces):
            chosen = list(users)
            write_ratings_csv(train.subset(np.isin(train.users, chosen)), workdir / f"{cid}-train.csv")
            own_test = test.subset(np.isin(test.users, chosen))
            data = {"train": f"{cid}-train.csv", "catalogue": "catalogue.txt",
                    "rating_min": options.rating_range[0], "rating_max": options.rating_range[1]}
            if len(own_test):  # a few users may have no held-out rating at all
                write_ratings_csv(own_test, workdir / f"{cid}-test.csv")
                data["test"] = f"{cid}-test.csv"
            document = {
                "contributor": {"id": cid, "round": round_id, "workers": 1},  # the launcher runs one per core
                "data": data,
                "aggregator": {"address": address, "wait_s": wait_s, **aggregator_tls},  # it may start late
                "key": {"public_key": "paillier-public.json", "fingerprint": public_key.fingerprint},
            }
            if cid in faults:
                document["simulate"] = {"fault": faults[cid]}
            path = workdir / f"{cid}.toml"
            write_text_atomic(path, dump_toml(document))
            contributors.append(_Contributor(cid, list(users), path, workdir / f"{cid}.log", faults.get(cid)))
        spec = IngestSpec.for_ratings(options.rating_range, key_bits=key_bits)
        return cls(contributors, key_bits, spec, options.ingest_deadline_s)

    def start(self) -> None:
        self.started = time.monotonic()
        self._thread = threading.Thread(target=self._run_all, daemon=True)
        self._thread.start()

    def _run_all(self) -> None:
        waiting, running = list(self.contributors), []
        slots = available_cores()
        while (waiting or running) and not self._stop.is_set():
            for c in [c for c in running if c.process.poll() is not None]:
                running.remove(c)
                self._finish(c)
            while waiting and len(running) < slots:
                c = waiting.pop(0)
                with open(c.log, "wb") as log:
                    c.process = subprocess.Popen(
                        [sys.executable, "-m", "mpc_rec", "contributor", "--config", str(c.config), "--json"],
                        stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL)
                running.append(c)
            time.sleep(0.05)
        self.finished = time.monotonic()

    def _finish(self, c: _Contributor) -> None:
        c.exit_code = c.process.returncode
        output = c.process.stdout.read().decode(errors="replace").strip().splitlines()
        try:
            c.result = json.loads(output[-1]) if output else None
        except ValueError:
            c.result = None

    def stop(self) -> None:
        """After the parties: the round is over, so a contributor still running missed it; end it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        for c in self.contributors:
            if c.process is not None and c.process.poll() is None:
                c.process.kill()
                c.process.wait()

    def placed_blocks(self, report: dict[str, Any]) -> list[list[str]]:
        """The users of every placed contributor, in placement order (the joint row order)."""
        users = {c.id: c.users for c in self.contributors}
        return [users[cid] for cid in report["accepted"]]

    def summary(self, report: dict[str, Any], results: list[dict[str, Any]]) -> dict[str, Any]:
        by_rank = {r["rank"]: r for r in results}
        accepted = report["accepted"]
        ciphertexts = [report["ciphertexts"][cid] for cid in accepted]
        sizes = [report["message_bytes"][cid] for cid in accepted]
        encrypt = [c.result["encrypt_s"] for c in self.contributors if c.result and "encrypt_s" in c.result]
        return {
            "contributors_registered": report["registered"],
            "contributors_aggregated": len(accepted),
            "users_aggregated": sum(report["rows"]),
            "rejected": report["rejected"],
            "withdrawn": report["withdrawn"],
            "dropped": report["dropped"],
            "contributor_exits": {c.id: {"exit_code": c.exit_code, "fault": c.fault, "result": c.result}
                                  for c in self.contributors if c.fault or c.exit_code},
            "paillier": {"key_bits": self.key_bits,
                         "key": "INSECURE test-size key" if self.key_bits < 2048 else "production size",
                         "slot_bits": self.spec.slot_bits, "slots_per_ciphertext": self.spec.slots_per_ciphertext,
                         "value_bits": self.spec.value_bits, "stat_bits": self.spec.stat_bits},
            "ciphertexts_total": sum(ciphertexts),
            "ciphertexts_per_contributor": float(np.mean(ciphertexts)),
            "bytes_per_contributor": float(np.mean(sizes)),
            "contributor_encrypt_s_mean": float(np.mean(encrypt)) if encrypt else None,
            "contributors_wall_s": None if self.finished is None else self.finished - self.started,
            "aggregator_phase_s": by_rank[1]["ingest"]["seconds_before_session"],
            "key_holder_phase_s": by_rank[0]["ingest"]["seconds_before_session"],
            "key_holder_decrypt_s": by_rank[0]["ingest"]["report"]["decrypt_s"],
            "test_set": "held-out ratings came from the contributors through the same round",
        }


def _cut(blocks: list[list[str]], count: int) -> list[list[str]]:
    """Contiguous pieces of the parties' row blocks, inside blocks when count >= parties."""
    if count >= len(blocks):
        per_block = [count // len(blocks) + (p < count % len(blocks)) for p in range(len(blocks))]
        pieces = [list(piece) for block, k in zip(blocks, per_block) for piece in np.array_split(np.array(block, dtype=object), k)]
    else:
        joint = np.array([u for block in blocks for u in block], dtype=object)
        pieces = [list(piece) for piece in np.array_split(joint, count)]
    if any(not piece for piece in pieces):
        raise ConfigError(f"--contributors {count} exceeds the number of users that can be dealt out")
    return pieces


def _free_port() -> int:
    from mpc_rec.launch import free_port

    return free_port()
