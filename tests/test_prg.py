"""The AES-CTR generator that replaces torch's Mersenne Twister inside CrypTen."""

import numpy as np
import torch
from scipy import stats

from mpc_harness import run_parties
from mpc_rec.mpc import prg


def test_same_seed_same_stream_and_shapes():
    a, b = torch.Generator().manual_seed(12345), torch.Generator().manual_seed(12345)
    x = prg.random_ring_elements((3, 4), generator=a)
    assert x.shape == (3, 4) and x.dtype == torch.int64
    assert torch.equal(x, prg.random_ring_elements(torch.Size([3, 4]), generator=b))
    assert not torch.equal(prg.random_ring_elements(12, generator=a).reshape(3, 4), x)  # stream moves on
    assert prg.random_ring_elements((0, 5), generator=a).shape == (0, 5)


def test_output_is_not_torch_mersenne_twister():
    g = torch.Generator().manual_seed(7)
    mt = torch.randint(-(2**63), 2**63 - 1, (64,), generator=torch.Generator().manual_seed(7))
    assert not torch.equal(prg.random_ring_elements(64, generator=g), mt)


def test_bits_are_uniform():
    g = torch.Generator().manual_seed(99)
    values = prg.random_ring_elements(20_000, generator=g).numpy().view(np.uint64)
    ones = [int(((values >> np.uint64(bit)) & np.uint64(1)).sum()) for bit in range(64)]
    # each bit ~ Binomial(20000, 1/2); chi-square over the 64 bit counts
    chi2 = sum((c - 10_000) ** 2 / 5_000 for c in ones)
    assert stats.chi2.sf(chi2, df=64) > 1e-4
    small = prg.random_bits(20_000, bitlength=3, generator=g).numpy()
    assert small.min() >= 0 and small.max() <= 7
    assert stats.chisquare(np.bincount(small, minlength=8)).pvalue > 1e-4


def _generator_in_use(session):
    import crypten.common.rng as rng
    import crypten.mpc.provider.ttp_provider as ttp

    local = prg.random_ring_elements(4)
    return rng.generate_random_ring_element is prg.random_ring_elements, ttp.generate_random_ring_element is prg.random_ring_elements, local


def test_parties_use_it_and_local_streams_differ():
    results = run_parties(_generator_in_use, 2)
    assert all(r[0] and r[1] for r in results)
    assert not torch.equal(results[0][2], results[1][2])


def test_bound_key_replaces_the_seed():
    key = bytes(range(32))
    a, b, c = (torch.Generator().manual_seed(5) for _ in range(3))
    prg.bind_key(a, key)
    prg.bind_key(b, key)
    x = prg.random_ring_elements(16, generator=a)
    assert torch.equal(x, prg.random_ring_elements(16, generator=b))  # same key: same stream at both ends
    assert not torch.equal(x, prg.random_ring_elements(16, generator=c))  # the seed alone no longer decides
    a.manual_seed(6)  # a reseeded generator starts a new stream, never the old one again
    assert not torch.equal(prg.random_ring_elements(16, generator=a), x)
