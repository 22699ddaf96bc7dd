"""Row ingest: contributors' rows through Paillier into the compute parties' shares.

Keys here are 1024-bit TEST-ONLY keys (insecure; production default is 2048).
"""

import json

import numpy as np
import pytest

from conftest import run_cli
from mpc_rec.data import partition_users, sort_ids, split_train_test, synthetic_ratings, write_ratings_csv
from mpc_rec.errors import DataError
from mpc_rec.ingest.codes import IngestSpec, contributor_vector, encode_rows, joint_codes
from mpc_rec.ingest.round import IngestRound
from mpc_rec.ingest.simulate import _cut
from mpc_rec.model import TrainConfig
from mpc_rec.paillier import KeyHolder, RejectedContribution, generate_keypair, make_contribution
from mpc_rec.paillier.packing import PackingSpec
from mpc_rec.reference import run_reference

TEST_ONLY_BITS = 1024
N_ITEMS = 9


@pytest.fixture(scope="module")
def keys():
    return generate_keypair(TEST_ONLY_BITS, allow_insecure_size=True)


def _rows(rng, n):
    train = rng.integers(1, 6, (n, N_ITEMS)).astype(float)
    train_mask = (rng.random((n, N_ITEMS)) < 0.4).astype(float)
    test = rng.integers(1, 6, (n, N_ITEMS)).astype(float)
    test_mask = ((rng.random((n, N_ITEMS)) < 0.4) & (train_mask == 0)).astype(float)
    return encode_rows((train * train_mask, train_mask), (test * test_mask, test_mask), (1, 5))


def test_slot_widths_and_codes():
    spec = IngestSpec.for_ratings((1, 5), key_bits=2048)
    # codes up to |9| need 5 signed bits; one contribution per slot; 40-bit statistical mask
    assert (spec.value_bits, spec.headroom_bits, spec.mask_bits, spec.slot_bits) == (5, 0, 45, 46)
    assert spec.slots_per_ciphertext == 44 and spec.digest != PackingSpec(2048, 5, 1, 0, 40).digest
    codes = encode_rows((np.array([[5.0, 0, 1]]), np.array([[1.0, 0, 1]])),
                        (np.array([[0, 3.0, 0]]), np.array([[0, 1.0, 0]])), (1, 5))
    assert codes.tolist() == [[9, -5, 1]]
    with pytest.raises(DataError, match="whole numbers"):
        encode_rows((np.array([[np.nan]]), np.array([[1.0]])), (np.zeros((1, 1)), np.zeros((1, 1))), (1, 5))
    with pytest.raises(DataError, match="whole numbers"):
        encode_rows((np.array([[3.5]]), np.array([[1.0]])), (np.zeros((1, 1)), np.zeros((1, 1))), (1, 5))


def test_round_places_masks_and_refuses_bad_messages(keys):
    public, private = keys
    spec = IngestSpec.for_ratings((1, 5), key_bits=TEST_ONLY_BITS)
    rng = np.random.default_rng(1)
    # every code at its extremes: 9 (rating 5, train) and -9 (rating 5, held out) fill whole rows
    blocks = {"a": np.full((3, N_ITEMS), 9), "b": _rows(rng, 4), "c": np.full((2, N_ITEMS), -9), "d": _rows(rng, 2)}
    rnd = IngestRound(public, spec, round_id=7, registry={cid: len(b) for cid, b in blocks.items()},
                      n_items=N_ITEMS, deadline_s=600)
    sent = {cid: make_contribution(public, spec, cid, 7, contributor_vector(b, spec).astype(float)).to_bytes()
            for cid, b in blocks.items() if cid != "d"}
    for payload in sent.values():
        rnd.submit(payload)
    other_public, _ = generate_keypair(TEST_ONLY_BITS, allow_insecure_size=True)
    vector = contributor_vector(blocks["d"], spec).astype(float)
    bad = {
        "replay": sent["a"],
        "wrong key": make_contribution(other_public, spec, "d", 7, vector).to_bytes(),
        "stale round": make_contribution(public, spec, "d", 6, vector).to_bytes(),
        "oversized": make_contribution(public, spec, "d", 7, np.concatenate([vector, np.zeros(spec.slots_per_ciphertext)])).to_bytes(),
        "unregistered": make_contribution(public, spec, "zz", 7, vector).to_bytes(),
        "malformed": b'{"type": "contribution", "contributor": "d"}',
        "relabelled replay": sent["c"].replace(b'"contributor":"c"', b'"contributor":"d"'),
    }
    reasons = {}
    for name, payload in bad.items():
        with pytest.raises(RejectedContribution) as refused:
            rnd.submit(payload)
        reasons[name] = refused.value.reason
    assert "already contributed" in reasons["replay"] and "expected" in reasons["wrong key"]
    assert "round 6" in reasons["stale round"] and "registered" in reasons["oversized"]
    assert "not a registered" in reasons["unregistered"] and "malformed" in reasons["malformed"]
    assert "repeats one already received" in reasons["relabelled replay"]
    assert not rnd.settled  # "d" neither sent nor withdrew: the round would wait for the deadline
    rnd.withdraw("d", "gave up")
    assert rnd.settled
    result = rnd.close()
    assert result.report.accepted == ["a", "b", "c"] and result.report.rows == [3, 4, 2]
    assert result.masked_sum.count == 1  # contributions per slot: rows are placed, not added
    assert [w["contributor"] for w in result.report.withdrawn] == ["d"] and len(result.report.rejected) == 7

    # What each party receives. The aggregator: ciphertexts only (and keeps -mask). The key
    # holder: the masked vector; decrypted, every value is code + a 45-bit mask.
    masked_bytes = result.masked_sum.to_bytes()
    key_holder = KeyHolder(private, spec).decrypt(masked_bytes, expected_round=7)
    expected = np.concatenate([blocks["a"], blocks["b"], blocks["c"]]).ravel()
    seen_by_key_holder = joint_codes(key_holder.values, result.report.rows, N_ITEMS, spec)
    kept_by_aggregator = joint_codes(result.share.values, result.report.rows, N_ITEMS, spec)
    assert np.array_equal(seen_by_key_holder + kept_by_aggregator, expected)  # shares of the codes, exactly
    for view in (seen_by_key_holder, kept_by_aggregator):
        assert np.mean(np.abs(view) < 2**20) < 0.01  # no value anywhere near the small codes in the clear
        assert np.mean(view == expected) < 0.01 and np.ptp(view) > 2**40  # spread over the mask range


