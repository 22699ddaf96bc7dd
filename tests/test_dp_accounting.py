"""mpc_rec.dp.accounting: calibration pinned against dp-accounting itself."""

import dataclasses
import math

import pytest

from mpc_rec.dp import accounting, sampling
from mpc_rec.dp.accounting import NoisePlan
from mpc_rec.dp.clipping import ClipBounds
from mpc_rec.errors import ConfigError

from test_dp import make_plan

dp_accounting = pytest.importorskip("dp_accounting", reason="dp-accounting==0.6.0 is not installed")



def test_registry_knows_rdp_and_pld_and_refuses_other_names():
    assert accounting.create_accountant("rdp").name == "rdp"
    assert accounting.create_accountant("pld").rigorous is False
    with pytest.raises(accounting.UnknownAccountantError, match="unknown accountant"):
        accounting.create_accountant("moments")
    assert issubclass(accounting.UnknownAccountantError, ValueError)
    assert issubclass(accounting.UnknownAccountantError, ConfigError)


def direct_rdp_epsilon(plan: NoisePlan, steps: int | None = None) -> float:
    """Independent of our events: for T honest parties with huge sigma, tau = 0 and each
    release is rho-zCDP with rho = sensitivity^2 / (2 sigma_total^2)."""
    sens = plan.sensitivities
    rho_step = sens["step"] ** 2 / (2 * plan.sigma_total**2)
    rho_mean = sens["mean"] ** 2 / (2 * plan.mean_sigma_total**2)
    acc = dp_accounting.rdp.RdpAccountant()
    acc.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.ZCDpEvent(rho_step), steps or plan.steps))
    if plan.mean_releases:
        acc.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.ZCDpEvent(rho_mean), plan.mean_releases))
    return acc.get_epsilon(plan.delta)


@pytest.mark.parametrize("target", [1.0, 4.0])
def test_calibration_is_pinned_to_dp_accounting_and_tight(target):
    plan = accounting.calibrate(target_epsilon=target, delta=1e-5, steps=30,
                                clip=ClipBounds(step=1.0, mean=2.0), dimension=1682 * 17, parties=2)
    assert plan.epsilon <= target and plan.epsilon == pytest.approx(target, rel=2e-3)
    assert plan.epsilon == pytest.approx(direct_rdp_epsilon(plan), rel=1e-9)
    assert accounting.epsilon_spent(plan) == plan.epsilon
    smaller = dataclasses.replace(
        plan,
        party_variance_units=sampling.representable_variance(int(plan.party_variance_units * 0.998**2)),
        mean_party_variance_units=sampling.representable_variance(int(plan.mean_party_variance_units * 0.998**2)),
    )
    assert accounting.epsilon_spent(smaller) > target  # 0.1% less sigma would break the target
    assert plan.mean_sigma_total == pytest.approx(2 * plan.sigma_total, rel=1e-5)  # same z, twice the bound


def test_rdp_epsilon_pinned_for_noise_multiplier_one_over_100_steps():
    plan = make_plan(2.0, steps=100, mean_releases=0)  # replace: sensitivity 2C = 2, so z = 1
    assert plan.party_variance_units == 2**34  # exactly (2 * 2^16)^2, no rounding
    assert plan.noise_multiplier == 1.0
    eps = accounting.epsilon_spent(plan)
    acc = dp_accounting.rdp.RdpAccountant()  # same as the continuous Gaussian's RDP at T = 1
    acc.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(1.0), 100))
    assert eps == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)
    assert eps == pytest.approx(96.1, abs=0.05)  # NOTES.md


def test_trust_changes_per_party_noise_not_the_guarantee():
    common = dict(target_epsilon=2.0, delta=1e-5, steps=30, clip=ClipBounds(step=1.0, mean=1.0),
                  dimension=500, parties=3)
    one = accounting.calibrate(**common, trusted_parties=1)
    two = accounting.calibrate(**common, trusted_parties=2)
    assert two.sigma_total == pytest.approx(one.sigma_total, rel=2e-4)
    assert two.sigma_party == pytest.approx(one.sigma_total / math.sqrt(2), rel=2e-4)
    assert "at least 2 of the 3" in two.trust_assumption


def test_kls_correction_enters_rho_and_xi():
    assert accounting.kls_tau(1e6, 1) == 0.0
    tau = accounting.kls_tau(0.25, 2)
    assert tau == pytest.approx(10 * math.exp(-2 * math.pi**2 * 0.25 / 2))
    release = accounting.Release("step", 1.0, 0.25, 2, 10, 1)
    rho, xi = accounting.zcdp_parameters(release)
    assert rho == pytest.approx(1.0 / (2 * 2 * 0.25) + tau * 10 / 4)
    assert xi == pytest.approx(tau * 10)
    with pytest.raises(ValueError):
        accounting.Release("step", 1.0, 0.2, 2, 10, 1)  # KLS needs sigma >= 1/2


def test_pld_needs_explicit_consent_and_matches_the_library():
    common = dict(target_epsilon=4.0, delta=1e-5, steps=30, clip=ClipBounds(step=1.0, mean=1.0),
                  dimension=100, parties=2, mean_releases=0)
    with pytest.raises(ConfigError, match="approximation"):
        accounting.calibrate(**common, accountant="pld")
    plan = accounting.calibrate(**common, accountant="pld", allow_approximate_accounting=True,
                                rel_tolerance=1e-3)
    assert plan.rigorous is False and plan.epsilon <= 4.0
    acc = dp_accounting.pld.PLDAccountant()
    acc.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(plan.noise_multiplier), 30))
    assert plan.epsilon == pytest.approx(acc.get_epsilon(1e-5), rel=1e-4)
    rdp = accounting.calibrate(**common)
    assert plan.sigma_total < rdp.sigma_total  # PLD is tighter (but not a theorem here)


def test_epsilon_spent_grows_with_steps_and_checks_its_range():
    plan = make_plan(40.0)
    spent = [accounting.epsilon_spent(plan, steps=s) for s in (0, 1, 10, 30)]
    assert spent == sorted(spent) and spent[0] > 0  # the mean release is spent up front
    assert spent[-1] == pytest.approx(direct_rdp_epsilon(plan), rel=1e-9)
    with pytest.raises(ValueError):
        accounting.epsilon_spent(plan, steps=31)


def test_calibration_rejects_bad_requests():
    base = dict(target_epsilon=1.0, delta=1e-5, steps=30, clip=ClipBounds(step=1.0, mean=1.0),
                dimension=10, parties=2)
    for change in ({"delta": 0.0}, {"target_epsilon": -1.0}, {"steps": 0}, {"trusted_parties": 3}):
        with pytest.raises(ConfigError):
            accounting.calibrate(**{**base, **change})
    with pytest.raises(accounting.UnknownAccountantError):
        accounting.calibrate(**base, accountant="gdp")


def test_plan_is_immutable_and_round_trips_through_its_record():
    plan = make_plan(10.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.steps = 3
    record = plan.to_dict()
    assert record["derived"]["sigma_total"] == pytest.approx(10.0)
    assert record["derived"]["granularity"] == 2.0**-16
    again = NoisePlan.from_dict(record)
    assert again == plan and again.digest() == plan.digest()
    with pytest.raises(ConfigError, match="rigorous"):
        NoisePlan.from_dict({**record, "accountant": "pld"})  # still claims rigorous
    with pytest.raises(ConfigError):
        NoisePlan.from_dict({**record, "mechanism": "gaussian"})
