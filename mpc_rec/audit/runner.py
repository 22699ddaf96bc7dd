"""``mpc-rec audit``: real captured runs on two inputs, attacks, searches, a verdict.

The auditor plays every organisation (like ``mpc-rec run``): it holds all the data, so it
can compute what must never appear (other parties' rows, exact aggregates) and score
attacks against the truth. Each party's view is only what that party's process holds:
its transcript, its log and its output folder.
"""

from __future__ import annotations

import math
import shutil
from concurrent.futures import ThreadPoolExecutor
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mpc_rec.audit import attacks, membership, views
from mpc_rec.audit.transcript import Transcript
from mpc_rec.data import (
    Ratings, dense_matrices, load_ratings, partition_users, sort_ids, split_train_test, synthetic_ratings,
    write_ratings_csv,
)
from mpc_rec.errors import ConfigError
from mpc_rec.launch import DEFAULT_PRIVACY, RunOptions, run_local
from mpc_rec.model import ModelState, TrainConfig, initial_parameters, plaintext_data, predictions

WEAKENINGS = {
    "tfp": "INSECURE: CrypTen TFP, party 0 draws every Beaver triple",
    "no-dp": "no differential privacy: outputs released exactly",
}
ALPHA = 1e-4  # per check, split over the parties (Bonferroni); the secure audit fails by chance ~0.1% of runs


@dataclass(frozen=True)
class AuditOptions:
    out: Path
    data: Path | None = None
    parties: int = 3
    weaken: tuple[str, ...] = ()
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=3))
    top_k: int = 10
    epsilon: float = 4.0
    delta: float = 1e-5
    rating_range: tuple[float, float] = (1.0, 5.0)
    mia_epsilons: tuple[float, ...] = (1.0, 8.0)
    mia_trials: int = 200
    mia_epochs: int | None = None
    timeout_s: float = 120.0

    def __post_init__(self) -> None:
        unknown = [w for w in self.weaken if w not in WEAKENINGS]
        if unknown:
            raise ConfigError(f"--weaken: unknown weakening '{unknown[0]}' (choose from {', '.join(WEAKENINGS)})")


@dataclass
class Truth:
    """The joint training inputs in rank order, as the parties' processes hold them."""

    ratings: np.ndarray
    mask: np.ndarray
    rows: list[int]
    users: list[list[str]]
    train: Ratings
    test: Ratings
    catalogue: list[str]

    def own_rows(self, rank: int) -> slice:
        start = sum(self.rows[:rank])
        return slice(start, start + self.rows[rank])


def ground_truth(ratings: Ratings, parties: int, seed: int, test_fraction: float = 0.2) -> Truth:
    """The same split and dealing as ``launch.run_local``."""
    train, test = split_train_test(ratings, test_fraction=test_fraction, seed=seed)
    blocks = partition_users(ratings, parties, seed=seed)
    catalogue = ratings.item_ids()
    r_parts, m_parts, rows, users = [], [], [], []
    for block in blocks:
        own_users = sort_ids(set(block.users))
        r, m = dense_matrices(train.subset(np.isin(train.users, own_users)), own_users, catalogue)
        r_parts.append(r), m_parts.append(m), rows.append(len(own_users)), users.append(own_users)
    return Truth(np.concatenate(r_parts), np.concatenate(m_parts), rows, users, train, test, catalogue)


def alternative_input(ratings: Ratings, rating_range: tuple[float, float], seed: int = 1) -> Ratings:
    """A different data set of the same shape: every user gets another user's rating rows,
    mirrored on the rating scale. Same user ids (so the same parties and row counts) and
    the same items (so the same catalogue)."""
    ids = sort_ids(ratings.users)
    shuffled = np.random.default_rng(seed).permutation(len(ids))
    new_id = {ids[j]: ids[shuffled[j]] for j in range(len(ids))}
    users = np.array([new_id[u] for u in ratings.users])
    return Ratings(users, ratings.items, sum(rating_range) - ratings.values)


