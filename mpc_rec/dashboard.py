"""``mpc-rec dashboard RUN_DIR``: one self-contained HTML page about a finished run.

Every figure on the page is read from the run's own files (summary.json, each party's
party.json and explanations.json, a sweep.json beside the run) and printed through
``_figure``, which also records the exact value in ``data-value`` so tests can compare
the page with the files. Every string goes through ``html.escape``: item and user names
come from data files and are never trusted. No external assets: inline CSS, inline SVG
charts, a few lines of inline JS, and a Content-Security-Policy that forbids fetching
anything, so the page opens offline and cannot call out.
"""

from __future__ import annotations

import html
import json
import math
import re
from pathlib import Path
from typing import Any, Callable

from mpc_rec.errors import InputError
from mpc_rec.files import write_text_atomic

PROTOCOLS = Path(__file__).resolve().parents[1] / "protocols"
_CSP = "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:"


def e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _read_json(path: Path, required: bool = True) -> Any:
    if not path.exists():
        if required:
            raise InputError(f"{path}: not found (is this an mpc-rec run folder?)")
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"{path}: not readable JSON ({exc})") from None


def load_run(run_dir: Path, sweep: Path | None = None) -> dict[str, Any]:
    """The run's files: the summary, each party's own files, and a sweep if one is beside it."""
    summary = _read_json(run_dir / "summary.json")
    if not isinstance(summary, dict) or "metrics" not in summary or "parties" not in summary:
        raise InputError(f"{run_dir / 'summary.json'}: not an mpc-rec run summary")
    parties = {}
    for party in summary["parties"]:
        folder = run_dir / str(party["name"])
        parties[party["name"]] = {
            "party": _read_json(folder / "party.json", required=False),
            "explanations": _read_json(folder / "explanations.json", required=False),
        }
    if sweep is None:
        sweep = next((p for p in (run_dir / "sweep.json", run_dir.parent / "sweep.json") if p.exists()), None)
    return {"summary": summary, "parties": parties, "sweep": None if sweep is None else _read_json(sweep),
            "sweep_path": None if sweep is None else str(sweep)}


def _figure(key: str, value: Any, text: str | None = None) -> str:
    """A number from the run files: shown formatted, its exact value kept in data-value."""
    if value is None:
        return f'<span class="fig" data-key="{e(key)}" data-value="null">n/a</span>'
    shown = text if text is not None else format_value(value)
    return f'<span class="fig" data-key="{e(key)}" data-value="{e(repr(value))}">{e(shown)}</span>'


