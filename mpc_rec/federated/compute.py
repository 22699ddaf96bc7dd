"""A compute party of the federated mode (``mpc-rec federated-party --config FILE``).

Per round r (protocols/federated.md has the message table):
1. the aggregator (rank 1) collects one Paillier contribution per holder on its holder
   channel, checking each on arrival (a refused holder is told why at once); the other
   ranks wait on that channel, not on gloo, because holders may take minutes;
2. all ranks run the Paillier aggregation round (``paillier.party``): rank 1 masks the
   homomorphic sum, rank 0 decrypts its share; the two shares become an MPCTensor;
3. every rank adds its own discrete Gaussian noise to its share (``mpc.privacy``);
4. the noised sum is opened through the reveal choke point (``guard_reveal``), the item
   side takes one public step, and rank 0 publishes release r + 1 (``items.npz``).
After round R - 1, round R is the evaluation round: the same steps 1-4 on the holders'
clipped test sums, noised as the plan's "mean" release (``federated/evaluation.py``).

The compute parties never see a holder's update or the un-noised total: only ciphertexts,
a masked sum (rank 0) or its own mask (rank 1), shares, and the noised total.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import numpy as np

from mpc_rec import __version__
from mpc_rec.data import read_catalogue
from mpc_rec.dp.reveal import RevealLog, declare_public, noised
from mpc_rec.errors import ConfigError, PeerError
from mpc_rec.federated.config import ComputeConfig
from mpc_rec.federated.evaluation import evaluation_length, evaluation_spec, reveal_evaluation
from mpc_rec.federated.holder import packing_spec, peak_memory_mb
from mpc_rec.federated.model import ItemStep, initial_items, item_update
from mpc_rec.files import write_text_atomic
from mpc_rec.holder import ItemRelease, write_release_atomic
from mpc_rec.ingest.transport import ChannelTls, Server, request
from mpc_rec.paillier.aggregator import Aggregator
from mpc_rec.paillier.errors import RejectedContribution
from mpc_rec.paillier.keyholder import KeyHolder
from mpc_rec.paillier.keys import load_private_key, load_public_key
from mpc_rec.paillier.messages import Contribution

KEY_HOLDER, AGGREGATOR = 0, 1
NO_DP_REASON = "no-dp run: exact item-side sum, for benchmarking only"
MECHANISM_NOTE = "holders clip each user's item-side gradient in the clear; compute parties add noise in MPC"


def holder_channel_tls(settings: Any) -> tuple[ChannelTls | None, ChannelTls | None]:
    """(client, server) TLS of the holder channel from the pilot's [tls] settings; None over gloo.

    As the ingest channel (``ingest.phase.channel_tls``): clients check that the aggregator's
    certificate chains to the pilot CA and names rank 1; holders hold no pilot certificate
    and may only contribute; ``wait`` needs the certificate of another compute party (the
    dealer never waits on the holders).
    """
    from mpc_rec.ingest.phase import channel_tls

    client, server = channel_tls(settings)
    if settings is None:
        return None, None
    dealer = len(settings.peers) - 1
    waiting = frozenset(p.name for p in settings.peers if p.rank not in (AGGREGATOR, dealer))
    return client, ChannelTls(server.context, party_kinds={"wait": waiting})


class HolderChannel:
    """The aggregator's side of the holders' messages: one open round at a time."""

    def __init__(self, config: ComputeConfig, public_key, spec, length: int):
        self.config, self.public_key, self.spec, self.length = config, public_key, spec, length
        self._lock = threading.Condition()
        self._current = -1  # the round accepting contributions
        self._settled = -1  # the last round whose contributions are final
        self._probe = None
        self._bodies: dict[str, bytes] = {}
        self.refused: list[dict[str, Any]] = []
        largest = spec.chunks(length) * (2 * public_key.bits // 4 + 3) + 4096
        self._server = Server(config.channel, self._handle, lambda header: largest, io_timeout_s=config.wait_s,
                              tls=holder_channel_tls(config.endpoint.tls)[1])

    def _handle(self, header: dict[str, Any], body: bytes | None) -> tuple[dict[str, Any], bytes | None]:
        kind, round_id = header.get("kind"), header.get("round")
        if not isinstance(round_id, int) or isinstance(round_id, bool):
            return {"status": "rejected", "reason": "the request names no round"}, None
        if kind == "contribution":
            return self._contribution(round_id, body), None
        if kind == "wait":  # the other compute parties: is round r's set of contributions final?
            with self._lock:
                done = self._lock.wait_for(lambda: self._settled >= round_id, timeout=self.config.wait_s)
            return ({"status": "ok"} if done else {"status": "failed", "reason": "round did not settle in time"}), None
        return {"status": "rejected", "reason": f"unknown request kind {str(kind)[:40]!r}"}, None

    def _contribution(self, round_id: int, body: bytes | None) -> dict[str, Any]:
        if body is None:
            return {"status": "rejected", "reason": "no contribution in the request"}
        with self._lock:
            # A holder may see release r before this party has opened round r: wait for it.
            self._lock.wait_for(lambda: self._current >= round_id, timeout=self.config.wait_s)
            if self._current != round_id or self._settled >= round_id:
                return {"status": "rejected", "reason": f"round {round_id} is not open (open: {self._current})"}
            try:
                # The full check (format, key, spec, round, registry, length, ciphertexts in
                # Z*_(n^2), duplicates) of paillier.aggregator, on a probe round that is never closed.
                self._probe.submit(body)
            except RejectedContribution as exc:
                self.refused.append({"round": round_id, "holder": exc.contributor, "reason": exc.reason})
                return {"status": "rejected", "reason": exc.reason}
            self._bodies[Contribution.from_bytes(body).contributor] = bytes(body)  # parsed and accepted above
            self._lock.notify_all()
        return {"status": "accepted"}

    def open(self, round_id: int, *, spec=None, length: int | None = None) -> None:
        """Open ``round_id``; the evaluation round passes its own packing and length."""
        with self._lock:
            self._probe = Aggregator(self.public_key, spec or self.spec).open_round(
                round_id, length=length or self.length, deadline_s=self.config.deadline_s,
                expected=self.config.holders)
            self._bodies = {}
            self._current = round_id
            self._lock.notify_all()

    def collect(self, round_id: int) -> list[bytes]:
        """Every registered holder's message for the open round, or those in by the deadline."""
        end = time.monotonic() + self.config.deadline_s
        with self._lock:
            self._lock.wait_for(lambda: len(self._bodies) == len(self.config.holders),
                                timeout=max(0.0, end - time.monotonic()))
            bodies = list(self._bodies.values())
            self._settled = round_id
            self._lock.notify_all()
        return bodies

    def close(self) -> None:
        with self._lock:
            self._settled = 1 << 62  # release anyone still waiting
            self._lock.notify_all()
        time.sleep(0.2)
        self._server.close()
        # requests refused before they were read: failed TLS handshakes, a 'wait' without a party's certificate
        self.refused.extend({"round": None, "holder": None, "reason": reason} for reason in self._server.refused)