def run_audit(options: AuditOptions, note: Callable[[str], None] = lambda message: None) -> dict[str, Any]:
    started = time.perf_counter()
    try:  # before the long runs, not after them
        import matplotlib  # noqa: F401
    except ImportError:
        raise ConfigError("mpc-rec audit draws its plots with matplotlib: install the 'report' extra") from None
    out = options.out
    work = out / "runs"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    if options.data is None:
        data_a = synthetic_ratings(seed=options.train.seed)
    else:
        data_a = load_ratings(options.data, rating_range=options.rating_range)
    data_b = alternative_input(data_a, options.rating_range)
    for label, data in (("a", data_a), ("b", data_b)):
        write_ratings_csv(data, work / f"input-{label}.csv")
    note("two runs (inputs A and B) side by side, with transcript capture")
    # Side by side: each run spends much of its time waiting on its own peers' rounds.
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {label: pool.submit(_captured_run, options, work / f"input-{label}.csv", work / label) for label in ("a", "b")}
        runs = {label: future.result() for label, future in futures.items()}
    truth = {"a": ground_truth(data_a, options.parties, options.train.seed),
             "b": ground_truth(data_b, options.parties, options.train.seed)}
    note("analysing the party views")
    transcripts = {label: [Transcript(work / label / "transcript", r) for r in range(options.parties)] for label in runs}
    report: dict[str, Any] = {
        "configuration": _described(options),
        "runs": {label: {"privacy": run["privacy"], "dealer": run["dealer"], "reveals": run["reveals"],
                         "secure_run_s": run["timing"]["secure_run_s"]} for label, run in runs.items()},
    }
    report["views"] = _view_checks(options, transcripts, truth)
    report["reconstruction"] = [asdict(attacks.reconstruct_inputs(t, truth["a"].ratings, truth["a"].mask, truth["a"].own_rows(t.rank)))
                                for t in transcripts["a"]]
    report["leakage"] = _leakage(options, transcripts["a"], truth["a"], runs["a"], work / "a")
    note("membership inference (plaintext simulation of the released mechanism)")
    report["membership"] = _membership(options, truth["a"])
    report["verdicts"] = verdicts(report, options)
    report["passed"] = all(v["passed"] for v in report["verdicts"])
    report["audit_s"] = time.perf_counter() - started
    from mpc_rec.audit.report import write_report

    write_report(out, report)
    return report


def _captured_run(options: AuditOptions, data: Path, folder: Path) -> dict[str, Any]:
    privacy = None
    if "no-dp" not in options.weaken:
        privacy = dict(DEFAULT_PRIVACY, epsilon=options.epsilon, delta=options.delta, budget_epsilon=1e9, budget_delta=0.5)
    run = RunOptions(
        parties=options.parties, data=data, train=options.train, top_k=options.top_k,
        rating_range=options.rating_range, out=folder / "outputs", timeout_s=options.timeout_s,
        dealer="insecure-tfp" if "tfp" in options.weaken else "ttp", progress=False, privacy=privacy,
        ledger_dir=folder / "ledger", transcript_dir=folder / "transcript",
    )
    return run_local(run)


