"""The ``mpc-rec`` command. Only this module parses arguments and sets exit codes."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from mpc_rec.errors import InputError, MpcRecError

EXIT_CODES = "Exit codes: 0 success, 1 internal error, 2 bad input or config, 3 another party failed."


def _fail(exc: MpcRecError) -> None:
    click.echo(f"mpc-rec: error: {exc}", err=True)
    sys.stderr.flush()
    # After a peer failure, torch.distributed's teardown can block on the dead peer.
    os._exit(exc.exit_code)


@click.group(epilog=EXIT_CODES)
@click.version_option(package_name="mpc-rec")
def main() -> None:
    """Secure multiparty matrix-factorization recommendations."""


@main.command(epilog=EXIT_CODES)
@click.option("--parties", type=click.IntRange(2, 8), default=3, show_default=True, help="Number of compute parties; users are split between them.")
@click.option("--data", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Ratings file (u.data, RecBole .inter, or CSV with user,item,rating header). Default: an embedded synthetic data set.")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Training epochs (full-batch gradient steps). [default: 30; 10 with DP]")
@click.option("--factors", type=click.IntRange(min=1), default=None, help="Latent factors K. [default: 16]")
@click.option("--learning-rate", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None, help="Gradient step size. [default: 0.003]")
@click.option("--momentum", type=click.FloatRange(0, 1, max_open=True), default=None, help="Heavy-ball momentum. [default: 0.9; 0.5 with DP]")
@click.option("--regularization", type=click.FloatRange(min=0), default=None, help="L2 penalty per rating. [default: 0.1]")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed for the split, the partition and the public initialisation.")
@click.option("--test-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.2, show_default=True, help="Share of ratings held out for the test RMSE.")
@click.option("--top-k", type=click.IntRange(min=0), default=None, help="Recommendations per user (0: train and evaluate only). [default: 10; 0 with --contributors]")
@click.option("--rating-range", type=(float, float), default=(1.0, 5.0), show_default=True, help="Smallest and largest valid rating.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("mpc-rec-run"), show_default=True, help="Output folder: summary.json and one folder per party.")
@click.option("--timeout", "timeout_s", type=click.FloatRange(1, 3600), default=30.0, show_default=True, help="Seconds a party waits for a peer before giving up.")
@click.option("--insecure-tfp-dealer", is_flag=True, help="INSECURE: party 0 generates every Beaver triple (CrypTen TFP) and can read all products. Benchmarking only.")
@click.option("--epsilon", type=click.FloatRange(0, min_open=True), default=4.0, show_default=True, help="User-level differential privacy budget of this run.")
@click.option("--delta", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=1e-5, show_default=True, help="DP delta of this run.")
@click.option("--dp-trust", type=click.IntRange(min=1), default=None, help="Parties assumed honest; the noise of that many parties alone carries the guarantee. [default: 1, i.e. all but one may collude]")
@click.option("--dp-clip", type=click.FloatRange(0, min_open=True), default=None, help="Per-user L2 bound on each step's item-side contribution. [default: 0.1 below epsilon 2, else 0.3]")
@click.option("--no-dp", is_flag=True, help="No differential privacy: exact outputs, labelled as such. Benchmarking only.")
@click.option("--benchmark-exact-rmse", is_flag=True, help="Benchmarking only: also reveal the exact test RMSE of the DP model (NOT covered by the DP guarantee; labelled in every output).")
@click.option("--ledger-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("mpc-rec-ledger"), show_default=True, help="Privacy budget ledgers, one file per party.")
@click.option("--budget-epsilon", type=click.FloatRange(0, min_open=True), default=50.0, show_default=True, help="Total epsilon per data set when a new ledger is created.")
@click.option("--progress/--no-progress", default=None, help="Progress line on stderr. [default: when stderr is a terminal]")
@click.option("--transport", type=click.Choice(["gloo", "tls"]), default="gloo", show_default=True, help="gloo: plain TCP (loopback or a trusted network); tls: mutually authenticated TLS 1.3 with a throw-away pilot CA.")
@click.option("--release", type=click.Choice(["exact", "threshold"]), default="exact", show_default=True, help="What each user is shown: the exact top-k, or a threshold-policy draw that is epsilon-DP w.r.t. the user's ranking (protocols/release.md).")
@click.option("--release-epsilon", type=click.FloatRange(0, min_open=True), default=None, help="Epsilon of one threshold release (required with --release threshold).")
@click.option("--release-budget", type=click.FloatRange(0, min_open=True), default=10.0, show_default=True, help="Total release epsilon per user, over all runs sharing --ledger-dir; then the last release is shown again.")
@click.option("--release-users", type=click.Path(dir_okay=False, path_type=Path), default=None, help="CSV 'user,epsilon': users who chose a stronger (smaller) release epsilon than the run's.")
@click.option("--contributors", type=click.IntRange(min=0), default=0, show_default=True, help="Users' rows come from this many simulated data holders (separate processes) through Paillier ingest; 0: each compute party holds its own users' rows.")
@click.option("--ingest-deadline", type=click.FloatRange(1, 82800), default=1800.0, show_default=True, help="Seconds the aggregator accepts contributions (the round closes earlier once every contributor sent or withdrew).")
@click.option("--insecure-1024-bit-key", is_flag=True, help="INSECURE: 1024-bit Paillier key for --contributors (fast tests only; default 2048).")
@click.option("--contributor-faults", default=None, help="Simulate misbehaving contributors, e.g. 'c002:drop,c003:replay' (faults: drop, replay, wrong-key, malformed, oversized, nan).")
@click.option("--save-shares", is_flag=True, help="Each party keeps its own shares of the trained model in its folder (model-shares.npz, never opened), for `mpc-rec recommend --refine`.")
@click.option("--mode", type=click.Choice(["joint", "federated"]), default="joint", show_default=True, help="joint: parties secret-share their users' rows; federated: H data holders keep ratings and user factors, send only Paillier-encrypted clipped item updates (--epochs = rounds).")
@click.option("--holders", type=int, default=None, help="--mode federated: number of data holders (separate processes, disjoint users).")
@click.option("--holder-faults", default=None, hidden=True, help="Simulate misbehaving holders, e.g. 'h002:garbage' (tests).")
def run(**options: Any) -> None:
    """Run a complete local multi-party job: train, score, evaluate, summarise.

    Starts one process per party plus the dealer on this machine (loopback TCP), trains
    the secret-shared model, reveals each party's recommendations to it alone and only
    the aggregate test RMSE to all, runs the plaintext reference for comparison, and
    writes OUT/summary.json and OUT/<party>/recommendations.csv.
    """
    mode, holders, holder_faults = options.pop("mode"), options.pop("holders"), options.pop("holder_faults")
    if mode == "federated":
        from mpc_rec.federated.launch import FederatedOptions, format_federated_summary, run_federated

        try:
            summary = run_federated(FederatedOptions.from_cli({**options, "holders": holders, "holder_faults": holder_faults}))
        except MpcRecError as exc:
            _fail(exc)
        click.echo(format_federated_summary(summary))
        return
    from mpc_rec.launch import RunOptions, format_summary, run_local

    try:
        if holders is not None or holder_faults:
            raise InputError("--holders and --holder-faults need --mode federated")
        summary = run_local(RunOptions.from_cli(options))
    except MpcRecError as exc:
        _fail(exc)
    click.echo(format_summary(summary))


@main.command(epilog=EXIT_CODES)
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Party configuration (TOML); see parties/README.md.")
@click.option("--events", is_flag=True, hidden=True, help="Print progress as JSON lines on stdout (used by `run`).")
def party(config_path: Path, events: bool) -> None:
    """Run ONE party process (compute party or dealer) from its configuration file."""
    from mpc_rec.config import load_party_config
    from mpc_rec.party import run_party

    def report(event: dict[str, Any]) -> None:
        if events:
            click.echo(json.dumps(event))
        elif event.get("event") == "epoch":
            click.echo(f"epoch {event['epoch']}/{event['epochs']} ({event['seconds']:.2f} s)", err=True)

    try:
        config = load_party_config(config_path)
        result = run_party(config, report)
    except MpcRecError as exc:
        _fail(exc)
    if result["role"] == "compute":
        rmse = result["rmse_secure"]
        click.echo(f"party {result['name']}: done" + (f", test RMSE {rmse:.4f}" if rmse is not None else "")
                   + f"; outputs in {config.output_dir}", err=True)


@main.command(epilog=EXIT_CODES)
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Contributor configuration (TOML); see parties/README.md.")
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as one JSON line on stdout.")
def contributor(config_path: Path, as_json: bool) -> None:
    """Run ONE data holder: encrypt its rows under the key holder's key and submit them once."""
    from mpc_rec.ingest.contributor import load_contributor_config, run_contributor

    try:
        result = run_contributor(load_contributor_config(config_path))
    except MpcRecError as exc:
        _fail(exc)
    if as_json:
        click.echo(json.dumps(result))
    click.echo(f"contributor {result['contributor']}: {result['status']}", err=True)


