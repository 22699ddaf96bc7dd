"""`mpc-rec audit`: passes on the secure configuration, fails on each weakened one.

The real runs use the spec configuration (mpc_rec.audit.spec.SPEC_RUN), so the secure
audit's own transcripts also serve the spec-conformance test.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, run_cli
from mpc_rec.audit import spec, views
from mpc_rec.audit.membership import dp_advantage_bound
from mpc_rec.audit.runner import ground_truth
from mpc_rec.audit.transcript import Recorder, RecordingCommunicator, Transcript
from mpc_rec.data import write_ratings_csv
from mpc_rec.errors import InputError

RUN = spec.SPEC_RUN


@pytest.fixture(scope="module")
def spec_data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("audit-data") / "spec.csv"
    write_ratings_csv(spec.spec_ratings(), path)
    return path


def _audit(out: Path, data: Path, *extra: str):
    return run_cli("audit", "--out", str(out), "--data", str(data), "--parties", str(RUN["parties"]),
                   "--factors", str(RUN["factors"]), "--mia-trials", "100", *extra, timeout=400)


@pytest.fixture(scope="module")
def secure_audit(tmp_path_factory, spec_data):
    out = tmp_path_factory.mktemp("audit-secure")
    done = _audit(out, spec_data, "--epochs", str(RUN["epochs"]), "--top-k", str(RUN["top_k"]))
    return done, out


def _verdicts(out: Path) -> dict[str, dict]:
    report = json.loads((out / "audit.json").read_text())
    return {row["check"]: row for row in report["verdicts"]}


def test_audit_passes_on_the_secure_configuration(secure_audit):
    done, out = secure_audit
    assert done.returncode == 0, done.stdout + done.stderr
    verdicts = _verdicts(out)
    assert all(row["passed"] for row in verdicts.values()), verdicts
    report = json.loads((out / "audit.json").read_text())
    assert report["runs"]["a"]["dealer"] == "ttp" and report["runs"]["a"]["privacy"]["mode"] == "dp"
    for check in report["views"]:
        assert check["ring_values"] > 10_000 and check["bit_values"] > 100  # the views were really captured
        assert check["distinguisher"]["test_samples"] > 500
    assert not any(r["found_mask"] for r in report["reconstruction"])
    audited = [m for m in report["membership"] if m["audited"]]
    assert audited and all(m["low"] <= m["bound"] for m in audited)
    no_dp = [m for m in report["membership"] if m["epsilon"] is None and m["target"].startswith("item side")]
    assert no_dp[0]["advantage"] > 0.9  # the same attack does find members when nothing protects them
    text = (out / "report.md").read_text()
    assert "**Overall: PASS**" in text and "| membership inference on item side (Q, c) | PASS |" in text
    for png in ("bytes.png", "distinguisher.png", "membership.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_messages_of_a_real_run_match_the_protocol_specs(secure_audit):
    _, out = secure_audit
    truth = ground_truth(spec.spec_ratings(), RUN["parties"], seed=0)
    symbols = spec.symbols_for(truth.rows, len(truth.catalogue), RUN["factors"], RUN["top_k"])
    transcripts = [Transcript(out / "runs" / "a" / "transcript", rank) for rank in range(RUN["parties"])]
    problems = spec.check_protocol_files(REPO / "protocols", transcripts, symbols)
    assert not problems, "run and protocols/*.md differ (regenerate with scripts/message_specs.py):\n" + "\n".join(problems)


def test_audit_flags_the_insecure_tfp_dealer(tmp_path, spec_data):
    done = _audit(tmp_path, spec_data, "--weaken", "tfp", "--epochs", "1", "--top-k", "0")
    assert done.returncode == 4, done.stdout + done.stderr
    verdicts = _verdicts(tmp_path)
    assert not verdicts["reconstruction of other parties' inputs from one transcript"]["passed"]
    assert not verdicts["own triple draws do not unmask the view"]["passed"]
    report = json.loads((tmp_path / "audit.json").read_text())
    attack = {r["attacker"]: r for r in report["reconstruction"]}
    assert attack[0]["rating_accuracy"] == 1.0 and attack[0]["mask_accuracy"] == 1.0 and attack[0]["rated"] > 20
    assert not attack[1]["found_mask"]  # only the dealing party can do it
    # what goes over the wire still looks uniform: the weakness is party 0's knowledge
    assert verdicts["view uniformity (bytes, bits, small values)"]["passed"]
    assert "**Overall: FAIL**" in (tmp_path / "report.md").read_text()


def test_audit_flags_a_run_without_dp(tmp_path, spec_data):
    done = _audit(tmp_path, spec_data, "--weaken", "no-dp", "--epochs", "1", "--top-k", "0")
    assert done.returncode == 4, done.stdout + done.stderr
    verdicts = _verdicts(tmp_path)
    assert not verdicts["membership inference on item side (Q, c)"]["passed"]
    assert not verdicts["every opened value is noised"]["passed"]
    leak = verdicts["no plaintext in transcripts, logs or outputs"]
    assert not leak["passed"] and "un-noised test" in leak["detail"]
    assert verdicts["reconstruction of other parties' inputs from one transcript"]["passed"]


# ---------------------------------------------------------------- the parts, without processes
class _FakeComm:
    def __init__(self, rank):
        self.rank = rank

    def get_rank(self):
        return self.rank

    def all_reduce(self, tensor, batched=False):
        return [t * 2 for t in tensor] if batched else tensor * 2

    def broadcast(self, tensor, src, group=None):
        return tensor

    def all_gather(self, tensor):
        return [tensor + peer for peer in range(3)]


def test_recorder_keeps_what_the_party_receives_and_samples_large_tensors(tmp_path):
    recorder = Recorder(tmp_path, rank=1, max_elements=100)
    comm = RecordingCommunicator(_FakeComm(1), recorder)
    assert comm.get_rank() == 1  # everything else is delegated untouched
    x = torch.arange(12, dtype=torch.long).reshape(3, 4)
    comm.all_reduce([x, x + 1], batched=True)
    comm.broadcast(x, 1)  # its own broadcast: nothing received
    comm.broadcast(x, 0)
    comm.all_gather(torch.zeros(2, dtype=torch.long))
    comm.all_reduce(torch.arange(1000, dtype=torch.long))
    recorder.close()
    transcript = Transcript(tmp_path, 1)
    records = transcript.messages()
    assert [(r["op"], r["peer"]) for r in records] == [
        ("all_reduce", "all"), ("all_reduce", "all"), ("broadcast", 0), ("all_gather", 0), ("all_gather", 2), ("all_reduce", "all")]
    assert np.array_equal(transcript.values(records[1]), (x + 1).reshape(-1).numpy() * 2)
    assert records[1]["shape"] == [3, 4] and records[1]["dtype"] == "int64"
    assert np.array_equal(transcript.values(records[4]), [2, 2])
    big = records[5]
    assert big["sampled"] and big["stored"] == 100 and big["nelement"] == 1000
    assert np.array_equal(transcript.values(big), np.arange(0, 2000, 20))


def test_view_statistics_can_fail():
    rng = np.random.default_rng(0)
    uniform = rng.integers(0, 2**64, size=60_000, dtype=np.uint64)
    other = rng.integers(0, 2**64, size=60_000, dtype=np.uint64)
    assert views.uniformity(uniform).p_value > 1e-3
    assert views.distinguish(uniform, other).at_chance
    plaintext = (rng.integers(1, 6, size=60_000) * 2**16).astype(np.uint64)  # fixed-point ratings
    assert views.uniformity(plaintext).p_value < 1e-9
    leaked = uniform.copy()
    leaked[::20] = plaintext[::20]  # 5% of the values unmasked
    assert not views.distinguish(leaked, other).at_chance
    assert views.bit_balance((rng.random(5000) < 0.3).astype(np.uint64))[0] < 1e-9  # a 0/1 mask is not a fair coin


def test_advantage_bound_of_epsilon_delta_dp():
    assert dp_advantage_bound(0.0, 0.0) == 0.0
    assert dp_advantage_bound(1.0, 0.0) == pytest.approx((np.e - 1) / (np.e + 1))
    assert dp_advantage_bound(8.0, 1e-5) == pytest.approx(0.999329, abs=1e-6)
    assert dp_advantage_bound(50.0, 0.0) == 1.0


def test_messages_blocks_are_parsed_strictly():
    config, lines = spec.parse_blocks("```messages\nconfig parties=2\n*  agreement  all_gather  party0  [11]  1\ninput-sharing none\n```")[0]
    assert config == {"parties": "2"} and lines[0] == ("*", "agreement", "all_gather", "party0", "[11]", 1)
    assert spec.evaluate_shape("[n, K+1, I//2]", {"n": 5, "K": 3, "I": 9}) == (5, 4, 4)
    with pytest.raises(InputError, match="line 1"):
        spec.parse_blocks("```messages\n* agreement all_gather\n```")
    with pytest.raises(InputError, match="unsupported"):
        spec.evaluate_shape("[__import__('os')]", {})


def test_audit_refuses_bad_options(tmp_path):
    done = run_cli("audit", "--out", str(tmp_path), "--mia-epsilons", "1,x")
    assert done.returncode == 2 and "--mia-epsilons" in done.stderr
    done = run_cli("audit", "--out", str(tmp_path), "--weaken", "everything")
    assert done.returncode == 2


def test_audit_section_of_a_party_configuration(tmp_path):
    from mpc_rec.config import parse_party_config
    from mpc_rec.errors import ConfigError

    raw = {"party": {"name": "a", "rank": 0, "world_size": 2}, "network": {"rendezvous": "tcp://127.0.0.1:1"},
           "data": {"train": "a.csv", "catalogue": "items.txt"}, "output": {"dir": "out"},
           "audit": {"transcript": "views", "max_elements": 64}}
    config = parse_party_config(raw, base=tmp_path)
    assert config.transcript_dir == tmp_path / "views" and config.transcript_max_elements == 64
    raw["audit"]["max_elements"] = 0
    with pytest.raises(ConfigError, match="audit.max_elements"):
        parse_party_config(raw, base=tmp_path)
    del raw["audit"]
    assert parse_party_config(raw, base=tmp_path).transcript_dir is None  # no capture unless asked