def _view_checks(options: AuditOptions, transcripts: dict[str, list[Transcript]], truth: dict[str, Truth]) -> list[dict[str, Any]]:
    checks = []
    for rank in range(options.parties):
        a, b = transcripts["a"][rank], transcripts["b"][rank]
        ring_a, bits_a = views.split_domains(a)
        ring_b, bits_b = views.split_domains(b)
        uni_a, uni_b = views.uniformity(ring_a), views.uniformity(ring_b)
        balance, bit_serial = views.bit_balance(np.concatenate([bits_a, bits_b]))
        unmasked = [x for _, x, _ in views.unmasked_values(a)]
        uni_unmasked = views.uniformity(np.concatenate(unmasked) if unmasked else np.zeros(0, np.uint64))
        raw = views.distinguish(views.view_values(a), views.view_values(b), seed=rank)
        checks.append({
            "rank": rank,
            "messages": len(views.masked_messages(a)),
            "ring_values": uni_a.values, "bit_values": int(len(bits_a)),
            "byte_p": min(uni_a.byte_p, uni_b.byte_p), "bit_p": min(uni_a.bit_p, uni_b.bit_p),
            "low_magnitude": uni_a.low_magnitude + uni_b.low_magnitude,
            "low_magnitude_expected": uni_a.low_magnitude_expected + uni_b.low_magnitude_expected,
            "low_magnitude_p": min(uni_a.low_magnitude_p, uni_b.low_magnitude_p),
            "serial_p": min(views.serial_independence(ring_a), views.serial_independence(ring_b)),
            "bit_balance_p": balance, "bit_serial_p": bit_serial,
            "input_correlation_p": views.input_correlation(a, [truth["a"].ratings, truth["a"].mask]),
            "distinguisher": asdict(raw),
            "unmasked_values": uni_unmasked.values,
            "unmasked_p": uni_unmasked.p_value if uni_unmasked.values else 1.0,
            "unmasked_low_magnitude": uni_unmasked.low_magnitude,
            "byte_histogram": uni_a.byte_histogram.sum(axis=0).tolist(),
        })
    return checks


def exact_aggregates(truth: Truth, options: AuditOptions) -> dict[str, np.ndarray]:
    """Un-noised item-side aggregates of the run's data, and those of its first step."""
    r, m = truth.ratings, truth.mask
    data = plaintext_data(r, m)
    state = ModelState(*initial_parameters(*r.shape, options.train))
    error = (m * predictions(state, data.mean).numpy() - r)
    p = state.user_factors.numpy()
    midpoint_error = m * predictions(state, sum(options.rating_range) / 2).numpy() - r
    return {
        "item rating counts": m.sum(axis=0),
        "item rating sums": r.sum(axis=0),
        "item-factor gradient sum of step 1 (E^T P)": error.T @ p,
        "item-bias gradient sum of step 1": error.sum(axis=0),
        "item-factor gradient sum of step 1 with the public midpoint (E^T P)": midpoint_error.T @ p,
        "item-bias gradient sum of step 1 with the public midpoint": midpoint_error.sum(axis=0),
        "user rating counts": m.sum(axis=1),
    }


def _exact_scalars(truth: Truth, options: AuditOptions) -> dict[str, float]:
    """The global mean and the un-noised model's test error (plaintext reference training)."""
    user_sse, user_counts = _reference_test_errors(truth, options.train)
    mse = float(user_sse.sum() / max(user_counts.sum(), 1))
    return {"global mean rating": float(plaintext_data(truth.ratings, truth.mask).mean), "test MSE": mse,
            "test RMSE": math.sqrt(mse)}


def _reference_test_errors(truth: Truth, config: TrainConfig) -> tuple[np.ndarray, np.ndarray]:
    """Per-user held-out squared error and count under the plaintext model (the metric game's fixed model)."""
    from mpc_rec.model import train_epoch

    data = plaintext_data(truth.ratings, truth.mask)
    users = [u for block in truth.users for u in block]
    test_r, test_m = dense_matrices(truth.test, users, truth.catalogue)
    state = ModelState(*initial_parameters(*truth.ratings.shape, config))
    for _ in range(config.epochs):
        state = train_epoch(state, data, config)
    error = test_m * predictions(state, data.mean).numpy() - test_r
    return (error * error).sum(axis=1), test_m.sum(axis=1)


