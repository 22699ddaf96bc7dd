"""Paillier aggregation: exact packing, message checks, the round, the parties' views.

Keys are 1024 bits (test-only, behind allow_insecure_size) except where a test is about
2048-bit keys; one key pair is generated per test session.
"""

import json
import os
import random
import stat

import numpy as np
import pytest

from mpc_harness import run_parties
from mpc_rec.errors import InputError
from mpc_rec.paillier import (
    AggregationError, Aggregator, Contribution, ContributionInputError, KeyHolder, PackingError,
    PackingSpec, PublicKey, RejectedContribution, fingerprint_of, generate_keypair, load_private_key,
    load_public_key, make_contribution, save_private_key, save_public_key,
)
from mpc_rec.paillier import _crypto
from mpc_rec.paillier.packing import RING, decode_totals, encode, pack, pack_values, to_slots, unpack
from mpc_rec.paillier.simulation import contributor_processes, feed_round

BITS = 1024


@pytest.fixture(scope="session")
def keys():
    return generate_keypair(BITS, allow_insecure_size=True)


@pytest.fixture(scope="session")
def other_keys():
    return generate_keypair(BITS, allow_insecure_size=True)


@pytest.fixture
def spec():
    return PackingSpec.for_range(8.0, key_bits=BITS, max_contributors=16)


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def ring_sum(*shares):
    total = np.zeros_like(shares[0], dtype=np.uint64)
    for s in shares:
        total = total + s.astype(np.uint64)  # wraps mod 2^64
    return total.view(np.int64)


def encoded_total(vectors, spec):
    return np.sum([np.array(encode(v, spec), dtype=np.int64) for v in vectors], axis=0)


def run_round(keys, spec, vectors, round_id=1, aggregator=None, key_holder=None):
    public, private = keys
    aggregator = aggregator or Aggregator(public, spec)
    key_holder = key_holder or KeyHolder(private, spec)
    round_ = aggregator.open_round(round_id, length=len(next(iter(vectors.values()))), deadline_s=60)
    for cid, values in vectors.items():
        round_.submit(make_contribution(public, spec, cid, round_id, values).to_bytes())
    result = round_.close()
    return result, key_holder.decrypt(result.masked_sum.to_bytes())


# --- packing: parameters and exact integer maths -------------------------------------------

def test_slot_width_is_value_plus_headroom_plus_mask_plus_carry():
    spec = PackingSpec(key_bits=2048, value_bits=24, max_contributors=1024, frac_bits=16, stat_bits=40)
    assert spec.headroom_bits == 10
    assert spec.mask_bits == 24 + 10 + 40
    assert spec.slot_bits == 24 + 10 + 40 + 1 == 75
    assert spec.slots_per_ciphertext == 2047 // 75 == 27
    # Narrow values: the mask margin grows so the mask range is a multiple of 2^64.
    narrow = PackingSpec(key_bits=1024, value_bits=8, max_contributors=4, frac_bits=4)
    assert narrow.mask_margin_bits == 64 - 8 - 2 and narrow.mask_bits == 64 and narrow.slot_bits == 65
    assert PackingSpec(key_bits=1024, value_bits=21, max_contributors=1).headroom_bits == 0
    assert PackingSpec(key_bits=1024, value_bits=21, max_contributors=17).headroom_bits == 5


def test_for_range_picks_the_narrowest_value_width():
    spec = PackingSpec.for_range(8.0, key_bits=BITS)
    assert spec.value_bits == 21 and spec.max_encoded == 2**20 - 1 and spec.min_encoded == -(2**20)
    assert spec.max_abs >= 8.0 > PackingSpec(key_bits=BITS, value_bits=20).max_abs
    tight = PackingSpec.for_range(8.0 - 2**-16, key_bits=BITS)
    assert tight.value_bits == 20 and tight.max_abs == 8.0 - 2**-16