def _plan(config: ComputeConfig, length: int):
    """Calibrate for (epsilon, delta) over the run's rounds and its evaluation, and book it, before any round.

    One noise multiplier for every release, as in the joint mode: R step releases of
    sensitivity 2C and one "mean" release (the evaluation sums) of sensitivity 2 C_eval.
    """
    privacy = config.privacy
    if privacy is None:
        return None, None
    from mpc_rec.dp.accounting import calibrate
    from mpc_rec.dp.clipping import ClipBounds
    from mpc_rec.dp.ledger import create_ledger, ledger_digest, reserve_for_plan

    plan = calibrate(target_epsilon=privacy.epsilon, delta=privacy.delta, steps=config.rounds,
                     clip=ClipBounds(step=config.clip, mean=config.clip_eval), dimension=length,
                     parties=config.endpoint.world_size, trusted_parties=privacy.trusted_parties, mean_releases=1)
    if not privacy.ledger.exists():
        privacy.ledger.parent.mkdir(parents=True, exist_ok=True)
        create_ledger(privacy.ledger, total_epsilon=privacy.budget_epsilon, total_delta=privacy.budget_delta)
    reserve_for_plan(privacy.ledger, plan, dataset=privacy.dataset, run_id=config.run_id, timestamp=privacy.timestamp)
    return plan, ledger_digest(privacy.ledger)