def _leakage(options: AuditOptions, transcripts: list[Transcript], truth: Truth, run: dict[str, Any], folder: Path) -> dict[str, Any]:
    scan = attacks.LeakageScan()
    aggregates = exact_aggregates(truth, options)
    scalars = _exact_scalars(truth, options)
    noise_sd = _released_noise_sd(run, truth)
    # A noised release may land within the tolerance of the exact value by chance; a match
    # counts as a finding only where the planned noise would have moved it out almost surely.
    checkable = lambda name, tolerance: noise_sd.get(name, 0.0) == 0 or tolerance < 0.01 * noise_sd[name]  # noqa: E731
    checked_scalars = {k: v for k, v in scalars.items() if checkable(k, 1e-4 * abs(v) + 5e-5)}
    scalar_arrays = {k: np.array([v]) for k, v in scalars.items() if k != "test RMSE" and checkable(k, 1e-3 * max(1, abs(v)))}
    rows = list(zip(truth.train.users, truth.train.items, truth.train.values.tolist()))
    for transcript in transcripts:
        attacks.exact_aggregates_in_transcript(transcript, {**aggregates, **scalar_arrays}, scan)
        rank = transcript.rank
        own = set(truth.users[rank])
        foreign_users = {u for block in truth.users for u in block} - own
        foreign_rows = {(u, i, v) for u, i, v in rows if u not in own}
        files = [folder / "transcript" / f"party-{rank}.log", *sorted((folder / "outputs" / f"party-{rank}").glob("*"))]
        for path in files:
            if path.is_file():
                attacks.scan_text_file(path, foreign_rows=foreign_rows, foreign_users=foreign_users,
                                       scalars=checked_scalars, scan=scan)
    return {"files": scan.files, "messages": scan.messages, "findings": [asdict(f) for f in scan.findings],
            "aggregates": sorted(aggregates), "scalars": {k: v for k, v in scalars.items()},
            "scalars_checked_in_files": sorted(checked_scalars), "scalars_checked_in_transcripts": sorted(scalar_arrays),
            "released_noise_sd": noise_sd}


def _released_noise_sd(run: dict[str, Any], truth: Truth) -> dict[str, float]:
    """Approximate standard deviations of the released test MSE and RMSE under the run's noise plan."""
    privacy = run["privacy"]
    if privacy.get("mode") != "dp":
        return {}
    count = max(len(truth.test), 1)
    sigma = privacy["eval_sigma_total"] * math.sqrt(len(truth.rows))  # every party's noise is in the opened value
    rmse = max(run["metrics"]["rmse_plaintext"], 1e-6)
    mse_sd = sigma * math.sqrt(1 + rmse**4) / count
    return {"test MSE": mse_sd, "test RMSE": mse_sd / (2 * rmse)}


def _membership(options: AuditOptions, truth: Truth) -> list[dict[str, Any]]:
    import torch

    from mpc_rec.dp.accounting import calibrate
    from mpc_rec.dp.clipping import ClipBounds

    epochs = options.mia_epochs or options.train.epochs
    config = replace(options.train, epochs=epochs)
    audited = None if "no-dp" in options.weaken else options.epsilon
    settings = sorted(set(options.mia_epsilons) | ({audited} if audited is not None else set()))
    user_sse, user_counts = _reference_test_errors(truth, config)
    results = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small dense products: threads only contend on shared cores
    try:
        for epsilon in [*settings, None]:
            plan = None
            if epsilon is not None:
                plan = calibrate(target_epsilon=epsilon, delta=options.delta, steps=epochs,
                                 clip=ClipBounds(step=DEFAULT_PRIVACY["clip_step"], mean=DEFAULT_PRIVACY["clip_eval"]),
                                 dimension=len(truth.catalogue) * (config.factors + 1), parties=options.parties,
                                 trusted_parties=1, mean_releases=1)
            mechanism = membership.Mechanism(config, plan, item_weight=DEFAULT_PRIVACY["item_weight"],
                                             item_step=DEFAULT_PRIVACY["item_step"],
                                             midpoint=sum(options.rating_range) / 2, top_k=options.top_k or 10)
            metric = membership.metric_membership(user_sse, user_counts, plan,
                                                  error=options.rating_range[1] - options.rating_range[0],
                                                  trials=options.mia_trials)
            for result in [*membership.membership_inference(truth.ratings, truth.mask, mechanism,
                                                            rating_max=options.rating_range[1], trials=options.mia_trials),
                           metric]:
                record = asdict(result)
                record["audited"] = epsilon == audited
                record["epochs"] = epochs
                results.append(record)
    finally:
        torch.set_num_threads(threads)
    return results