@pytest.mark.parametrize("kwargs, words", [
    ({"key_bits": 1024, "value_bits": 54}, "value_bits"),
    ({"key_bits": 1024, "value_bits": 53, "max_contributors": 2**12}, "64-bit"),
    ({"key_bits": 512}, "key_bits"),
    ({"key_bits": 1024, "stat_bits": 39}, "stat_bits"),
    ({"key_bits": 1024, "max_contributors": 0}, "max_contributors"),
    ({"key_bits": 1024, "value_bits": True}, "integer"),
    ({"key_bits": 1024, "value_bits": 16, "frac_bits": 16}, "frac_bits"),
])
def test_invalid_packing_parameters_are_refused(kwargs, words):
    with pytest.raises(PackingError, match=words):
        PackingSpec(**kwargs)


def test_pack_unpack_round_trip_random_specs():
    rng = random.Random(7)
    for _ in range(200):
        spec = PackingSpec(key_bits=rng.choice([1024, 2048, 3072]), value_bits=rng.randint(2, 53),
                           max_contributors=rng.randint(1, 2000), frac_bits=0, stat_bits=rng.randint(40, 80))
        if spec.value_bits + spec.headroom_bits > 64:
            continue
        length = rng.randint(1, 3 * spec.slots_per_ciphertext + 1)
        slots = [rng.choice([0, (1 << spec.slot_bits) - 1, rng.getrandbits(spec.slot_bits)]) for _ in range(length)]
        plaintexts = pack(slots, spec)
        assert len(plaintexts) == spec.chunks(length)
        assert all(0 <= p < 1 << (spec.key_bits - 1) for p in plaintexts)
        assert unpack(plaintexts, length, spec) == slots


def _sum_with_mask(spec, contributions, mask):
    """What the key holder decrypts, in plain integers: packed sum of slots plus packed mask."""
    plaintext = [sum(col) for col in zip(*[pack(to_slots(x, spec), spec) for x in contributions])]
    masked = [p + m for p, m in zip(plaintext, pack(mask, spec))]
    return masked


@pytest.mark.parametrize("key_bits, value_bits, max_contributors", [
    (1024, 21, 16), (1024, 2, 1), (2048, 53, 2**11), (2048, 32, 1000), (3072, 24, 2**24),
])
def test_packing_is_exact_at_the_boundaries(key_bits, value_bits, max_contributors):
    spec = PackingSpec(key_bits=key_bits, value_bits=value_bits, max_contributors=max_contributors, frac_bits=0)
    k, m = spec.slots_per_ciphertext, spec.max_contributors
    length = 2 * k + 1
    bound = 1 << (spec.key_bits - 1)  # n >= 2^(key_bits - 1) for a key of key_bits bits
    cases = {
        "largest": ([spec.max_encoded] * length, m, (1 << spec.mask_bits) - 1),
        "smallest": ([spec.min_encoded] * length, m, 0),
        "smallest, largest mask": ([spec.min_encoded] * length, m, (1 << spec.mask_bits) - 1),
        "one contributor": ([spec.max_encoded] * length, 1, (1 << spec.mask_bits) - 1),
    }
    for name, (vector, count, mask_value) in cases.items():
        # M identical vectors stand for M contributors: only the column sums matter.
        slot_sums = [count * (x + spec.offset) for x in vector]
        masked = [s + mask_value for s in slot_sums]
        assert max(masked) < 1 << spec.slot_bits, name  # the slot bound of the proof
        packed_total = [count * q for q in pack(to_slots(vector, spec), spec)]  # M equal vectors
        with_mask = [p + q for p, q in zip(packed_total, pack([mask_value] * length, spec))]
        assert all(p < bound for p in with_mask), name  # no wrap mod n
        unpacked = unpack(with_mask, length, spec)
        assert unpacked == masked, name  # no carry between slots
        totals = decode_totals([u - mask_value for u in unpacked], count, spec)
        assert totals == [count * x for x in vector], name
        assert all(-(2**63) <= t < 2**63 for t in totals), name  # a signed ring element