@main.command(epilog=EXIT_CODES)
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Holder configuration (TOML), written by `mpc-rec run --mode federated`.")
def holder(config_path: Path) -> None:
    """Run ONE federated data holder: local user updates, encrypted item updates, each round."""
    from mpc_rec.federated.config import load_holder_config
    from mpc_rec.federated.holder import run_holder

    try:
        result = run_holder(load_holder_config(config_path))
    except MpcRecError as exc:
        _fail(exc)
    click.echo(f"holder {result['holder']}: {len(result['rounds'])} rounds sent", err=True)


@main.command("federated-party", epilog=EXIT_CODES)
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Federated compute-party configuration (TOML).")
def federated_party(config_path: Path) -> None:
    """Run ONE compute party of the federated mode (the dealer runs `mpc-rec party`)."""
    from mpc_rec.federated.compute import run_compute
    from mpc_rec.federated.config import load_compute_config

    try:
        result = run_compute(load_compute_config(config_path))
    except MpcRecError as exc:
        _fail(exc)
    click.echo(f"party {result['name']}: {len(result['rounds'])} federated rounds done", err=True)


@main.command(epilog=EXIT_CODES)
@click.argument("ledger", type=click.Path(dir_okay=False, exists=False, path_type=Path))
def budget(ledger: Path) -> None:
    """Show a privacy budget ledger: spent and left per data set, and its digest."""
    from mpc_rec.dp.ledger import format_ledger, load_ledger

    try:
        click.echo(format_ledger(load_ledger(ledger)))
    except MpcRecError as exc:
        _fail(exc)