def verdicts(report: dict[str, Any], options: AuditOptions) -> list[dict[str, Any]]:
    alpha = ALPHA / options.parties
    rows = []

    def add(check: str, passed: bool, detail: str) -> None:
        rows.append({"check": check, "passed": bool(passed), "detail": detail})

    v = report["views"]
    worst = min(min(c["byte_p"], c["bit_p"], c["low_magnitude_p"]) for c in v)
    add("view uniformity (bytes, bits, small values)", worst >= alpha,
        f"smallest p = {worst:.3g} over {sum(c['ring_values'] for c in v):,} ring values (threshold {alpha:.1g})")
    worst = min(min(c["serial_p"], c["bit_balance_p"], c["bit_serial_p"]) for c in v)
    add("view independence (serial, opened bits)", worst >= alpha, f"smallest p = {worst:.3g}")
    worst = min(c["input_correlation_p"] for c in v)
    add("view independent of the inputs (correlation)", worst >= alpha, f"smallest p = {worst:.3g}")
    text = "; ".join(f"party {c['rank']}: {c['distinguisher']['accuracy']:.3f} "
                     f"[{c['distinguisher']['low']:.3f}, {c['distinguisher']['high']:.3f}]" for c in v)
    add("distinguisher input A vs B at chance (99% CI)",
        all(c["distinguisher"]["low"] <= 0.5 for c in v), text)
    worst = min(c["unmasked_p"] for c in v)
    add("own triple draws do not unmask the view", worst >= alpha,
        f"smallest p = {worst:.3g}; small values after unmasking: "
        + ", ".join(str(c["unmasked_low_magnitude"]) for c in v))
    broken = [r for r in report["reconstruction"] if r["found_mask"] and r["mask_accuracy"] > 0.99 and r["rating_accuracy"] > 0.9]
    add("reconstruction of other parties' inputs from one transcript", not broken,
        "; ".join(f"party {r['attacker']} recovers {r['rating_accuracy']:.1%} of others' ratings and "
                  f"{r['mask_accuracy']:.1%} of their mask" for r in broken) or "no party's transcript yields a 0/1 mask")
    leak = report["leakage"]
    add("no plaintext in transcripts, logs or outputs", not leak["findings"],
        f"{leak['messages']:,} messages and {leak['files']} files searched; "
        + ("; ".join(f"{f['what']} in {f['where']}" for f in leak["findings"][:4]) or "nothing found"))
    reveals = report["runs"]["a"]["reveals"]
    exact = [r["value"] for r in reveals if r["tag"] != "Noised"]
    add("every opened value is noised", not exact,
        f"{len(reveals)} openings" + (f"; exact: {', '.join(exact)}" if exact else ", all under the noise plan"))
    for record in report["membership"]:
        if not record["audited"]:
            continue
        if record["bound"] is None:
            passed = record["low"] <= 0
            limit = "no DP: any advantage above 0 is a leak"
        else:
            passed = record["low"] <= record["bound"]
            limit = f"bound {record['bound']:.3f} at epsilon {record['epsilon']:.3g}"
        add(f"membership inference on {record['target']}", passed,
            f"advantage {record['advantage']:.3f} [{record['low']:.3f}, {record['high']:.3f}], {limit}")
    return rows


def _described(options: AuditOptions) -> dict[str, Any]:
    described = asdict(options)
    described.update(out=str(options.out), data=str(options.data) if options.data else "embedded-synthetic",
                     train=options.train.to_dict(), weaken=list(options.weaken),
                     weakened=[WEAKENINGS[w] for w in options.weaken])
    return described