def test_packing_property_random_vectors_with_negatives():
    rng = np.random.default_rng(11)
    for trial in range(30):
        m = int(rng.integers(1, 40))
        spec = PackingSpec(key_bits=1024, value_bits=int(rng.integers(2, 40)), max_contributors=m, frac_bits=0)
        length = int(rng.integers(1, 50))
        contributions = [
            rng.integers(spec.min_encoded, spec.max_encoded, size=length, endpoint=True).tolist()
            for _ in range(int(rng.integers(1, m + 1)))
        ]
        contributions[0][: length // 3] = [spec.min_encoded] * len(contributions[0][: length // 3])
        mask = [int(rng.integers(0, 2**62)) << (spec.mask_bits - 62) | (2**(spec.mask_bits - 62) - 1)
                for _ in range(length)]
        unpacked = unpack(_sum_with_mask(spec, contributions, mask), length, spec)
        totals = decode_totals([u - r for u, r in zip(unpacked, mask)], len(contributions), spec)
        assert totals == np.sum(contributions, axis=0).tolist(), trial


def test_encoding_refuses_nan_inf_and_out_of_range_with_the_index(spec):
    assert encode([spec.max_abs, -spec.max_abs, 0.0, spec.min_encoded / 2**16], spec) == [
        spec.max_encoded, -spec.max_encoded, 0, spec.min_encoded]
    for bad, words in [([0.0, float("nan")], "value 1 is nan"), ([float("inf")], "value 0 is inf"),
                       ([1.0, 2.0, 16.5], "value 2 = 16.5 is outside")]:
        with pytest.raises(PackingError, match=words):
            encode(bad, spec)
    with pytest.raises(PackingError, match="flat vector"):
        encode([[1.0]], spec)


def test_unpack_detects_an_overflowing_slot(spec):
    plaintexts = pack([0, 1, 2], spec)
    with pytest.raises(PackingError, match="beyond its last used slot"):
        unpack([plaintexts[0] + (1 << (3 * spec.slot_bits))], 3, spec)
    with pytest.raises(PackingError, match="overflowed"):
        unpack([1 << (spec.slots_per_ciphertext * spec.slot_bits)], spec.slots_per_ciphertext, spec)


# --- keys --------------------------------------------------------------------------------

def test_private_key_file_is_0600_and_loose_modes_are_refused(keys, tmp_path):
    public, private = keys
    path = tmp_path / "keyholder.key"
    save_private_key(path, private)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    loaded = load_private_key(path)
    c = _crypto.encrypt_raw(public.n, 424242)
    assert loaded.decrypt_raw(c) == 424242
    assert "p=" not in repr(loaded) and str(private._phe.p) not in repr(loaded)
    os.chmod(path, 0o644)
    with pytest.raises(InputError, match="mode 0644; it must be 0600"):
        load_private_key(path)
    save_private_key(path, private)  # replacing keeps 0600
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_public_key_file_and_fingerprint(keys, other_keys, tmp_path):
    public, _ = keys
    path = tmp_path / "public.json"
    save_public_key(path, public)
    assert load_public_key(path, expected_fingerprint=public.fingerprint) == public
    assert public.fingerprint == fingerprint_of(public.n) and len(public.fingerprint) == 64
    with pytest.raises(InputError, match="not the expected"):
        load_public_key(path, expected_fingerprint=other_keys[0].fingerprint)
    data = json.loads(path.read_text())
    data["n"] = format(other_keys[0].n, "x")
    path.write_text(json.dumps(data))
    with pytest.raises(InputError, match="does not match n"):
        load_public_key(path)


def test_key_sizes_2048_by_default_1024_only_when_insecure_allowed():
    with pytest.raises(InputError, match="2048, 3072"):
        generate_keypair(1024)
    public, private = generate_keypair()
    assert public.bits == 2048 and not public.insecure
    spec = PackingSpec(key_bits=2048)
    result, share = run_round((public, private), spec, {"a": [1.5, -2.25], "b": [0.5, 100.0]})
    assert ring_sum(share.values, result.share.values).tolist() == [2 * 2**16, int(97.75 * 2**16)]


# --- messages ------------------------------------------------------------------------------

def test_messages_are_json_and_parsing_is_strict(keys, spec):
    public, _ = keys
    message = make_contribution(public, spec, "alice", 3, [1.0, -1.0, 0.5])
    raw = message.to_bytes()
    assert raw.startswith(b"{") and Contribution.from_bytes(raw) == message
    data = json.loads(raw)
    for change, words in [({"round": True}, "'round'"), ({"extra": 1}, "unknown"),
                          ({"ciphertexts": ["ABC"]}, "ciphertext 0"), ({"fingerprint": "00"}, "fingerprint"),
                          ({"contributor": "a b\n"}, "contributor id"), ({"length": 0}, "'length'")]:
        with pytest.raises(RejectedContribution, match=words):
            Contribution.from_dict({**data, **change})
    with pytest.raises(RejectedContribution, match="not valid UTF-8 JSON"):
        Contribution.from_bytes(b"\x80abc")
    with pytest.raises(RejectedContribution, match="exceeds the limit"):
        Contribution.from_bytes(raw, max_bytes=100)


# --- a round: exactness, refusals, deadline, views -----------------------------------------

def test_round_shares_add_up_to_the_exact_total_at_most_contributors(keys, spec):
    rng = np.random.default_rng(5)
    length = 2 * spec.slots_per_ciphertext + 3
    vectors = {f"c{i}": rng.uniform(-spec.max_abs, spec.max_abs, length) for i in range(spec.max_contributors)}
    vectors["c0"][:5] = spec.max_abs
    vectors["c1"][:5] = spec.min_encoded / 2**16  # the most negative value
    vectors["c2"][5:10] = 2**-16  # the smallest step
    vectors["c3"][:] = 0.0
    result, key_share = run_round(keys, spec, vectors)
    total = encoded_total(vectors.values(), spec)
    assert np.array_equal(ring_sum(key_share.values, result.share.values), total)
    assert key_share.count == result.share.count == result.report.count == spec.max_contributors
    assert key_share.contributors == result.share.contributors == result.report.contributors
    np.testing.assert_allclose(total / 2**16, np.sum(list(vectors.values()), axis=0), atol=spec.max_contributors * 2**-17)


def test_each_party_sees_only_masked_values(keys, spec):
    public, private = keys
    vectors = {"a": [1.0, 2.0, 3.0, -4.0], "b": [0.25, 0.0, -1.0, 4.0]}
    total = encoded_total(vectors.values(), spec)
    first, key_first = run_round(keys, spec, vectors)
    second, key_second = run_round(keys, spec, vectors)
    # Key holder: the integers it decrypts are sum + mask, the mask uniform on [0, 2^mask_bits).
    seen = unpack([private.decrypt_raw(c) for c in first.masked_sum.ciphertexts], 4, spec)
    masks = [u - (t + 2 * spec.offset) for u, t in zip(seen, total.tolist())]
    assert all(2 ** (spec.mask_bits - 20) <= r < 2**spec.mask_bits for r in masks)  # fails w.p. ~2^-18
    # Aggregator: ciphertexts only, and its share is exactly -mask mod 2^64, whatever the data.
    assert first.share.values.astype(np.uint64).tolist() == [(-r) % RING for r in masks]
    assert all(_crypto.is_valid_ciphertext(public.n, c) and c >= 2**64 for c in first.masked_sum.ciphertexts)
    for share in (key_first.values, first.share.values, key_second.values, second.share.values):
        assert not np.any(share == total)
        assert np.all(np.abs(share.astype(np.float64)) > 2**40)  # a uniform share fails w.p. 2^-23
    assert not np.any(key_first.values == key_second.values)  # fresh masks every round
    assert not np.any(first.share.values == second.share.values)


def test_replayed_and_duplicate_contributions_are_refused(keys, spec):
    public, private = keys
    aggregator, key_holder = Aggregator(public, spec), KeyHolder(private, spec)
    first = make_contribution(public, spec, "alice", 1, [1.0, 2.0])
    round1 = aggregator.open_round(1, length=2, deadline_s=60)
    round1.submit(first.to_bytes())
    with pytest.raises(RejectedContribution, match="'alice' rejected: already contributed to round 1"):
        round1.submit(make_contribution(public, spec, "alice", 1, [5.0, 5.0]))
    copied = Contribution("mallory", 1, first.fingerprint, first.spec, 2, first.ciphertexts)
    with pytest.raises(RejectedContribution, match="'mallory' rejected: ciphertext 0 repeats"):
        round1.submit(copied)
    round1.submit(make_contribution(public, spec, "bob", 1, [0.5, 0.5]))
    result = round1.close()
    assert result.report.accepted == ("alice", "bob") and len(result.report.rejected) == 2
    key_share = key_holder.decrypt(result.masked_sum)
    assert ring_sum(key_share.values, result.share.values).tolist() == [int(1.5 * 2**16), int(2.5 * 2**16)]
    with pytest.raises(AggregationError, match="already decrypted"):
        key_holder.decrypt(result.masked_sum)  # a replayed masked sum
    with pytest.raises(InputError, match="not after the last round"):
        aggregator.open_round(1, length=2, deadline_s=60)
    round2 = aggregator.open_round(2, length=2, deadline_s=60)
    with pytest.raises(RejectedContribution, match="for round 1, this is round 2"):
        round2.submit(first.to_bytes())  # replayed as-is
    relabelled = Contribution("alice", 2, first.fingerprint, first.spec, 2, first.ciphertexts)
    with pytest.raises(RejectedContribution, match="repeats one already received"):
        round2.submit(relabelled)  # replayed with a new round number
    round2.submit(make_contribution(public, spec, "alice", 2, [1.0, 1.0]))
    assert round2.close().report.count == 1


def test_a_late_contributor_is_dropped_and_both_parties_report_the_count(keys, spec):
    public, private = keys
    clock = Clock()
    aggregator = Aggregator(public, spec, clock=clock)
    round_ = aggregator.open_round(7, length=3, deadline_s=10, expected=["a", "b", "c"])
    round_.submit(make_contribution(public, spec, "a", 7, [1.0, 1.0, 1.0]))
    clock.now = 9.9
    round_.submit(make_contribution(public, spec, "b", 7, [2.0, 2.0, 2.0]))
    clock.now = 10.5
    with pytest.raises(RejectedContribution, match="'c' rejected: missed the deadline of round 7"):
        round_.submit(make_contribution(public, spec, "c", 7, [4.0, 4.0, 4.0]))
    with pytest.raises(RejectedContribution, match="not a registered contributor"):
        clock.now = 1.0
        round_.submit(make_contribution(public, spec, "zed", 7, [4.0, 4.0, 4.0]))
    result = round_.close()
    assert result.report.count == 2 and result.report.dropped == ("c",)
    key_share = KeyHolder(private, spec).decrypt(result.masked_sum.to_bytes(), expected_round=7)
    assert key_share.count == result.share.count == 2
    assert ring_sum(key_share.values, result.share.values).tolist() == [3 * 2**16] * 3


def test_too_few_contributors_fails_the_round(keys, spec):
    public, _ = keys
    round_ = Aggregator(public, spec).open_round(1, length=1, deadline_s=1, min_contributors=2)
    round_.submit(make_contribution(public, spec, "only", 1, [1.0]))
    with pytest.raises(AggregationError, match="1 contribution.s. accepted, at least 2 needed"):
        round_.close()


def test_wrong_key_is_refused_on_both_sides(keys, other_keys, spec):
    public, _ = keys
    other = other_keys[0]
    with pytest.raises(ContributionInputError, match="'carol': public key fingerprint .* is not the expected"):
        make_contribution(other, spec, "carol", 1, [1.0], expected_fingerprint=public.fingerprint)
    round_ = Aggregator(public, spec).open_round(1, length=1, deadline_s=60)
    with pytest.raises(RejectedContribution, match="'carol' rejected: encrypted under key"):
        round_.submit(make_contribution(other, spec, "carol", 1, [1.0]).to_bytes())
    with pytest.raises(InputError, match="refusing to use this key"):
        Aggregator(other, spec, expected_fingerprint=public.fingerprint)


def test_bad_contributions_are_rejected_and_the_round_completes(keys, spec):
    public, private = keys
    round_ = Aggregator(public, spec).open_round(4, length=3, deadline_s=60)
    honest = {"h1": [1.0, -2.0, 3.0], "h2": [0.5, 0.5, -7.0]}
    round_.submit(make_contribution(public, spec, "h1", 4, honest["h1"]).to_bytes())
    template = make_contribution(public, spec, "x", 4, [0.0, 0.0, 0.0]).to_dict()
    n = public.n
    bad = {
        "zero": {"ciphertexts": ["0"]},
        "too-big": {"ciphertexts": [format(n * n, "x")]},
        "not-unit": {"ciphertexts": [format(private._phe.p * 7, "x")]},  # gcd(c, n) = p
        "not-hex": {"ciphertexts": ["xyz"]},
        "oversized": {"length": 4},
        "bad-spec": {"spec": "0" * 16},
    }
    for cid, change in bad.items():
        with pytest.raises(RejectedContribution, match=f"'{cid}' rejected: "):
            round_.submit({**template, "contributor": cid, **change})
    longer = make_contribution(public, spec, "long", 4, [0.0] * (spec.slots_per_ciphertext + 1))
    with pytest.raises(RejectedContribution, match="'long' rejected: vector has .* values, the round takes 3"):
        round_.submit(longer)
    with pytest.raises(RejectedContribution, match="'.' rejected: not valid UTF-8 JSON"):
        round_.submit(b"\xff\xfe")
    for values, words in [([1.0, float("nan"), 0.0], "'nan-user': value 1 is nan"),
                          ([float("-inf"), 0.0, 0.0], "'nan-user': value 0 is -inf"),
                          ([0.0, 0.0, 99.0], "'nan-user': value 2 = 99.0 is outside"),
                          ([0.0] * 4, "'nan-user': the vector has 4 values, the round takes 3")]:
        with pytest.raises(ContributionInputError, match=words):
            make_contribution(public, spec, "nan-user", 4, values, expected_length=3)
    round_.submit(make_contribution(public, spec, "h2", 4, honest["h2"]).to_bytes())
    result = round_.close()
    assert result.report.accepted == ("h1", "h2") and len(result.report.rejected) == len(bad) + 2
    assert all("\n" not in reason for _, reason in result.report.rejected)
    key_share = KeyHolder(private, spec).decrypt(result.masked_sum)
    assert np.array_equal(ring_sum(key_share.values, result.share.values), encoded_total(honest.values(), spec))


def test_key_holder_checks_the_masked_sum(keys, other_keys, spec):
    public, private = keys
    result, _ = run_round(keys, spec, {"a": [1.0], "b": [2.0]})
    data = result.masked_sum.to_dict()
    for change, words in [({"count": spec.max_contributors + 1}, "count 17 is outside"), ({"count": 0}, "'count'"),
                          ({"fingerprint": other_keys[0].fingerprint}, "made under key"),
                          ({"ciphertexts": ["1", "1"]}, "cannot carry"), ({"ciphertexts": ["0"]}, "malformed")]:
        with pytest.raises(AggregationError, match=words):
            KeyHolder(private, spec).decrypt({**data, **change})
    with pytest.raises(AggregationError, match="expected round 9"):
        KeyHolder(private, spec).decrypt(result.masked_sum, expected_round=9)


# --- speed paths and contributors as processes -------------------------------------------

def test_parallel_encryption_matches_in_process(keys, spec):
    public, private = keys
    values = np.linspace(-8, 8, 40 * spec.slots_per_ciphertext)
    with _crypto.make_pool(2) as pool:
        parallel = make_contribution(public, spec, "big", 1, values, executor=pool)
    serial = make_contribution(public, spec, "big", 1, values, workers=1)
    assert len(parallel.ciphertexts) == len(serial.ciphertexts) == 40
    assert parallel.ciphertexts != serial.ciphertexts  # fresh randomness
    assert [private.decrypt_raw(c) for c in parallel.ciphertexts] == pack_values(values, spec)
    assert [private.decrypt_raw(c) for c in serial.ciphertexts] == pack_values(values, spec)


def test_contributors_as_processes_with_one_bad_vector(keys, spec):
    public, private = keys
    vectors = {f"p{i}": [float(i), -float(i), 0.5] for i in range(4)}
    vectors["broken"] = [1.0, float("nan"), 0.0]
    round_ = Aggregator(public, spec).open_round(1, length=3, deadline_s=120, expected=list(vectors))
    stream = contributor_processes(public, spec, 1, vectors, fingerprint=public.fingerprint, processes=2)
    problems = feed_round(round_, stream)
    assert list(problems) == ["broken"] and "value 1 is nan" in problems["broken"]
    result = round_.close()
    assert result.report.count == 4 and result.report.dropped == ("broken",)
    key_share = KeyHolder(private, spec).decrypt(result.masked_sum.to_bytes())
    honest = [v for cid, v in vectors.items() if cid != "broken"]
    assert np.array_equal(ring_sum(key_share.values, result.share.values), encoded_total(honest, spec))


# --- into CrypTen shares, in real party processes ------------------------------------------

def _party_rounds(session, key_path, n, spec_fields, rounds):
    from mpc_rec.paillier.party import aggregate_round_in_party

    rank = session.endpoint.rank
    spec = PackingSpec(**spec_fields)
    aggregator = Aggregator(PublicKey(n), spec) if rank == 1 else None
    key_holder = KeyHolder(load_private_key(key_path), spec) if rank == 0 else None
    out = []
    for round_id, length, messages in rounds:
        try:
            result = aggregate_round_in_party(
                session, round_id=round_id, length=length, aggregator=aggregator, key_holder=key_holder,
                contributions=messages if rank == 1 else (), min_contributors=2,
            )
        except AggregationError as exc:
            out.append({"error": str(exc)})
            continue
        out.append({
            "revealed": result.tensor.get_plain_text().double().numpy(),
            "share": result.tensor._tensor.share.numpy().copy(),
            "count": result.count,
            "report": None if result.report is None else (result.report.accepted, len(result.report.rejected)),
        })
    return out


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 3])
def test_shares_become_an_mpc_tensor_in_real_party_processes(keys, spec, tmp_path, world_size):
    public, private = keys
    key_path = tmp_path / "keyholder.key"
    save_private_key(key_path, private)
    rng = np.random.default_rng(3)
    length = 20
    vectors = {f"c{i}": rng.uniform(-8, 8, length) for i in range(5)}
    messages = [make_contribution(public, spec, cid, r, v).to_bytes() for r in (1, 2) for cid, v in vectors.items()]
    messages.insert(2, b"not json")  # refused; the round goes on
    lonely = [make_contribution(public, spec, "c0", 3, vectors["c0"]).to_bytes()]
    spec_fields = {name: getattr(spec, name) for name in spec.__dataclass_fields__}
    rounds = [(1, length, messages[:6]), (2, length, messages[6:]), (3, length, lonely)]
    results = run_parties(_party_rounds, world_size, str(key_path), public.n, spec_fields, rounds)
    total = encoded_total(vectors.values(), spec)
    assert results[1][0]["report"] == (tuple(sorted(vectors)), 1)
    for rank, per_round in enumerate(results):
        for round_index, r in enumerate(per_round[:2]):
            assert r["count"] == 5
            np.testing.assert_array_equal(r["revealed"], total / 2**16)  # exact fixed point
            np.testing.assert_allclose(r["revealed"], np.sum(list(vectors.values()), axis=0), atol=5 * 2**-17)
            assert not np.any(r["share"] == total), (rank, round_index)
            assert np.all(np.abs(r["share"].astype(np.float64)) > 2**40), (rank, round_index)
        assert not np.any(per_round[0]["share"] == per_round[1]["share"])  # fresh every round
        # Round 3 has one contribution, below min_contributors: every rank reports the failure.
        assert "round 3" in per_round[2]["error"], per_round[2]
    for round_index in range(2):
        shares = [per_round[round_index]["share"] for per_round in results]
        assert np.array_equal(ring_sum(*shares), total)
