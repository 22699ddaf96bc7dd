"""The noise the protocol actually adds, measured in real party processes."""

import numpy as np
import pytest
import torch
from scipy import stats

from mpc_harness import run_parties
from mpc_rec.dp.accounting import calibrate
from mpc_rec.dp.clipping import ClipBounds
from mpc_rec.dp.reveal import RevealLog, declare_public
from mpc_rec.mpc.privacy import add_own_noise
from mpc_rec.mpc.reveal import open_to_all

SIZE = 20_000


def _plan(parties, trusted):
    return calibrate(target_epsilon=50.0, delta=1e-5, steps=2, clip=ClipBounds(step=0.01, mean=0.01),
                     dimension=SIZE, parties=parties, trusted_parties=trusted, mean_releases=0)


def _noise_of_zero(session, plan):
    import crypten

    zero = crypten.cryptensor(torch.zeros(SIZE, dtype=torch.float64), src=0)
    noisy = add_own_noise(zero, plan, "step")
    opened = open_to_all(declare_public(noisy, reason="test: measuring the protocol's noise"), name="noise", log=RevealLog())
    return np.rint(opened.numpy() * 2**16).astype(np.int64)  # back to ring units


@pytest.mark.parametrize("parties,trusted", [(2, 1), (2, 2), (3, 1), (3, 2), (3, 3)])
def test_summed_noise_has_the_planned_distribution(parties, trusted):
    plan = _plan(parties, trusted)
    noise = run_parties(_noise_of_zero, parties, plan)[0]
    # every party adds its own sample, so the opened sum has parties x the party variance
    expected_variance = parties * plan.party_variance_units
    assert plan.party_variance_units == pytest.approx(plan.sigma_total**2 / trusted * 2**32, rel=0.02)
    sample_variance = noise.var(ddof=1)
    chi2 = (SIZE - 1) * sample_variance / expected_variance
    p_lower = stats.chi2.cdf(chi2, SIZE - 1)  # two-sided variance test at the 0.1% level
    assert 0.0005 < p_lower < 0.9995, (sample_variance, expected_variance)
    assert abs(noise.mean()) < 5 * np.sqrt(expected_variance / SIZE)
    # the sum of discrete Gaussians with large variance is close to a normal law
    assert stats.kstest(noise / np.sqrt(expected_variance), "norm").pvalue > 1e-4


def test_trusting_more_parties_lowers_each_partys_noise():
    assert _plan(3, 3).party_variance_units < _plan(3, 1).party_variance_units / 2.5
