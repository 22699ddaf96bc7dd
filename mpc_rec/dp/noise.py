"""Each party's share of the noise, as ring elements ready to add in MPC.

A party calls ``party_noise(plan, shape)`` once per noised aggregate per release and
either adds the result to its own additive share of the aggregate (no communication;
the sum of all shares then carries every party's noise) or secret-shares it and adds
the sharing. Values are int64 in units of 2^-frac_bits, i.e. exactly the fixed-point
encoding CrypTen uses, and are added with int64 (mod 2^64) arithmetic.
"""

from __future__ import annotations

import math

import numpy as np

from mpc_rec.dp.sampling import sample_discrete_gaussian

RING_BITS = 64


def party_noise(plan, shape, *, release: str = "step") -> np.ndarray:
    """This party's exact discrete Gaussian noise for one release, from the OS CSPRNG.

    ``release`` is "step" (item-factor and item-bias gradient sums) or "mean" (global mean
    numerator and denominator). No random source can be passed: production noise always
    comes from ``os.urandom``.
    """
    if release == "step":
        variance = plan.party_variance_units
    elif release == "mean":
        variance = plan.mean_party_variance_units
    else:
        raise ValueError(f"release must be 'step' or 'mean', got {release!r}")
    shape = tuple(int(d) for d in (shape if isinstance(shape, (tuple, list)) else (shape,)))
    size = math.prod(shape)
    noise = sample_discrete_gaussian(variance, size).reshape(shape)
    headroom = 1 << (RING_BITS - 2)  # noise stays far inside the ring (|x| < 2^62)
    if size and int(np.abs(noise).max()) >= headroom:  # probability < exp(-2^60 / V)
        raise OverflowError("noise sample outside the ring's headroom")
    return noise