def format_value(value: Any) -> str:
    """How the page prints numbers (tests compare the page with this)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
        return f"{value:.3e}"
    return f"{value:.4g}" if abs(value) >= 1 else f"{value:.4f}"


def format_bytes(value: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= size:
            return f"{value / size:.2f} {unit}"
    return f"{value:.0f} B"


# --- charts (inline SVG) -------------------------------------------------------------


def _bars(title: str, rows: list[tuple[str, float]], fmt: Callable[[float], str], color: str = "#3b6ea5") -> str:
    width, bar_h, label_w = 520, 22, 150
    top = max((v for _, v in rows if v is not None), default=0) or 1
    parts = [f'<svg class="chart" role="img" aria-label="{e(title)}" width="{width}" height="{len(rows) * (bar_h + 8) + 10}">']
    for i, (label, value) in enumerate(rows):
        y = 5 + i * (bar_h + 8)
        length = 0 if value is None else (width - label_w - 90) * value / top
        parts.append(f'<text x="0" y="{y + 16}">{e(label)}</text>'
                     f'<rect x="{label_w}" y="{y}" width="{length:.1f}" height="{bar_h}" fill="{color}"/>'
                     f'<text x="{label_w + length + 6:.1f}" y="{y + 16}">{e(fmt(value) if value is not None else "n/a")}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _sweep_key(point: dict[str, Any]) -> str:
    """The exact RMSE of each DP model; sweeps written before it was measured have only the noised release."""
    return "rmse_exact" if "rmse_exact" in point else "rmse_secure"


def _sweep_chart(sweep: dict[str, Any], current_epsilon: float | None) -> str:
    points = [p for p in sweep.get("points", []) if p.get(_sweep_key(p)) is not None]
    if not points:
        return "<p>The sweep file has no points.</p>"
    w, h, pad = 560, 300, 50
    xs = [math.log2(p["epsilon"]) for p in points]
    lines = [v for v in (sweep.get("rmse_secure_no_dp"), sweep.get("rmse_plaintext_no_dp")) if v is not None]
    ys = [p[_sweep_key(p)] for p in points] + lines
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    # a noised metric at small epsilon can be orders of magnitude off: then a log axis
    scale = math.log10 if min(ys) > 0 and max(ys) / min(ys) > 5 else (lambda v: v)
    y0, y1 = scale(min(ys)) - 0.02 * abs(scale(min(ys))), scale(max(ys)) + 0.02 * abs(scale(max(ys)))
    sx = lambda x: pad + (w - 2 * pad) * (x - x0) / (x1 - x0)  # noqa: E731
    sy = lambda y: h - pad - (h - 2 * pad) * (scale(y) - y0) / ((y1 - y0) or 1)  # noqa: E731
    out = [f'<svg class="chart" role="img" aria-label="test RMSE against epsilon" width="{w}" height="{h}">',
           f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="#444"/>',
           f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" stroke="#444"/>',
           f'<text x="{w / 2 - 60}" y="{h - 12}">epsilon (log scale)</text>',
           f'<text x="4" y="{pad - 12}">test RMSE{" (log scale)" if scale is math.log10 else ""}</text>']
    for label, value, dash, x in (("secure, no DP", sweep.get("rmse_secure_no_dp"), "2,3", pad + 6),
                                  ("plaintext, no DP", sweep.get("rmse_plaintext_no_dp"), "6,4", w / 2 + 10)):
        if value is not None:  # labels side by side: the two lines are often within a pixel
            out.append(f'<line x1="{pad}" x2="{w - pad}" y1="{sy(value):.1f}" y2="{sy(value):.1f}" stroke="#888" '
                       f'stroke-dasharray="{dash}"/><text x="{x:.0f}" y="{sy(value) - 4:.1f}">{e(label)} '
                       f'{e(format_value(value))}</text>')
    for tick in (min(ys), max(ys)):
        out.append(f'<text x="2" y="{sy(tick) + 4:.1f}">{e(format_value(tick))}</text>')
    path = " ".join(f"{sx(x):.1f},{sy(p[_sweep_key(p)]):.1f}" for x, p in zip(xs, points))
    out.append(f'<polyline points="{path}" fill="none" stroke="#3b6ea5" stroke-width="2"/>')
    for x, p in zip(xs, points):
        here = current_epsilon is not None and math.isclose(p["epsilon"], current_epsilon, rel_tol=1e-9)
        out.append(f'<circle cx="{sx(x):.1f}" cy="{sy(p[_sweep_key(p)]):.1f}" r="{6 if here else 4}" '
                   f'fill="{"#c0392b" if here else "#3b6ea5"}"/>'
                   f'<text x="{sx(x) - 10:.1f}" y="{h - pad + 16}">{e(format_value(p["epsilon"]))}</text>')
    out.append("</svg>")
    return "".join(out)


# --- sections ------------------------------------------------------------------------


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _parties_section(s: dict[str, Any]) -> str:
    rows = [[e(p["name"]), "compute party (holds its users' ratings)", _figure(f"parties.{i}.rank", p["rank"]),
             _figure(f"parties.{i}.users", p["users"])] for i, p in enumerate(s["parties"])]
    dealer = s.get("dealer")
    if dealer == "ttp":
        rows.append(["dealer", "TTP dealer: Beaver triples only, holds no data", "", ""])
    else:
        rows.append(["party-0 as dealer", "<strong>INSECURE</strong>: party 0 generated every Beaver triple", "", ""])
    return (_table(["party", "role", "rank", "users"], rows)
            + f'<p class="note">Security: {e(s.get("security", ""))}</p>')


def _spec_paragraphs() -> list[tuple[str, str]]:
    """The 'Learned...' paragraphs of the protocol specifications, quoted as written."""
    found = []
    if not PROTOCOLS.is_dir():
        return found
    for spec in sorted(PROTOCOLS.glob("*.md")):
        for paragraph in re.split(r"\n\s*\n", spec.read_text(encoding="utf-8")):
            lines = [line for line in paragraph.splitlines() if not line.startswith("#")]  # drop headings
            text = " ".join(" ".join(lines).split())
            if text.startswith(("Learned", "D learns")):
                found.append((spec.name, text))
    return found


def _learned_section(s: dict[str, Any]) -> str:
    rows = []
    for i, entry in enumerate(s.get("reveals", [])):
        name = str(entry.get("value", ""))
        audience = re.search(r"\(([^)]*)\)\s*$", name)
        detail = entry.get("reason") or entry.get("aggregate") or ""
        rows.append([e(name), e(audience.group(1) if audience else "see spec"), e(entry.get("tag", "")), e(detail)])
    release = s.get("release")
    if release:
        rows.append([e(f"list shown to each user ({release['policy']} release)"), "the user, and whoever sees the list",
                     "release policy", e(release["mechanism"])])
    specs = _spec_paragraphs()
    quoted = "".join(f"<li><b>{e(name)}</b>: {e(text)}</li>" for name, text in specs) or \
        "<li>protocol specifications not found beside this installation</li>"
    return (_table(["value opened", "to whom", "tag", "why it may be opened"], rows)
            + f"<details open><summary>What the specifications say each party learns</summary><ul>{quoted}</ul></details>")


def _privacy_section(s: dict[str, Any], parties: dict[str, Any]) -> str:
    privacy = s["privacy"]
    out = []
    if privacy.get("mode") == "dp":
        out.append(f"<p>This run: ({_figure('privacy.epsilon', privacy['epsilon'])}, "
                   f"{_figure('privacy.delta', privacy['delta'])})-DP per user ({e(privacy.get('neighbouring', ''))}); "
                   f"{e(privacy.get('trust', ''))}.</p>")
    else:
        out.append('<p class="warn">No differential privacy in this run: outputs are exact (benchmarking only).</p>')
    budget = s.get("budget")
    if budget:
        rows = [[e(name), _figure(f"budget.ledgers.{name}.spent_epsilon", b["spent_epsilon"]),
                 _figure(f"budget.ledgers.{name}.left_epsilon", b["left_epsilon"]),
                 _figure(f"budget.ledgers.{name}.total_epsilon", b["total_epsilon"]),
                 _figure(f"budget.ledgers.{name}.runs", b["runs"]), e(b["digest"][:16])]
                for name, b in budget["ledgers"].items()]
        out.append(f"<h3>Data set {e(budget['dataset'][:16])}: budget per ledger ({e(budget['composition'])})</h3>"
                   + _table(["ledger", "epsilon spent", "epsilon left", "total", "runs", "digest"], rows))
        out.append(_bars("epsilon spent per ledger", [(n, b["spent_epsilon"]) for n, b in budget["ledgers"].items()],
                         format_value, "#c0392b"))
    release = s.get("release")
    if release:
        out.append(f"<h3>Release budget per user</h3><p>Policy {_figure('release.policy', release['policy'])}, "
                   f"epsilon per release {_figure('release.epsilon', release['epsilon'])}, budget per user "
                   f"{_figure('release.budget_per_user', release['budget_per_user'])}; {e(release['composition'])}.</p>")
        rows = []
        for name, record in release["parties"].items():
            counts = record["releases"]
            rows.append([e(name)] + [_figure(f"release.parties.{name}.releases.{k}", counts[k])
                                     for k in ("exact", "new", "repeated", "withheld")]
                        + [_figure(f"release.parties.{name}.per_user_overrides", record["per_user_overrides"])])
        out.append(_table(["party", "exact", "new draw", "last release again", "withheld", "own level chosen"], rows))
        for name, files in parties.items():
            users = ((files["party"] or {}).get("release") or {}).get("users") or {}
            if users:
                shown = list(users.items())[:12]
                rows = [[e(u), e(r["status"]), _figure(f"{name}.release.users.{u}.epsilon", r["epsilon"]),
                         _figure(f"{name}.release.users.{u}.spent", r["spent"]),
                         _figure(f"{name}.release.users.{u}.left", r["left"])] for u, r in shown]
                out.append(f"<details><summary>{e(name)}: its own users (first {len(shown)} of {len(users)})</summary>"
                           + _table(["user", "this run", "epsilon per release", "spent", "left"], rows) + "</details>")
    return "".join(out)


def _accuracy_section(s: dict[str, Any], sweep: dict[str, Any] | None, sweep_path: str | None) -> str:
    m = s["metrics"]
    dp = s["privacy"].get("mode") == "dp"
    rows = [["secure test RMSE" + (" (noised DP release)" if dp else ""), _figure("metrics.rmse_secure", m["rmse_secure"])],
            *([["exact RMSE of the DP model (revealed for benchmarking, NOT covered by DP)",
                _figure("metrics.rmse_exact_unprotected", m["rmse_exact_unprotected"])]]
              if "rmse_exact_unprotected" in m else []),
            ["plaintext reference RMSE (no DP)", _figure("metrics.rmse_plaintext", m["rmse_plaintext"])],
            ["difference", _figure("metrics.rmse_difference", m["rmse_difference"])],
            ["global-mean baseline RMSE", _figure("metrics.rmse_global_mean", m["rmse_global_mean"])],
            ["top-k agreement with plaintext", _figure("metrics.top_k_agreement", m.get("top_k_agreement"),
                                                        None if m.get("top_k_agreement") is None else f"{m['top_k_agreement']:.1%}")]]
    out = [_table(["measure", "value"], rows),
           _bars("test RMSE", [("secure", m["rmse_secure"]), ("plaintext", m["rmse_plaintext"]),
                               ("global mean", m["rmse_global_mean"])], format_value)]
    out.append("<h3>Privacy / utility</h3>")
    if sweep:
        current = s["privacy"].get("epsilon") if dp else None
        out.append(f'<p class="note">From {e(sweep_path)} (scripts/dp_sweep.py); red: this run\'s epsilon if it was swept.</p>'
                   + _sweep_chart(sweep, current)
                   + _table(["epsilon", "secure test RMSE"],
                            [[_figure(f"sweep.points.{i}.epsilon", p["epsilon"]),
                              _figure(f"sweep.points.{i}.{_sweep_key(p)}", p[_sweep_key(p)])]
                             for i, p in enumerate(sweep.get("points", []))]))
    else:
        out.append("<p>No sweep beside this run (run scripts/dp_sweep.py and open a run inside its folder, or pass --sweep).</p>")
    return "".join(out)


def _cost_section(s: dict[str, Any]) -> str:
    t = s["timing"]
    rows = [[label, _figure(f"timing.{key}", t.get(key))] for key, label in (
        ("secure_run_s", "secure run, s"), ("secure_setup_s", "set-up, s"), ("secure_epoch_s", "secure epoch, s"),
        ("plaintext_epoch_s", "plaintext epoch, s"), ("secure_over_plaintext", "secure / plaintext per epoch"),
        ("secure_scoring_s", "scoring, s"))]
    party_rows = [[e(p["name"]), _figure(f"parties.{i}.bytes_sent", p["bytes_sent"], format_bytes(p["bytes_sent"])),
                   _figure(f"parties.{i}.rounds", p["rounds"]),
                   _figure(f"parties.{i}.training_bytes_per_epoch", p["training_bytes_per_epoch"],
                           format_bytes(p["training_bytes_per_epoch"])),
                   _figure(f"parties.{i}.peak_memory_mb", p["peak_memory_mb"])] for i, p in enumerate(s["parties"])]
    return (_table(["timing", "value"], rows)
            + _table(["party", "bytes sent", "rounds", "training bytes / epoch", "peak memory, MB"], party_rows)
            + _bars("bytes sent per party", [(p["name"], p["bytes_sent"]) for p in s["parties"]], format_bytes)
            + f'<p class="note">Traffic {e(s.get("traffic_counted_by", ""))}.</p>')


def _why_section(parties: dict[str, Any]) -> str:
    out = []
    for name, files in parties.items():
        explained = files["explanations"]
        if not explained or not explained.get("users"):
            continue
        options = "".join(f'<option value="{i}">{e(u["user"])}</option>' for i, u in enumerate(explained["users"]))
        blocks = []
        for i, user in enumerate(explained["users"]):
            items = []
            for item in user["items"]:
                drivers = ", ".join(f'{e(d["item"])} (rated {e(format_value(d["rating"]))}, score '
                                    f'{e(format_value(d["score"]))})' for d in item["drivers"]) or \
                    "no liked item of this user co-occurs with it at this party"
                items.append(f"<li><b>{e(item['item'])}</b>: {drivers}</li>")
            hidden = "" if i == 0 else " hidden"
            blocks.append(f'<ul class="why-user" data-index="{i}"{hidden}>{"".join(items)}</ul>')
        out.append(f'<div class="why" data-party="{e(name)}"><h3>{e(name)}: its own users only '
                   f'({len(explained["users"])} of {e(explained.get("users_total", "?"))} shown)</h3>'
                   f'<label>user <select class="why-select">{options}</select></label>{"".join(blocks)}'
                   f'<p class="note">Method: {e(explained.get("method", ""))}</p></div>')
    if not out:
        return "<p>No party folder of this run has explanations.json (a run with --top-k 0 makes none).</p>"
    return "".join(out)


_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:0;color:#222;background:#f6f7f9}
header{background:#1f3b57;color:#fff;padding:14px 24px}header h1{margin:0;font-size:22px}
main{display:grid;grid-template-columns:repeat(auto-fit,minmax(560px,1fr));gap:16px;padding:16px}
section{background:#fff;border-radius:8px;padding:12px 18px;box-shadow:0 1px 3px rgba(0,0,0,.12)}
h2{font-size:17px;margin:4px 0 10px}h3{font-size:14px;margin:12px 0 6px}
table{border-collapse:collapse;font-size:13px;margin:6px 0}td,th{border-bottom:1px solid #e3e3e3;padding:3px 10px;text-align:left}
.fig{font-variant-numeric:tabular-nums;font-weight:600}.note{color:#555;font-size:12px}
.warn{color:#a0281c;font-weight:600}svg.chart{font-size:12px;display:block;margin:8px 0}
"""

