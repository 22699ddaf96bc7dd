#!/usr/bin/env python3
"""Paillier aggregation speed: naive phe (one ciphertext per value) vs the packed path.

Same workload for both: M contributors each send L values (uniform in [-1, 1]); each is
encrypted, the aggregator sums homomorphically, the key holder decrypts.
- naive: phe.encrypt per value (fixed precision 2^-16 so exponents match), EncryptedNumber
  sums, phe.decrypt per value: the total ends in the clear at the key holder.
- packed: mpc_rec.paillier end to end: encode + pack + encrypt, JSON bytes, the aggregator's
  checks, sum and mask, the key holder's decryption into its share. Contributors run one
  after another in this process (each vector is small, so it stays in-process).
Also timed: one large vector encrypted in-process vs across the available cores (this
process plus a spawned pool); on a busy shared machine that can be no faster.
Key generation is not timed. The last line printed is all figures as one JSON object.

    .venv/bin/python scripts/bench_paillier.py [--contributors 20] [--values 256] [--key-bits 2048]
"""

from __future__ import annotations

import argparse
import functools
import json
import operator
import sys
import time

import numpy as np
import phe.util
from phe import paillier

from mpc_rec.paillier import Aggregator, KeyHolder, PackingSpec, generate_keypair, make_contribution
from mpc_rec.paillier import _crypto
from mpc_rec.paillier.packing import encode


