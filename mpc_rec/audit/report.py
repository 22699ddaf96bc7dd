"""The audit's outputs: audit.json (every figure), report.md (verdicts, tables), PNG plots."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from mpc_rec.audit.membership import dp_advantage_bound
from mpc_rec.files import write_text_atomic


def write_report(out: Path, report: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    figures = _plots(out, report)
    slim = json.loads(json.dumps(report, default=_jsonable))
    for record in slim["membership"]:
        record.pop("scores_in"), record.pop("scores_out")
    for check in slim["views"]:
        check.pop("byte_histogram")
    write_text_atomic(out / "audit.json", json.dumps(slim, indent=2) + "\n")
    write_text_atomic(out / "report.md", markdown(report, figures))


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def verdict_table(report: dict[str, Any]) -> str:
    lines = ["| check | verdict | evidence |", "|---|---|---|"]
    for row in report["verdicts"]:
        lines.append(f"| {row['check']} | {'PASS' if row['passed'] else '**FAIL**'} | {row['detail']} |")
    return "\n".join(lines)


def markdown(report: dict[str, Any], figures: dict[str, str]) -> str:
    config = report["configuration"]
    privacy = report["runs"]["a"]["privacy"]
    weakened = config["weakened"]
    lines = [
        "# mpc-rec security audit",
        "",
        f"**Overall: {'PASS' if report['passed'] else 'FAIL'}** "
        f"({sum(not v['passed'] for v in report['verdicts'])} of {len(report['verdicts'])} checks failed)",
        "",
        f"- Data: {config['data']}; {config['parties']} parties; {config['train']['epochs']} epochs, "
        f"K = {config['train']['factors']}, top-k {config['top_k']}.",
        f"- Dealer: {report['runs']['a']['dealer']}; privacy: "
        + (f"({privacy['epsilon']:.3g}, {privacy['delta']:.0e})-DP, user level" if privacy.get("mode") == "dp" else "none (no DP)"),
        "- Weakened on purpose: " + ("; ".join(weakened) if weakened else "nothing (the secure configuration)"),
        f"- Two real runs (inputs A and B of the same shape: B gives every user another user's ratings, "
        f"mirrored on the scale), every received message recorded on the receiving side; "
        f"audit time {report['audit_s']:.0f} s.",
        "",
        "## Verdicts",
        "",
        verdict_table(report),
        "",
        "## Party views",
        "",
        "Masked messages are all received messages except the agreement (public digests) and the",
        "declared reveals. Ring values should be uniform on Z_2^64; opened comparison bits (B2A)",
        "uniform on {0, 1}. Thresholds: p >= 1e-4 / parties.",
        "",
        "| party | masked messages | ring values | bits | byte p | bit p | small values (expected) | serial p | input corr. p | distinguisher acc. [99% CI] | unmasked p |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in report["views"]:
        d = c["distinguisher"]
        lines.append(
            f"| {c['rank']} | {c['messages']} | {c['ring_values']:,} | {c['bit_values']:,} | {c['byte_p']:.3g} | {c['bit_p']:.3g} | "
            f"{c['low_magnitude']} ({c['low_magnitude_expected']:.2g}) | {c['serial_p']:.3g} | {c['input_correlation_p']:.3g} | "
            f"{d['accuracy']:.3f} [{d['low']:.3f}, {d['high']:.3f}] (n = {d['test_samples']}) | {c['unmasked_p']:.3g} |")
    lines += [
        "",
        "The distinguisher is a logistic regression on per-chunk features (64 bit frequencies, a",
        "top-nibble histogram, mean/spread of the signed values; 64 values a chunk) trained on half",
        "of the chunks of views A and B and tested on the other half. 'Unmasked' adds to each Beaver",
        "opening what the party itself drew for that triple (TFP party 0: the whole mask).",
        "",
        f"![byte values]({figures['bytes']})  ![distinguisher]({figures['distinguisher']})",
        "",
        "## Reconstruction attack (one party's transcript and own draws)",
        "",
        "| attacker | found a 0/1 mask opening | others' mask recovered | others' ratings recovered |",
        "|---|---|---|---|",
    ]
    for r in report["reconstruction"]:
        lines.append(f"| party {r['attacker']} | {'yes' if r['found_mask'] else 'no'} | {r['mask_accuracy']:.1%} | {r['rating_accuracy']:.1%} |")
    leak = report["leakage"]
    lines += [
        "",
        "## Plaintext search",
        "",
        f"Searched {leak['messages']:,} received messages and {leak['files']} files (each party's log and output",
        "folder) for: other parties' rating rows and user ids; un-noised aggregates computed by the",
        "auditor from the data (" + "; ".join(leak["aggregates"]) + "); scalars "
        + ", ".join(f"{k} = {v:.6g}" for k, v in leak["scalars"].items()) + ".",
        "Scalars whose release is noised enough that an exact match is meaningful: "
        + (", ".join(leak["scalars_checked_in_files"]) or "none") + ".",
        "",
    ]
    lines += [f"- **{f['what']}** in {f['where']}" for f in leak["findings"]] or ["Nothing found."]
    lines += [
        "",
        "## Membership inference against what is released",
        "",
        "A canary user rates the least-rated items with the top rating (IN) or nothing (OUT, the",
        "replace-one neighbour). The attacker sees the trained item side (Q, c) — not released by",
        "mpc-rec, but every output shown to other parties' users is computed from it, so its",
        "advantage bounds theirs — or the top-k lists of all other users. A second game puts a",
        "canary's 10 held-out ratings (each off by the whole rating range) IN or OUT of the test",
        "set and attacks the released test MSE (model held fixed). Advantage = TPR - FPR on",
        "runs not used to fit the attack, 95% CI. Bound for (epsilon, delta)-DP:",
        "(e^eps - 1 + 2 delta) / (e^eps + 1) (the hypothesis-testing region of (eps, delta)-DP).",
        "The runs are the plaintext mechanism with the plan's noise (see `mpc_rec/audit/membership.py`);",
        f"{report['membership'][0]['epochs']} training steps each, {report['membership'][0]['trials']} measured runs per world.",
        "",
        "| epsilon | target | advantage [95% CI] | bound | within bound |",
        "|---|---|---|---|---|",
    ]
    for m in report["membership"]:
        eps = "none (no DP)" if m["epsilon"] is None else f"{m['epsilon']:.3g}"
        bound = "-" if m["bound"] is None else f"{m['bound']:.4f}"
        within = "no bound" if m["bound"] is None else ("yes" if m["low"] <= m["bound"] else "**no**")
        lines.append(f"| {eps}{' (audited)' if m['audited'] else ''} | {m['target']} | {m['advantage']:.3f} "
                     f"[{m['low']:.3f}, {m['high']:.3f}] | {bound} | {within} |")
    lines += ["", f"![membership inference]({figures['membership']})", ""]
    return "\n".join(lines)


def _plots(out: Path, report: dict[str, Any]) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = {"bytes": "bytes.png", "distinguisher": "distinguisher.png", "membership": "membership.png"}
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for c in report["views"]:
        histogram = np.asarray(c["byte_histogram"], dtype=float)
        if histogram.sum():
            ax.plot(histogram / histogram.sum() * 256, lw=0.8, label=f"party {c['rank']}")
    ax.axhline(1.0, color="k", ls="--", lw=0.8, label="uniform")
    ax.set(xlabel="byte value", ylabel="frequency / uniform", title="Bytes of masked ring values (input A)")
    ax.legend(fontsize=7)
    fig.tight_layout(), fig.savefig(out / figures["bytes"], dpi=110), plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.2))
    for c in report["views"]:
        d = c["distinguisher"]
        ax.errorbar([c["rank"]], [d["accuracy"]], yerr=[[d["accuracy"] - d["low"]], [d["high"] - d["accuracy"]]], fmt="o", capsize=4)
    ax.axhline(0.5, color="k", ls="--", lw=0.8)
    ax.set(xlabel="party", ylabel="held-out accuracy", title="Distinguisher A vs B (99% CI)", ylim=(0.3, 1.02))
    ax.set_xticks([c["rank"] for c in report["views"]])
    fig.tight_layout(), fig.savefig(out / figures["distinguisher"], dpi=110), plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.6))
    with_dp = [m for m in report["membership"] if m["epsilon"] is not None]
    eps_grid = np.logspace(-1, math.log10(max([m["epsilon"] for m in with_dp] + [10]) * 1.5), 100)
    delta = with_dp[0]["delta"] if with_dp else 1e-5
    ax.plot(eps_grid, [dp_advantage_bound(e, delta) for e in eps_grid], "k-", lw=1, label="(eps, delta) bound")
    targets = (("item side (Q, c)", "o", "C0"), ("top-k of other users", "s", "C1"), ("released test MSE", "^", "C2"))
    for shift, (target, marker, colour) in enumerate(targets):
        points = [m for m in with_dp if m["target"] == target]
        if points:
            ax.errorbar([m["epsilon"] * 1.06**shift for m in points], [m["advantage"] for m in points],
                        yerr=[[m["advantage"] - m["low"] for m in points], [m["high"] - m["advantage"] for m in points]],
                        fmt=marker, color=colour, capsize=3, label=target)
        for m in report["membership"]:
            if m["epsilon"] is None and m["target"] == target:
                ax.axhline(m["advantage"] + 0.01 * shift, ls=":", lw=1, color=colour, label=f"no DP, {target}")
    ax.set_xscale("log")
    ax.set(xlabel="epsilon", ylabel="advantage (TPR - FPR)", title="Membership inference", ylim=(-0.1, 1.05))
    ax.legend(fontsize=7)
    fig.tight_layout(), fig.savefig(out / figures["membership"], dpi=110), plt.close(fig)
    return figures