@main.command(epilog=EXIT_CODES)
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Folder for ca.pem, ca.key and <party>.pem / <party>.key (keys 0600).")
@click.option("--parties", required=True, help="Comma-separated party names, e.g. org-a,org-b,org-c,dealer; each becomes its certificate's identity.")
@click.option("--days", type=click.IntRange(1, 3650), default=365, show_default=True, help="Validity of the certificates.")
def certs(out: Path, parties: str, days: int) -> None:
    """Create a pilot CA and one key and certificate per party (for tests and trials)."""
    from mpc_rec.transport.certs import certificate_fingerprint, make_pilot_certificates

    try:
        written = make_pilot_certificates(out, [p.strip() for p in parties.split(",") if p.strip()], days=days)
    except MpcRecError as exc:
        _fail(exc)
    click.echo(f"pilot CA: {written.pop('ca')}")
    for name, path in written.items():
        click.echo(f"{name}: {path} (key {path.with_suffix('.key')}), fingerprint {certificate_fingerprint(path)}")


@main.command(epilog=EXIT_CODES)
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--sweep", type=click.Path(dir_okay=False, path_type=Path), default=None, help="sweep.json of scripts/dp_sweep.py. [default: RUN_DIR/sweep.json or beside RUN_DIR]")
@click.option("--serve", is_flag=True, help="Also serve the page on 127.0.0.1 until interrupted.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="Port for --serve (0: any free port).")
def dashboard(run_dir: Path, sweep: Path | None, serve: bool, port: int) -> None:
    """Write RUN_DIR/dashboard.html: one self-contained page about a finished run."""
    from mpc_rec.dashboard import serve_page, write_dashboard

    try:
        page = write_dashboard(run_dir, sweep)
        click.echo(f"dashboard: {page}")
        if serve:
            serve_page(page, port, announce=lambda url: click.echo(f"serving {url} (localhost only; Ctrl-C to stop)"))
    except MpcRecError as exc:
        _fail(exc)
@main.command(epilog="Exit codes: 0 every check passed, 4 the audit found a weakness, 1 internal error, "
                     "2 bad input or config, 3 a party failed.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Report folder: report.md, audit.json, PNG plots, and the runs with their transcripts.")
@click.option("--data", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Ratings file (as for `run`). Default: the embedded synthetic data set.")
@click.option("--parties", type=click.IntRange(2, 8), default=3, show_default=True, help="Number of compute parties.")
@click.option("--weaken", type=click.Choice(["tfp", "no-dp"]), multiple=True, help="Audit a deliberately weakened configuration: tfp (INSECURE dealer), no-dp. Repeatable.")
@click.option("--epochs", type=click.IntRange(min=1), default=3, show_default=True, help="Training epochs of each captured run.")
@click.option("--factors", type=click.IntRange(min=1), default=16, show_default=True, help="Latent factors K.")
@click.option("--top-k", type=click.IntRange(min=0), default=10, show_default=True, help="Recommendations per user in the captured runs (0: none).")
@click.option("--epsilon", type=click.FloatRange(0, min_open=True), default=4.0, show_default=True, help="DP budget of the audited configuration.")
@click.option("--mia-epsilons", default="1,8", show_default=True, help="Comma-separated epsilons for the membership-inference comparison (no DP is always added).")
@click.option("--mia-trials", type=click.IntRange(min=10), default=200, show_default=True, help="Measured runs per world (as many again calibrate the attack).")
@click.option("--mia-epochs", type=click.IntRange(min=1), default=None, help="Training steps of each simulated run. [default: --epochs]")
@click.option("--timeout", "timeout_s", type=click.FloatRange(1, 3600), default=120.0, show_default=True, help="Seconds a party waits for a peer.")
def audit(**options: Any) -> None:
    """Security audit: captured real runs, view statistics, attacks, a verdict.

    Runs the configuration twice on two inputs of the same shape with every party's
    received messages recorded, then tests the views (uniformity, independence, a
    trained distinguisher), attacks them (reconstruction from one party's transcript
    and its own triple draws), searches every transcript, log and output for plaintext,
    and measures membership inference against the released model with and without DP.
    Writes OUT/report.md, OUT/audit.json and PNG plots; exits 4 when a check fails.
    """
    try:
        try:
            epsilons = tuple(float(e) for e in options["mia_epsilons"].split(",") if e.strip())
        except ValueError:
            raise InputError(f"--mia-epsilons: expected numbers separated by commas, got {options['mia_epsilons']!r}") from None
        if any(not (e > 0 and e < 100) for e in epsilons):
            raise InputError("--mia-epsilons: every epsilon must be in (0, 100)")
        from mpc_rec.audit.report import verdict_table
        from mpc_rec.audit.runner import AuditOptions, run_audit
        from mpc_rec.model import TrainConfig

        report = run_audit(AuditOptions(
            out=options["out"], data=options["data"], parties=options["parties"], weaken=tuple(options["weaken"]),
            train=TrainConfig(epochs=options["epochs"], factors=options["factors"]), top_k=options["top_k"],
            epsilon=options["epsilon"], mia_epsilons=epsilons, mia_trials=options["mia_trials"],
            mia_epochs=options["mia_epochs"], timeout_s=options["timeout_s"],
        ), note=lambda message: click.echo(f"audit: {message}", err=True))
    except MpcRecError as exc:
        _fail(exc)
    click.echo(verdict_table(report))
    click.echo(f"audit: {'PASS' if report['passed'] else 'FAIL'}; report in {options['out'] / 'report.md'}")
    sys.exit(0 if report["passed"] else 4)


@main.command(epilog=EXIT_CODES)
@click.option("--release", "release_path", required=True, type=click.Path(dir_okay=False, path_type=Path), help="The released item model (items.npz).")
@click.option("--holder", required=True, type=click.Path(file_okay=False, path_type=Path), help="The holder's folder: ratings.csv, controls.json, cohorts.csv, serving.toml (protocols/serving.md).")
@click.option("--user", required=True, help="The user asking.")
@click.option("--k", type=click.IntRange(min=1), default=10, show_default=True, help="Items to recommend.")
@click.option("--explain", is_flag=True, help="For each item: the score and the user's own rated items that drove it.")
@click.option("--index", "index_kind", type=click.Choice(["exact", "hnsw"]), default="exact", show_default=True, help="Local search: exact (numpy) or HNSW (needs faiss-cpu; pays only for very large catalogues, see scripts/bench_serving.py).")
@click.option("--precision", type=click.Choice(["int8", "float16", "float64"]), default="int8", show_default=True, help="How the holder stores its users' vectors.")
@click.option("--refine", "refine_dir", type=click.Path(file_okay=False, path_type=Path), default=None, help="Run folder of a joint run with --save-shares: re-rank the local candidates in MPC with the shared model (needs allow_refine = true in the holder's serving.toml).")
@click.option("--candidates", type=click.IntRange(min=1), default=50, show_default=True, help="Local candidates sent (secret-shared) to the refinement.")
@click.option("--popularity", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Cold-start release (mpc-rec cold-start) for users with no history or forgotten.")
@click.option("--cohort", default=None, help="A new user's cohort, when the holder's cohorts.csv does not list the user.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
def recommend(release_path: Path, holder: Path, user: str, k: int, explain: bool, index_kind: str, precision: str,
              refine_dir: Path | None, candidates: int, popularity: Path | None, cohort: str | None, as_json: bool) -> None:
    """Top-k for one of a holder's users, computed on the holder's side (optionally refined in MPC)."""
    from mpc_rec.serving.local import Query, format_result, recommend as recommend_for

    try:
        result = recommend_for(release_path, holder, Query(
            user=user, k=k, explain=explain, index=index_kind, precision=precision, cohort=cohort,
            popularity=popularity, refine=refine_dir, candidates=candidates), note=lambda m: click.echo(m, err=True))
    except MpcRecError as exc:
        _fail(exc)
    click.echo(json.dumps(result) if as_json else format_result(result))


@main.command(epilog=EXIT_CODES)
@click.option("--holder", required=True, type=click.Path(file_okay=False, path_type=Path), help="The holder's folder (controls.json is written there).")
@click.option("--exclude", nargs=2, multiple=True, metavar="USER ITEM", help="Keep ITEM out of USER's profile and lists (e.g. a gift). Repeatable.")
@click.option("--include", nargs=2, multiple=True, metavar="USER ITEM", help="Undo an exclusion. Repeatable.")
@click.option("--forget", multiple=True, metavar="USER", help="Delete USER's history from training and serving; cold start only from now on. Repeatable.")
def controls(holder: Path, exclude: tuple, include: tuple, forget: tuple) -> None:
    """Record users' wishes in the holder's controls.json (applied before every round and every answer)."""
    from mpc_rec.serving.local import update_controls

    try:
        summary = update_controls(holder, exclude=exclude, include=include, forget=forget)
    except MpcRecError as exc:
        _fail(exc)
    click.echo(summary)


@main.command("cold-start", epilog=EXIT_CODES)
@click.option("--data", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Ratings of all parties' users (dealt to --parties simulated parties; each sees only its own).")
@click.option("--cohorts", "cohorts_path", required=True, type=click.Path(dir_okay=False, path_type=Path), help="CSV 'user,cohort': every user's coarse public cohort.")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="The noised popularity release to write (.npz).")
@click.option("--parties", type=click.IntRange(2, 8), default=2, show_default=True, help="Compute parties.")
@click.option("--epsilon", type=click.FloatRange(0, min_open=True), default=1.0, show_default=True, help="User-level epsilon of the release.")
@click.option("--delta", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=1e-5, show_default=True, help="DP delta of the release.")
@click.option("--max-items", type=click.IntRange(min=1), default=20, show_default=True, help="Liked items counted per user at most (bounds each user's contribution).")
@click.option("--like", type=float, default=4.0, show_default=True, help="A rating at or above this counts as liked.")
@click.option("--dp-trust", type=click.IntRange(min=1), default=1, show_default=True, help="Parties assumed honest; their noise alone carries the guarantee.")
@click.option("--ledger-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("mpc-rec-ledger"), show_default=True, help="Privacy budget ledgers, one file per party.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed for dealing users to parties.")
def cold_start(data: Path, cohorts_path: Path, out: Path, parties: int, epsilon: float, delta: float, max_items: int,
               like: float, dp_trust: int, ledger_dir: Path, seed: int) -> None:
    """Noisy per-cohort popularity computed in MPC (for users with no history); only the noised counts are opened."""
    from mpc_rec.serving.cold_start import build_from_files

    try:
        if dp_trust > parties:
            raise InputError(f"--dp-trust must be between 1 and --parties ({parties})")
        record = build_from_files(data, cohorts_path, out, parties=parties, epsilon=epsilon, delta=delta,
                                  max_items=max_items, like=like, trusted_parties=dp_trust, ledger_dir=ledger_dir, seed=seed)
    except MpcRecError as exc:
        _fail(exc)
    click.echo(record)