_SCRIPT = """
document.querySelectorAll('.why').forEach(function (box) {
  var select = box.querySelector('.why-select');
  select.addEventListener('change', function () {
    box.querySelectorAll('.why-user').forEach(function (list) {
      list.hidden = list.getAttribute('data-index') !== select.value;
    });
  });
});
document.body.setAttribute('data-ready', String(document.querySelectorAll('.fig').length));
"""


def render(run: dict[str, Any]) -> str:
    s = run["summary"]
    privacy = s["privacy"]
    badge = (f"({format_value(privacy['epsilon'])}, {privacy['delta']:g})-DP" if privacy.get("mode") == "dp"
             else "NO DP (benchmarking)")
    sections = [
        ("Parties and roles", _parties_section(s)),
        ("What each party learned", _learned_section(s)),
        ("Privacy budget", _privacy_section(s, run["parties"])),
        ("Accuracy against the plaintext reference", _accuracy_section(s, run["sweep"], run["sweep_path"])),
        ("Time and traffic per party", _cost_section(s)),
        ("Why an item was recommended", _why_section(run["parties"])),
    ]
    body = "".join(f'<section id="s{i}"><h2>{e(title)}</h2>{content}</section>' for i, (title, content) in enumerate(sections))
    data = s.get("data", {})
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>mpc-rec run dashboard</title><style>{_STYLE}</style></head><body>"
        f"<header><h1>mpc-rec run: {len(s['parties'])} parties, {e(badge)}</h1>"
        f"<div>{_figure('data.users', data.get('users'))} users &times; {_figure('data.items', data.get('items'))} items; "
        f"mpc-rec {e(s.get('mpc_rec_version', '?'))}; data {e(s.get('config', {}).get('data', '?'))}</div></header>"
        f"<main>{body}</main><script>{_SCRIPT}</script></body></html>\n"
    )


def write_dashboard(run_dir: Path, sweep: Path | None = None) -> Path:
    run = load_run(Path(run_dir), sweep)
    page = Path(run_dir) / "dashboard.html"
    write_text_atomic(page, render(run))
    return page


def serve_page(page: Path, port: int, announce: Callable[[str], None]) -> None:
    """Serve the one page on 127.0.0.1 (never on other interfaces) until interrupted."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    content = page.read_bytes()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            if self.path not in ("/", "/dashboard.html"):
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(content)))
            self.end_headers()
            self.wfile.write(content)

        def log_message(self, *args: Any) -> None:
            return None

    try:
        server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    except OSError as exc:
        raise InputError(f"cannot serve on 127.0.0.1:{port} ({exc.strerror or exc})") from None
    announce(f"http://127.0.0.1:{server.server_address[1]}/")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