def naive(public, private, vectors):
    phe_public = paillier.PaillierPublicKey(public.n)
    phe_private = paillier.PaillierPrivateKey(phe_public, int(private._phe.p), int(private._phe.q))
    start = time.perf_counter()
    encrypted = [[phe_public.encrypt(float(v), precision=2**-16) for v in vector] for vector in vectors]
    encrypt_s = time.perf_counter() - start
    wire = [json.dumps([[format(c.ciphertext(), "x"), c.exponent] for c in row], separators=(",", ":")) for row in encrypted]
    start = time.perf_counter()
    sums = [functools.reduce(operator.add, column) for column in zip(*encrypted)]
    sum_s = time.perf_counter() - start
    start = time.perf_counter()
    totals = [phe_private.decrypt(c) for c in sums]
    decrypt_s = time.perf_counter() - start
    return {
        "encrypt_s": encrypt_s, "sum_s": sum_s, "decrypt_s": decrypt_s, "total_s": encrypt_s + sum_s + decrypt_s,
        "bytes_per_contributor_json": int(np.mean([len(w) for w in wire])),
        "bytes_per_contributor_raw": len(vectors[0]) * (2 * public.bits // 8),
        "totals": np.array(totals),
    }


def packed(public, private, spec, vectors):
    aggregator, key_holder = Aggregator(public, spec), KeyHolder(private, spec)
    length = len(vectors[0])
    start = time.perf_counter()
    messages = [make_contribution(public, spec, f"c{i}", 1, v).to_bytes() for i, v in enumerate(vectors)]
    encrypt_s = time.perf_counter() - start
    start = time.perf_counter()
    round_ = aggregator.open_round(1, length=length, deadline_s=600)
    for message in messages:
        round_.submit(message)
    result = round_.close()
    wire = result.masked_sum.to_bytes()
    aggregate_s = time.perf_counter() - start
    start = time.perf_counter()
    key_share = key_holder.decrypt(wire)
    decrypt_s = time.perf_counter() - start
    total = (key_share.values.astype(np.uint64) + result.share.values.astype(np.uint64)).view(np.int64)
    return {
        "encrypt_s": encrypt_s, "aggregate_s": aggregate_s, "decrypt_s": decrypt_s,
        "total_s": encrypt_s + aggregate_s + decrypt_s,
        "bytes_per_contributor_json": int(np.mean([len(m) for m in messages])),
        "bytes_per_contributor_raw": spec.chunks(length) * (2 * public.bits // 8),
        "aggregator_to_keyholder_bytes": len(wire),
        "totals_encoded": total,
    }


def parallel_demo(public, spec, length):
    values = np.random.default_rng(1).uniform(-1, 1, length)
    start = time.perf_counter()
    make_contribution(public, spec, "big", 1, values, workers=1)
    serial_s = time.perf_counter() - start
    start = time.perf_counter()
    make_contribution(public, spec, "big", 1, values)  # default: pool of the available cores
    parallel_s = time.perf_counter() - start
    return serial_s, parallel_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contributors", type=int, default=20)
    parser.add_argument("--values", type=int, default=256, help="values per contributor")
    parser.add_argument("--key-bits", type=int, default=2048, choices=[1024, 2048, 3072])
    parser.add_argument("--max-contributors", type=int, default=1024, help="packing headroom")
    parser.add_argument("--large-vector", type=int, default=8000, help="values in the parallel-encryption demo (0: skip)")
    args = parser.parse_args()

    public, private = generate_keypair(args.key_bits, allow_insecure_size=args.key_bits == 1024)
    spec = PackingSpec.for_range(1.0, key_bits=args.key_bits, max_contributors=args.max_contributors)
    rng = np.random.default_rng(0)
    vectors = [rng.uniform(-1, 1, args.values) for _ in range(args.contributors)]
    workload = args.contributors * args.values
    print(f"gmpy2: {phe.util.HAVE_GMP}, key {args.key_bits} bits, {args.contributors} contributors x {args.values} values, "
          f"cores {_crypto.available_cores()}")
    print(f"packing: value {spec.value_bits} bits, headroom {spec.headroom_bits}, mask {spec.mask_bits}, "
          f"slot {spec.slot_bits} bits, {spec.slots_per_ciphertext} slots per ciphertext")

    p = packed(public, private, spec, vectors)
    expected = np.sum([encode(v, spec) for v in vectors], axis=0)
    if not np.array_equal(p["totals_encoded"], expected):
        sys.exit("bench_paillier: packed totals are wrong")
    print(f"packed: encrypt {p['encrypt_s']:.2f} s, aggregate+mask {p['aggregate_s']:.2f} s, "
          f"key holder decrypt {p['decrypt_s']:.3f} s -> {workload / p['total_s']:.0f} values/s")

    n = naive(public, private, vectors)
    if not np.allclose(n["totals"], expected / 2**16, atol=args.contributors * 2**-16):
        sys.exit("bench_paillier: naive totals are wrong")
    print(f"naive:  encrypt {n['encrypt_s']:.2f} s, sum {n['sum_s']:.3f} s, decrypt {n['decrypt_s']:.2f} s "
          f"-> {workload / n['total_s']:.1f} values/s")

    figures = {
        "key_bits": args.key_bits, "gmpy2": bool(phe.util.HAVE_GMP), "contributors": args.contributors,
        "values_per_contributor": args.values, "slots_per_ciphertext": spec.slots_per_ciphertext,
        "slot_bits": spec.slot_bits,
        "naive_values_per_s": round(workload / n["total_s"], 1),
        "packed_values_per_s": round(workload / p["total_s"], 1),
        "speedup": round(n["total_s"] / p["total_s"], 1),
        "keyholder_decrypt_s": round(p["decrypt_s"], 4),
        "naive_keyholder_decrypt_s": round(n["decrypt_s"], 4),
        "bytes_per_contributor": {
            "packed_json": p["bytes_per_contributor_json"], "naive_json": n["bytes_per_contributor_json"],
            "packed_raw": p["bytes_per_contributor_raw"], "naive_raw": n["bytes_per_contributor_raw"],
        },
        "aggregator_to_keyholder_bytes": p["aggregator_to_keyholder_bytes"],
    }
    print(f"speedup {figures['speedup']}x; bytes per contributor: packed {p['bytes_per_contributor_json']} "
          f"(JSON) vs naive {n['bytes_per_contributor_json']} (JSON)")
    if args.large_vector:
        serial_s, parallel_s = parallel_demo(public, spec, args.large_vector)
        figures["large_vector"] = {"values": args.large_vector, "in_process_s": round(serial_s, 2),
                                   "parallel_s": round(parallel_s, 2), "speedup": round(serial_s / parallel_s, 2)}
        print(f"one vector of {args.large_vector} values: in-process {serial_s:.2f} s, "
              f"{_crypto.available_cores()} processes (this one and a spawned pool) {parallel_s:.2f} s")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
