"""Noise calibration and privacy accounting for the distributed discrete Gaussian.

Shapes follow dp-accounting: a run is described by immutable ``Release`` values (what
was noised, with what sensitivity and per-party variance, how often); an accountant
turns them into dp-accounting events and asks dp-accounting for epsilon. No
composition maths lives here.

Per release, the honest parties' noise is a sum of ``trusted_parties`` independent
N_Z(0, V) vectors (ring units). Kairouz, Liu and Steinke ("The Distributed Discrete
Gaussian Mechanism for Federated Learning with Secure Aggregation", ICML 2021) bound its
Renyi divergence for an integer shift Delta in Z^d by
    D_alpha <= alpha * ||Delta||^2 / (2 T V) + tau * d,
    tau = 10 * sum_{k=1}^{T-1} exp(-2 pi^2 V k / (k + 1))
(for T = 1, tau = 0 and it is Canonne-Kamath-Steinke's bound for one discrete Gaussian).
The ``rdp`` accountant composes ZCDpEvent(rho = Delta^2/(2 T V) + tau d / 4, xi = tau d),
which dominates that bound and also the (1/2) eps^2-CDP form of the paper's theorem
(rho = Delta^2/(2TV) + tau d/4); see protocols/dp-noise.md. For our variances (sigma of
at least 2^16 ring units) tau underflows to 0, and rho is rounded up one ulp.

The ``pld`` accountant prices the *continuous* Gaussian with the honest total variance.
That is tighter but is not a theorem for the discrete sum, so calibrating with it must
be asked for by name (``allow_approximate_accounting=True``) and the plan says so.
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import json
import math
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import Any, ClassVar

from mpc_rec.dp.clipping import NEIGHBOURING, ClipBounds, sensitivities
from mpc_rec.dp.sampling import is_representable, representable_variance
from mpc_rec.errors import ConfigError, MpcRecError

try:  # a declared dependency; imported here only, so sampling and the ledger work without it
    import dp_accounting
except ImportError:  # pragma: no cover - exercised only where it is missing
    dp_accounting = None

MECHANISM = "distributed-discrete-gaussian"
FRAC_BITS = 16


class UnknownAccountantError(ConfigError, ValueError):
    """An accountant name that is not in the registry."""


def _library():
    if dp_accounting is None:
        raise MpcRecError("privacy accounting needs dp-accounting: pip install dp-accounting==0.6.0")
    return dp_accounting


# --- immutable descriptions ----------------------------------------------------------


@dataclass(frozen=True)
class Release:
    """One kind of noised release, composed ``count`` times. All sizes in ring units."""

    name: str
    sensitivity_units: float  # L2 bound on the change of the integer vector noise is added to
    party_variance_units: float  # variance of each honest party's discrete Gaussian
    honest_parties: int
    dimension: int
    count: int

    def __post_init__(self) -> None:
        if self.honest_parties < 1 or self.dimension < 1 or self.count < 0:
            raise ValueError(f"invalid release description {self}")
        if not (self.sensitivity_units > 0 and self.party_variance_units >= 0.25):
            raise ValueError(f"invalid release description {self} (KLS needs sigma >= 1/2)")


def kls_tau(party_variance_units: float, honest_parties: int) -> float:
    """tau = 10 sum_{k=1}^{T-1} exp(-2 pi^2 V k / (k+1)) (0 for T = 1)."""
    return 10.0 * math.fsum(
        math.exp(-2.0 * math.pi**2 * party_variance_units * k / (k + 1)) for k in range(1, honest_parties)
    )


def zcdp_parameters(release: Release) -> tuple[float, float]:
    """(rho, xi) of one release per Kairouz-Liu-Steinke, rounded up."""
    tau = kls_tau(release.party_variance_units, release.honest_parties)
    rho = release.sensitivity_units**2 / (2.0 * release.honest_parties * release.party_variance_units)
    rho = math.nextafter(rho + tau * release.dimension / 4.0, math.inf)
    xi = math.nextafter(tau * release.dimension, math.inf) if tau > 0 else 0.0
    return rho, xi


# --- accountants: one interface, a registry keyed by name -----------------------------


class Accountant(abc.ABC):
    name: ClassVar[str]
    rigorous: ClassVar[bool]  # a theorem for the distributed discrete Gaussian, or an approximation

    @abc.abstractmethod
    def event(self, release: Release) -> Any:
        """The dp-accounting event for ``release`` composed ``release.count`` times."""

    @abc.abstractmethod
    def _fresh(self) -> Any:
        """A new dp-accounting PrivacyAccountant."""

    def epsilon(self, releases, *, delta: float) -> float:
        lib = _library()
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        accountant = self._fresh()
        accountant.compose(lib.ComposedDpEvent([self.event(r) for r in releases if r.count > 0]))
        return float(accountant.get_epsilon(delta))


class RdpAccountant(Accountant):
    """Renyi DP of zCDP events (KLS bound): rigorous for the discrete mechanism."""

    name = "rdp"
    rigorous = True

    def event(self, release: Release) -> Any:
        lib = _library()
        rho, xi = zcdp_parameters(release)
        return lib.SelfComposedDpEvent(lib.ZCDpEvent(rho=rho, xi=xi), release.count)

    def _fresh(self) -> Any:
        return _library().rdp.RdpAccountant()


class PldAccountant(Accountant):
    """PLD of the continuous Gaussian with the honest total variance: an approximation."""

    name = "pld"
    rigorous = False

    def event(self, release: Release) -> Any:
        lib = _library()
        multiplier = math.sqrt(release.honest_parties * release.party_variance_units) / release.sensitivity_units
        return lib.SelfComposedDpEvent(lib.GaussianDpEvent(noise_multiplier=multiplier), release.count)

    def _fresh(self) -> Any:
        return _library().pld.PLDAccountant()


_ACCOUNTANTS: dict[str, type[Accountant]] = {"rdp": RdpAccountant, "pld": PldAccountant}


def create_accountant(name: str) -> Accountant:
    if name in _ACCOUNTANTS:
        return _ACCOUNTANTS[name]()
    raise UnknownAccountantError(f"unknown accountant {name!r}; expected one of {sorted(_ACCOUNTANTS)}")


# --- the plan ------------------------------------------------------------------------


@dataclass(frozen=True)
class NoisePlan:
    """What the noise of a run is and what it buys. Record it with the run.

    Sigmas are in value units (the real numbers the fixed-point shares encode) and
    apply to every coordinate of every noised aggregate; ``*_variance_units`` are the
    exact integer variances (units of ``granularity`` squared) each party samples with.
    """

    accountant: str
    target_epsilon: float
    epsilon: float
    delta: float
    steps: int
    mean_releases: int
    clip: ClipBounds
    dimension: int
    parties: int
    trusted_parties: int
    party_variance_units: int
    mean_party_variance_units: int
    neighbouring: str = "replace"
    frac_bits: int = FRAC_BITS
    mechanism: str = MECHANISM
    rigorous: bool = True

    def __post_init__(self) -> None:
        problems = []
        if not 1 <= self.trusted_parties <= self.parties:
            problems.append(f"trusted_parties must be in 1..parties ({self.trusted_parties} of {self.parties})")
        if self.steps < 1 or self.mean_releases < 0 or self.dimension < 1:
            problems.append("steps >= 1, mean_releases >= 0 and dimension >= 1 are required")
        if not (0 < self.delta < 1 and self.epsilon > 0):
            problems.append(f"epsilon > 0 and 0 < delta < 1 are required ({self.epsilon}, {self.delta})")
        if self.mechanism != MECHANISM:
            problems.append(f"unknown mechanism {self.mechanism!r}")
        if self.neighbouring not in NEIGHBOURING:
            problems.append(f"unknown neighbouring relation {self.neighbouring!r}")
        if self.accountant not in _ACCOUNTANTS:
            problems.append(f"unknown accountant {self.accountant!r}")
        elif self.rigorous != _ACCOUNTANTS[self.accountant].rigorous:
            problems.append(f"accountant {self.accountant!r} is {'not ' * self.rigorous}rigorous")
        if not (is_representable(self.party_variance_units) and is_representable(self.mean_party_variance_units)):
            problems.append("party variances must be integers from representable_variance (ring units squared)")
        if problems:
            raise ConfigError("invalid noise plan: " + "; ".join(problems))

    # derived quantities
    @property
    def granularity(self) -> float:
        return 2.0**-self.frac_bits

    @property
    def sigma_party(self) -> float:
        return math.sqrt(self.party_variance_units) * self.granularity

    @property
    def sigma_total(self) -> float:
        """Std of the honest parties' summed noise per coordinate (all N honest: more)."""
        return math.sqrt(self.trusted_parties * self.party_variance_units) * self.granularity

    @property
    def mean_sigma_party(self) -> float:
        return math.sqrt(self.mean_party_variance_units) * self.granularity

    @property
    def mean_sigma_total(self) -> float:
        return math.sqrt(self.trusted_parties * self.mean_party_variance_units) * self.granularity

    @property
    def noise_multiplier(self) -> float:
        """sigma_total / step sensitivity (after rounding the variance up)."""
        return self.sigma_total / self.sensitivities["step"]

    @property
    def sensitivities(self) -> dict[str, float]:
        return sensitivities(self.clip, neighbouring=self.neighbouring)

    @property
    def trust_assumption(self) -> str:
        return (
            f"at least {self.trusted_parties} of the {self.parties} compute parties sample their "
            "noise with a CSPRNG, add it as specified and keep it secret"
        )

    def releases(self, *, steps: int | None = None) -> tuple[Release, ...]:
        steps = self.steps if steps is None else steps
        if not 0 <= steps <= self.steps:
            raise ValueError(f"steps must be in 0..{self.steps}, got {steps}")
        scale = 2.0**self.frac_bits
        sens = self.sensitivities
        return (
            Release("step", sens["step"] * scale, self.party_variance_units, self.trusted_parties,
                    self.dimension, steps),
            Release("mean", sens["mean"] * scale, self.mean_party_variance_units, self.trusted_parties,
                    2, self.mean_releases),
        )

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["derived"] = {
            "noise_multiplier": self.noise_multiplier,
            "granularity": self.granularity,
            "sigma_party": self.sigma_party,
            "sigma_total": self.sigma_total,
            "mean_sigma_party": self.mean_sigma_party,
            "mean_sigma_total": self.mean_sigma_total,
            "sensitivities": self.sensitivities,
            "trust_assumption": self.trust_assumption,
        }
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "NoisePlan":
        data = dict(data)
        data.pop("derived", None)
        try:
            data["clip"] = ClipBounds(**data["clip"])
            return cls(**data)
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"invalid noise plan record: {exc}") from None

    def digest(self) -> str:
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()