def privacy_record(config: ComputeConfig, plan: Any, ledger: str | None, *, rounds_done: int) -> dict[str, Any]:
    """What a release (and the run summary) says about its privacy."""
    if plan is None:
        return {"mode": "no-dp", "note": "no differential privacy: item sums revealed exactly (benchmarking only)",
                "round": rounds_done, "rounds": config.rounds, "run_id": config.run_id,
                "clipping": {"step": config.clip, "eval": config.clip_eval}, "evaluation": config.evaluation}
    from mpc_rec.dp.accounting import epsilon_spent

    return {
        "mode": "dp", "run_id": config.run_id, "round": rounds_done, "rounds": config.rounds,
        "epsilon": plan.epsilon, "epsilon_spent": epsilon_spent(plan, steps=rounds_done) if rounds_done else 0.0,
        "target_epsilon": plan.target_epsilon, "delta": plan.delta, "mechanism": plan.mechanism,
        "accountant": plan.accountant, "sigma_total": plan.sigma_total, "sigma_party": plan.sigma_party,
        "noise_multiplier": plan.noise_multiplier, "clipping": {"step": plan.clip.step, "eval": plan.clip.mean},
        "eval_sigma_total": plan.mean_sigma_total, "evaluation": config.evaluation, "trust": plan.trust_assumption,
        "neighbouring": "user-level (all ratings of one user), replace-one; every user in every round",
        "clipped_by": MECHANISM_NOTE, "global_mean": "public midpoint of the rating scale (no budget)",
        "epsilon_includes": "the evaluation release (the plan's one mean release), counted in full from round 0",
        "benchmark_exact_rmse": ("the exact test sums were revealed too: NOT covered by the DP guarantee"
                                 if config.evaluation == "clipped+exact" else False),
        "dataset": config.privacy.dataset, "ledger_digest": ledger,
    }


def item_step_size(learning_rate: float, gradient: np.ndarray) -> float:
    """``learning_rate`` over max(1, RMS of the noised gradient in units of C).

    The sum grows with the number of users (a large data set would overshoot with a fixed
    step) and with the noise (a small epsilon: a smaller step averages it over rounds);
    dividing by the RMS of the released, noised gradient handles both. It is computed
    from public values only: post-processing, no budget (protocols/federated.md).
    """
    return learning_rate / max(1.0, float(np.sqrt(np.mean(np.square(gradient)))))


def reveal_round_total(total: Any, plan: Any, round_id: int, log: RevealLog) -> np.ndarray:
    """Add this party's noise to its share of the round's total and open the noised sum.

    The only opening of the federated mode; it goes through the reveal choke point
    (``guard_reveal``) tagged as step ``round_id`` of the plan (``--no-dp``: declared public).
    """
    from mpc_rec.mpc.privacy import add_own_noise
    from mpc_rec.mpc.reveal import open_ring_to_all

    if plan is None:
        tagged = declare_public(total, reason=NO_DP_REASON)
    else:
        tagged = noised(add_own_noise(total, plan, "step"), plan=plan, release="step", index=round_id,
                        aggregate="federated item-side sum (clipped per user by holders)")
    units = open_ring_to_all(tagged, name=f"round {round_id} item-side sum", log=log).numpy()
    return units.astype(np.float64) / total.encoder._scale  # exact while |units| < 2^53


def _collect(config: ComputeConfig, channel: HolderChannel | None, client_tls: ChannelTls | None, round_id: int,
             **round_shape) -> list[bytes]:
    """The aggregator: the holders' messages of ``round_id``; the others: wait until it has them."""
    if channel is not None:
        channel.open(round_id, **round_shape)
        return channel.collect(round_id)
    reply, _ = request(config.channel, {"kind": "wait", "round": round_id}, wait_s=config.wait_s + 60,
                       tls=client_tls)
    if reply.get("status") != "ok":
        raise PeerError(f"round {round_id}: {reply.get('reason', 'the aggregator did not settle it')}")
    return []