def test_run_with_contributors_equals_the_ordinary_run(tmp_path):
    ratings = synthetic_ratings(n_users=24, n_items=12, density=0.35, seed=4)
    data = tmp_path / "r.csv"
    write_ratings_csv(ratings, data)
    done = run_cli("run", "--parties", "2", "--data", str(data), "--epochs", "6", "--learning-rate", "0.01",
                   "--no-dp", "--contributors", "3", "--insecure-1024-bit-key", "--out", str(tmp_path / "o"))
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    ingest = summary["ingest"]
    assert ingest["contributors_aggregated"] == 3 and ingest["users_aggregated"] == 24
    assert ingest["paillier"]["key"] == "INSECURE test-size key" and ingest["ciphertexts_total"] >= 24 * 12 / 22
    # the ordinary run's plaintext reference: same split, partition and row order
    train, test = split_train_test(ratings, seed=0)
    blocks = [sort_ids(set(b.users)) for b in partition_users(ratings, 2, seed=0)]
    ordinary = run_reference(train, test, blocks, ratings.item_ids(), TrainConfig(epochs=6, learning_rate=0.01), 0)
    assert summary["metrics"]["rmse_plaintext"] == pytest.approx(ordinary["rmse"], abs=1e-12)
    assert abs(summary["metrics"]["rmse_secure"] - ordinary["rmse"]) < 2e-3
    assert [len(b) for b in _cut(blocks, 3)] == summary["data"]["users_per_party"]


def test_run_continues_past_faulty_and_silent_contributors(tmp_path):
    ratings = synthetic_ratings(n_users=30, n_items=10, density=0.4, seed=5)
    data = tmp_path / "r.csv"
    write_ratings_csv(ratings, data)
    faults = "c002:replay,c003:wrong-key,c004:malformed,c005:oversized,c006:nan,c007:drop"
    done = run_cli("run", "--parties", "2", "--data", str(data), "--epochs", "4", "--learning-rate", "0.01",
                   "--no-dp", "--contributors", "8", "--insecure-1024-bit-key", "--ingest-deadline", "45",
                   "--contributor-faults", faults, "--out", str(tmp_path / "o"))
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    ingest = summary["ingest"]
    assert ingest["contributors_aggregated"] == 3 and ingest["dropped"] == ["c007"]
    rejected = {r["contributor"]: r["reason"] for r in ingest["rejected"]}
    assert set(rejected) == {"c002", "c003", "c004", "c005"}
    assert "already contributed" in rejected["c002"] and "expected" in rejected["c003"]
    assert "lowercase hex" in rejected["c004"] and "registered" in rejected["c005"]
    withdrawn = {w["contributor"]: w["reason"] for w in ingest["withdrawn"]}
    assert set(withdrawn) == {"c003", "c004", "c005", "c006"} and "whole numbers" in withdrawn["c006"]
    # the users actually aggregated are the ones trained on and counted
    assert ingest["users_aggregated"] == sum(summary["data"]["users_per_party"]) < 30
    assert abs(summary["metrics"]["rmse_secure"] - summary["metrics"]["rmse_plaintext"]) < 2e-3
