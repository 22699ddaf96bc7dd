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


def _received_during_private_step(session, rows, plan):
    """One private training step in real processes, recording every tensor this party receives."""
    from test_secure import _blocks, small_problem

    from mpc_rec.model import ModelState, TrainConfig, data_gradients, initial_parameters, train_epoch
    from mpc_rec.mpc.privacy import noised_item_aggregates, private_training_data
    from mpc_rec.mpc.sharing import share_public, share_rows

    rank = session.endpoint.rank
    ratings, mask = small_problem(sum(rows))
    r = share_rows(_blocks(rank, rows, ratings), rows, rank)
    m = share_rows(_blocks(rank, rows, mask), rows, rank, precision=0)
    config = TrainConfig(factors=3, epochs=1)
    data = private_training_data(r, m, midpoint=3.0, item_weight=5.0, item_step=1.0)
    state = ModelState(*[share_public(p) for p in initial_parameters(sum(rows), ratings.shape[1], config)])
    received = []
    comm = session.comm
    for name in ("all_reduce", "reduce", "broadcast", "recv", "all_gather", "gather"):
        original = getattr(comm, name)

        def recording(*args, _original=original, **kwargs):
            result = _original(*args, **kwargs)
            for item in result if isinstance(result, (list, tuple)) else [result]:
                if isinstance(item, torch.Tensor):
                    received.append(item.numpy().copy())  # numpy: torch tensors travel by shared memory
            return result

        setattr(comm, name, recording)
    aggregates = noised_item_aggregates(plan, factors=3)
    seen = {}

    def capturing(error, state):
        seen["noisy"] = aggregates(error, state)
        return seen["noisy"]

    train_epoch(state, data, config, lambda s, d: data_gradients(s, d, capturing))
    return received


def test_no_party_receives_the_un_noised_item_aggregates():
    from test_secure import small_problem

    from mpc_rec.dp.clipping import clip_contributions, per_user_step_contributions
    from mpc_rec.model import ModelState, TrainConfig, initial_parameters, predictions

    rows = [4, 3]
    plan = calibrate(target_epsilon=1.0, delta=1e-5, steps=1, clip=ClipBounds(step=1.0, mean=1.0),
                     dimension=9 * 4, parties=2, trusted_parties=1, mean_releases=0)
    received = run_parties(_received_during_private_step, 2, rows, plan)
    # The exact clipped item-side sums of that step, computed in the clear here.
    ratings, mask = small_problem(sum(rows))
    config = TrainConfig(factors=3, epochs=1)
    state = ModelState(*initial_parameters(sum(rows), ratings.shape[1], config))
    error = (mask * predictions(state, torch.tensor(3.0, dtype=torch.float64)).numpy() - ratings)
    contributions = clip_contributions(per_user_step_contributions(error, state.user_factors.numpy()), 0.95)
    exact = contributions.sum(axis=0)  # (I*K + I,)
    exact_factor = exact[: 9 * 3].reshape(9, 3)
    exact_bias = exact[9 * 3:]
    assert np.abs(exact_factor).max() > 0.05  # a real signal to look for
    for party_view in received:
        assert party_view, "recording saw no traffic"
        for tensor in party_view:
            values = tensor.astype(np.float64) / 2**16
            combined = np.concatenate([exact_factor, exact_bias[:, None]], axis=1)  # what is noised
            for target in (exact_factor, exact_bias, combined, combined.T):
                if tuple(values.shape) == target.shape:
                    assert not np.allclose(values, target, atol=0.02), "un-noised aggregate received"