def run_compute(config: ComputeConfig) -> dict[str, Any]:
    from mpc_rec.mpc.reveal import log_entries
    from mpc_rec.mpc.session import Session
    from mpc_rec.mpc.sharing import agree
    from mpc_rec.paillier.party import aggregate_round_in_party

    rank = config.endpoint.rank
    catalogue = read_catalogue(config.catalogue)  # public
    length = len(catalogue) * (config.factors + 1)
    plan, ledger = _plan(config, length)  # before anything from the holders arrives
    max_holders = len(config.holders)
    channel = key_holder = aggregator = None
    channel_client = holder_channel_tls(config.endpoint.tls)[0]
    eval_length = evaluation_length(config.evaluation)
    eval_key_holder = eval_aggregator = eval_spec = None
    if rank == AGGREGATOR:
        public_key = load_public_key(config.public_key, expected_fingerprint=config.fingerprint)
        spec = packing_spec(public_key.bits, clip=config.clip, max_users=config.max_users, max_holders=max_holders)
        aggregator = Aggregator(public_key, spec, expected_fingerprint=config.fingerprint)
        channel = HolderChannel(config, public_key, spec, length)
        eval_spec = evaluation_spec(public_key.bits, max_holders=max_holders)
        eval_aggregator = Aggregator(public_key, eval_spec, expected_fingerprint=config.fingerprint)
    elif rank == KEY_HOLDER:
        private_key = load_private_key(config.private_key)
        if private_key.public_key.fingerprint != config.fingerprint.lower():
            raise ConfigError(f"{config.private_key}: this key's fingerprint is not paillier.fingerprint")
        spec = packing_spec(private_key.public_key.bits, clip=config.clip, max_users=config.max_users,
                            max_holders=max_holders)
        key_holder = KeyHolder(private_key, spec)
        eval_key_holder = KeyHolder(private_key, evaluation_spec(private_key.public_key.bits, max_holders=max_holders))
    factors, biases = initial_items(len(catalogue), config.factors, scale=config.init_scale, seed=config.seed)
    mean = sum(config.rating_range) / 2
    velocity = None
    reveals = RevealLog(plan_digest=None if plan is None else plan.digest())
    rounds: list[dict[str, Any]] = []

    def publish(done: int) -> None:
        if rank == KEY_HOLDER:  # the parties hold identical public item sides; one publishes
            write_release_atomic(config.release, ItemRelease(catalogue, factors, biases, mean,
                                                             privacy_record(config, plan, ledger, rounds_done=done)))

    try:
        with Session(config.endpoint) as session:
            agree(session.comm, 0, {**config.public(), "catalogue": catalogue, "length": length,
                                    "noise_plan": None if plan is None else plan.digest(),
                                    "versions": {"mpc_rec": __version__, "federated": 1}})
            publish(0)
            for round_id in range(config.rounds):
                started = time.perf_counter()
                contributions = _collect(config, channel, channel_client, round_id)
                collected = time.perf_counter()
                before = session.traffic()
                party_round = aggregate_round_in_party(
                    session, round_id=round_id, length=length, aggregator=aggregator, contributions=contributions,
                    deadline_s=config.deadline_s, expected=config.holders, key_holder=key_holder)
                total = reveal_round_total(party_round.tensor, plan, round_id, reveals)
                # Post-processing of the noised sum, in units of the clip bound.
                gradient = total / config.clip
                step = ItemStep(item_step_size(config.learning_rate, gradient), config.momentum,
                                config.item_regularization)
                factors, biases, velocity = item_update(step, factors, biases, gradient, velocity)
                publish(round_id + 1)
                traffic = session.traffic()
                rounds.append({"round": round_id, "holders_aggregated": party_round.count,
                               "item_step_size": step.learning_rate, "wait_for_holders_s": collected - started,
                               "mpc_s": time.perf_counter() - collected,
                               "seconds": time.perf_counter() - started,
                               "mpc_bytes_sent": traffic["bytes"] - before["bytes"],
                               "report": None if party_round.report is None else {
                                   "accepted": list(party_round.report.accepted),
                                   "rejected": [list(r) for r in party_round.report.rejected],
                                   "dropped": list(party_round.report.dropped)}})
            started = time.perf_counter()
            contributions = _collect(config, channel, channel_client, config.rounds, spec=eval_spec, length=eval_length)
            party_round = aggregate_round_in_party(
                session, round_id=config.rounds, length=eval_length, aggregator=eval_aggregator,
                contributions=contributions, deadline_s=config.deadline_s, expected=config.holders,
                key_holder=eval_key_holder)
            evaluation = reveal_evaluation(party_round.tensor, plan, config.evaluation, reveals)
            evaluation.update(round=config.rounds, holders_aggregated=party_round.count,
                              seconds=time.perf_counter() - started)
            traffic = session.traffic()
    except RuntimeError as exc:  # torch.distributed reports lost or silent peers this way
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PeerError(f"party '{config.name}' lost contact with the others: {detail}") from None
    finally:
        if channel is not None:
            channel.close()
    result = {
        "role": "compute", "name": config.name, "rank": rank, "mode": "federated",
        "privacy": privacy_record(config, plan, ledger, rounds_done=config.rounds),
        "plan": None if plan is None else plan.to_dict(),
        "reveals": log_entries(reveals), "rounds": rounds, "evaluation": evaluation,
        "refused": None if channel is None else channel.refused,  # the aggregator's only
        "traffic": {"bytes_sent": traffic["bytes"], "rounds": traffic["rounds"],
                    "counted_by": "CrypTen communicator (elements x 8 bytes per send or collective)"},
        "peak_memory_mb": peak_memory_mb(),
    }
    config.output_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(config.output_dir / "party.json", json.dumps(result, indent=2) + "\n")
    return result
