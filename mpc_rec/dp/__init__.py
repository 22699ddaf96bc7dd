"""Differential privacy inside the protocol: noise, clipping, accounting, budget, reveals.

Guarantee: user-level (epsilon, delta)-DP for the item-side model (replace-one-user
neighbours), joint DP for what each user is shown. Specification: protocols/dp-noise.md.

- ``sampling``: exact discrete Gaussian sampler (Canonne-Kamath-Steinke) on the OS CSPRNG.
- ``noise``: one party's noise for a release, as fixed-point ring integers.
- ``clipping``: per-user clipping formulas and sensitivities.
- ``accounting``: ``NoisePlan``, ``calibrate``, ``epsilon_spent``, accountant registry
  (needs ``dp-accounting``, imported lazily).
- ``ledger``: per-deployment budget ledger.
- ``reveal``: tags and ``guard_reveal``.
"""

from mpc_rec.dp.accounting import (
    NoisePlan,
    Release,
    UnknownAccountantError,
    calibrate,
    create_accountant,
    epsilon_spent,
)
from mpc_rec.dp.clipping import (
    ClipBounds,
    clip_contributions,
    clip_scale,
    clipped_mean_aggregates,
    clipped_step_aggregates,
    mean_norm_squared,
    mpc_clip_target,
    sensitivities,
    step_norm_squared,
)
from mpc_rec.dp.ledger import (
    BudgetExceeded,
    LedgerError,
    check_and_reserve,
    create_ledger,
    format_ledger,
    ledger_digest,
    load_ledger,
    reserve_for_plan,
)
from mpc_rec.dp.noise import party_noise
from mpc_rec.dp.reveal import (
    UnnoisedRevealError,
    declare_public,
    guard_reveal,
    noised,
)
from mpc_rec.dp.sampling import (
    representable_variance,
    sample_discrete_gaussian,
    sample_discrete_gaussian_reference,
)

__all__ = [
    "BudgetExceeded", "ClipBounds", "LedgerError", "NoisePlan", "Release", "UnknownAccountantError",
    "UnnoisedRevealError", "calibrate", "check_and_reserve", "clip_contributions", "clip_scale",
    "clipped_mean_aggregates", "clipped_step_aggregates", "create_accountant", "create_ledger",
    "declare_public", "epsilon_spent", "format_ledger", "guard_reveal", "ledger_digest",
    "load_ledger", "mean_norm_squared", "mpc_clip_target", "noised", "party_noise",
    "representable_variance", "reserve_for_plan", "sample_discrete_gaussian",
    "sample_discrete_gaussian_reference", "sensitivities", "step_norm_squared",
]
