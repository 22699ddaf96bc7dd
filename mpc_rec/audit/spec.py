"""Message tables: what a real run sends, per protocol phase, against protocols/*.md.

Each protocol file holds one fenced block per protocol, tagged ``messages``:

    ```messages
    config parties=2 dealer=ttp dp=on epochs=2 top_k=3 n=23 I=17 K=5
    # rank  phase              op          peer    shape    count
    *       training-epoch-1   all_reduce  all     [n,K]    5
    ```

One line per (receiving rank, phase, operation, peer, shape) with the number of such
messages the rank receives in that phase; rank ``*`` means every compute rank alike.
Shapes are expressions in n (users), I (items), K (factors), k (top-k), n0, n1, ...
(rows per party) and integers. Phases ``training-epoch-2+`` hold for every epoch after
the first. A phase listed with the single line ``<phase> none`` receives nothing.
``scripts/message_specs.py`` regenerates the blocks from a real run.
"""

from __future__ import annotations

import ast
import re
from collections import Counter
from pathlib import Path
from typing import Any

from mpc_rec.audit.transcript import Transcript
from mpc_rec.errors import InputError

BLOCK = re.compile(r"```messages\n(.*?)```", re.S)
PROTOCOL_PHASES = {
    "setup.md": ("agreement",),
    "input-sharing.md": ("input-sharing",),
    "training.md": ("training-setup", "training-epoch-1", "training-epoch-2+"),
    "scoring.md": ("evaluation", "evaluation-reveal", "top-k", "top-k-reveal"),
}
Key = tuple[str, str, str, str, tuple[int, ...]]  # rank, phase, op, peer, shape


def spec_phase(phase: str) -> str:
    match = re.fullmatch(r"training-epoch-(\d+)", phase)
    return phase if match is None or match.group(1) == "1" else "training-epoch-2+"


def observed_table(transcripts: list[Transcript], world_size: int) -> dict[str, list[Counter]]:
    """phase -> one Counter per occurrence (every later epoch separately) of (rank, op, peer, shape)."""
    table: dict[str, dict[str, Counter]] = {}
    for transcript in transcripts:
        for record in transcript.records:
            if record["kind"] == "local-triple":
                continue
            phase = spec_phase(record["phase"])
            counter = table.setdefault(phase, {}).setdefault(record["phase"], Counter())
            shape = tuple(record.get("shape", ())) if record["kind"] == "message" else ("obj",)
            counter[(str(transcript.rank), record["op"], _peer_name(record["peer"], world_size), shape)] += 1
    return {phase: list(occurrences.values()) for phase, occurrences in table.items()}


def _peer_name(peer: Any, world_size: int) -> str:
    if peer == "all":
        return "all"
    return "dealer" if peer == world_size else f"party{peer}"