# --- calibration ---------------------------------------------------------------------


def _releases_for(multiplier: float, *, clip, neighbouring, trusted_parties, dimension, steps,
                  mean_releases, frac_bits) -> tuple[Release, ...]:
    """Releases for noise multiplier z before rounding: honest total sigma = z * sensitivity."""
    scale = 2.0**frac_bits
    sens = sensitivities(clip, neighbouring=neighbouring)
    out = []
    for name, dim, count in (("step", dimension, steps), ("mean", 2, mean_releases)):
        delta_units = sens[name] * scale
        party_var = (multiplier * delta_units) ** 2 / trusted_parties
        out.append(Release(name, delta_units, party_var, trusted_parties, dim, count))
    return tuple(out)


def calibrate(
    *,
    target_epsilon: float,
    delta: float,
    steps: int,
    clip: ClipBounds,
    dimension: int,
    parties: int,
    trusted_parties: int = 1,
    mean_releases: int = 1,
    neighbouring: str = "replace",
    accountant: str = "rdp",
    frac_bits: int = FRAC_BITS,
    rel_tolerance: float = 1e-4,
    allow_approximate_accounting: bool = False,
) -> NoisePlan:
    """The smallest noise (to ``rel_tolerance``) whose run meets (target_epsilon, delta).

    Bisection on the noise multiplier z = sigma_total / sensitivity, asking the named
    dp-accounting accountant for epsilon at each z; then each party's variance is
    rounded *up* to what the exact sampler draws, and epsilon is recomputed for that.
    ``dimension``: coordinates noised per step (I*K + I for item factors and biases).
    """
    acc = create_accountant(accountant)
    if not acc.rigorous and not allow_approximate_accounting:
        raise ConfigError(
            f"accountant {accountant!r} is an approximation for the discrete mechanism; "
            "pass allow_approximate_accounting=True to use it anyway"
        )
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ConfigError(f"target epsilon must be positive, got {target_epsilon}")
    if not 0 < delta < 1:
        raise ConfigError(f"delta must be in (0, 1), got {delta}")
    if steps < 1 or mean_releases < 0 or dimension < 1:
        raise ConfigError("steps >= 1, mean_releases >= 0 and dimension >= 1 are required")
    if not 1 <= trusted_parties <= parties:
        raise ConfigError(f"trusted_parties must be in 1..{parties}, got {trusted_parties}")
    if not 0 < rel_tolerance < 0.1:
        raise ValueError(f"rel_tolerance must be in (0, 0.1), got {rel_tolerance}")
    shape = dict(clip=clip, neighbouring=neighbouring, trusted_parties=trusted_parties,
                 dimension=dimension, steps=steps, mean_releases=mean_releases, frac_bits=frac_bits)

    def eps(z: float) -> float:
        return acc.epsilon(_releases_for(z, **shape), delta=delta)

    lo, hi = 0.5, 1.0
    while eps(hi) > target_epsilon:
        lo, hi = hi, hi * 2.0
        if hi > 1e9:
            raise ConfigError(f"no noise level reaches epsilon {target_epsilon} at delta {delta}")
    while eps(lo) <= target_epsilon:
        lo, hi = lo / 2.0, lo
        if lo < 1e-9:
            break
    while hi / lo - 1.0 > rel_tolerance:
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if eps(mid) <= target_epsilon else (mid, hi)

    scale = 2.0**frac_bits
    sens = sensitivities(clip, neighbouring=neighbouring)
    for _ in range(20):  # rounding up only adds noise; the loop guards PLD discretisation wobble
        party_var = {
            name: representable_variance(Fraction((hi * sens[name] * scale) ** 2) / trusted_parties)
            for name in ("step", "mean")
        }
        plan = NoisePlan(
            accountant=accountant, target_epsilon=target_epsilon, epsilon=target_epsilon,
            delta=delta, steps=steps, mean_releases=mean_releases, clip=clip, dimension=dimension,
            parties=parties, trusted_parties=trusted_parties,
            party_variance_units=party_var["step"], mean_party_variance_units=party_var["mean"],
            neighbouring=neighbouring, frac_bits=frac_bits, rigorous=acc.rigorous,
        )
        achieved = epsilon_spent(plan)
        if achieved <= target_epsilon:
            return dataclasses.replace(plan, epsilon=achieved)
        hi *= 1.0 + rel_tolerance
    raise MpcRecError(f"calibration failed: epsilon {achieved} > target {target_epsilon}")


def epsilon_spent(plan: NoisePlan, *, steps: int | None = None, delta: float | None = None) -> float:
    """Epsilon of the plan's run (or of its first ``steps`` steps) at ``delta`` (default the plan's).

    The one-off mean release counts in full whenever it is in the plan.
    """
    acc = create_accountant(plan.accountant)
    return acc.epsilon(plan.releases(steps=steps), delta=plan.delta if delta is None else delta)