def parse_blocks(text: str) -> list[tuple[dict[str, str], list[tuple[str, str, str, str, str, int]]]]:
    """Every ``messages`` block: (config settings, [(rank, phase, op, peer, shape, count)])."""
    blocks = []
    for body in BLOCK.findall(text):
        config: dict[str, str] = {}
        lines = []
        for number, line in enumerate(body.splitlines(), start=1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            words = line.split()
            if words[0] == "config":
                config.update(word.split("=", 1) for word in words[1:])
            elif len(words) == 2 and words[1] == "none":
                lines.append(("*", words[0], "none", "", "", 0))
            elif len(words) == 6:
                lines.append((words[0], words[1], words[2], words[3], words[4], int(words[5])))
            else:
                raise InputError(f"messages block line {number}: expected 'rank phase op peer shape count', got {line!r}")
        blocks.append((config, lines))
    return blocks


def evaluate_shape(shape: str, symbols: dict[str, int]) -> tuple:
    if shape == "obj":
        return ("obj",)
    tree = ast.parse(shape, mode="eval").body
    if not isinstance(tree, ast.List):
        raise InputError(f"shape {shape!r} must be a list like [n,K]")
    return tuple(_evaluate(element, symbols) for element in tree.elts)


def _evaluate(node: ast.AST, symbols: dict[str, int]) -> int:
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
        return node.value
    if isinstance(node, ast.Name) and node.id in symbols:
        return symbols[node.id]
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.FloorDiv)):
        left, right = _evaluate(node.left, symbols), _evaluate(node.right, symbols)
        return {ast.Add: left + right, ast.Sub: left - right, ast.Mult: left * right}.get(type(node.op), left // right if right else 0)
    raise InputError(f"unsupported shape expression {ast.unparse(node)!r}")


def expected_table(lines: list, symbols: dict[str, int], world_size: int) -> dict[str, Counter]:
    table: dict[str, Counter] = {}
    for rank, phase, op, peer, shape, count in lines:
        counter = table.setdefault(phase, Counter())
        if op == "none":
            continue
        ranks = [str(r) for r in range(world_size)] if rank == "*" else [rank]
        for r in ranks:
            counter[(r, op, peer, evaluate_shape(shape, symbols))] += count
    return table


def compare(observed: dict[str, list[Counter]], expected: dict[str, Counter], phases: tuple[str, ...]) -> list[str]:
    """Differences for the given phases, as readable lines (empty: the run matches the spec)."""
    problems = []
    for phase in phases:
        want = expected.get(phase)
        if want is None:
            problems.append(f"{phase}: no entry in the spec")
            continue
        for occurrence in observed.get(phase, [Counter()]):
            for key in sorted(set(want) | set(occurrence), key=str):
                if want[key] != occurrence[key]:
                    rank, op, peer, shape = key
                    problems.append(f"{phase}: rank {rank} {op} from {peer} shape {list(shape)}: "
                                    f"spec {want[key]}, run {occurrence[key]}")
    return problems


def symbols_for(rows_per_party: list[int], n_items: int, factors: int, top_k: int) -> dict[str, int]:
    symbols = {"n": sum(rows_per_party), "I": n_items, "K": factors, "k": top_k}
    symbols.update({f"n{p}": rows for p, rows in enumerate(rows_per_party)})
    return symbols


def render_block(observed: dict[str, list[Counter]], phases: tuple[str, ...], symbols: dict[str, int],
                 config: str, world_size: int) -> str:
    """A ``messages`` block for the given phases, from a run (first occurrence of each phase)."""
    lines = [f"config {config}", "# rank  phase  op  peer  shape  count"]
    for phase in phases:
        occurrence = observed.get(phase, [Counter()])[0]
        if not occurrence:
            lines.append(f"{phase} none")
            continue
        grouped: dict[tuple, dict[str, int]] = {}
        for (rank, op, peer, shape), count in occurrence.items():
            grouped.setdefault((op, peer, shape), {})[rank] = count
        for (op, peer, shape), by_rank in sorted(grouped.items(), key=lambda kv: (kv[0][0], kv[0][1], len(kv[0][2]), kv[0][2])):
            text = "obj" if shape == ("obj",) else "[" + ",".join(_symbol(d, symbols) for d in shape) + "]"
            if len(by_rank) == world_size and len(set(by_rank.values())) == 1:
                lines.append(f"*  {phase}  {op}  {peer}  {text}  {next(iter(by_rank.values()))}")
            else:
                lines += [f"{rank}  {phase}  {op}  {peer}  {text}  {count}" for rank, count in sorted(by_rank.items())]
    return "```messages\n" + "\n".join(lines) + "\n```"


def _symbol(value: int, symbols: dict[str, int]) -> str:
    for name in ("n", "I", "K", "k", *sorted(s for s in symbols if s[0] == "n" and s != "n")):
        if symbols.get(name) == value and value > 1:
            return name
    if value == symbols["K"] + 1:
        return "K+1"
    return str(value)


def replace_block(path: Path, block: str) -> None:
    """Replace the ``messages`` block of a protocol file (or append one at the end)."""
    from mpc_rec.files import write_text_atomic

    text = path.read_text(encoding="utf-8")
    if BLOCK.search(text):
        text = BLOCK.sub(lambda _: block, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n## Messages\n\nWhat each compute rank receives in the spec run, per phase (format: README.md;\nchecked by tests/test_audit.py; regenerate with scripts/message_specs.py --write).\n\n" + block + "\n"
    write_text_atomic(path, text)


# The run the blocks describe: small, every phase present, dimensions mostly distinct.
SPEC_RUN = {"parties": 2, "dealer": "ttp", "dp": "on", "epochs": 2, "top_k": 3, "factors": 5}


def spec_ratings():
    from mpc_rec.data import synthetic_ratings

    return synthetic_ratings(n_users=25, n_items=17, density=0.4, seed=5)


def spec_config_line(symbols: dict[str, int]) -> str:
    run = " ".join(f"{k}={v}" for k, v in SPEC_RUN.items() if k != "factors")
    return f"{run} n={symbols['n']} I={symbols['I']} K={symbols['K']}"


def check_protocol_files(protocols: Path, transcripts: list[Transcript], symbols: dict[str, int]) -> list[str]:
    """Every difference between the blocks in ``protocols/`` and the transcripts of a spec run."""
    observed = observed_table(transcripts, SPEC_RUN["parties"])
    problems = []
    for name, phases in PROTOCOL_PHASES.items():
        blocks = parse_blocks((protocols / name).read_text(encoding="utf-8"))
        if len(blocks) != 1:
            problems.append(f"{name}: expected one messages block, found {len(blocks)}")
            continue
        config, lines = blocks[0]
        want = dict(word.split("=", 1) for word in spec_config_line(symbols).split())
        if config != want:
            problems.append(f"{name}: block describes {config}, the spec run is {want}")
        problems += [f"{name}: {p}" for p in compare(observed, expected_table(lines, symbols, SPEC_RUN["parties"]), phases)]
    return problems


def render_protocol_blocks(transcripts: list[Transcript], symbols: dict[str, int]) -> dict[str, str]:
    observed = observed_table(transcripts, SPEC_RUN["parties"])
    return {name: render_block(observed, phases, symbols, spec_config_line(symbols), SPEC_RUN["parties"])
            for name, phases in PROTOCOL_PHASES.items()}
