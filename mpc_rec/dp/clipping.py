"""Per-user clipping and the sensitivity of the item-side aggregates (user-level DP).

Per training step the item side needs two sums over users, released (to the rest of the
protocol) only with noise added:

    item_factor_grad  G_Q[i] = sum_u s_u e_ui p_u     (I x K)
    item_bias_grad    G_c[i] = sum_u s_u e_ui         (I)

where e_ui = m_ui (pred_ui - r_ui) is 0 where u did not rate i, and s_u is user u's clip
scale. User u's contribution to the step is the concatenation g_u = (e_u. (x) p_u, e_u.),
of squared norm ||g_u||^2 = (sum_i e_ui^2) (||p_u||^2 + 1), so one scale
s_u = min(1, C / ||g_u||) applied to row u of E clips both aggregates at once (joint
clipping: the two sums together move by at most C when u's contribution is added).

Once per run the global mean needs (numerator, denominator) = sum_u s'_u (sum_i r_ui,
cnt_u), user u's pair clipped to L2 norm C_mean. Scaling the pair keeps each user's
own mean, so the estimate sum s' r / sum s' cnt is a weighted mean of the ratings.

Neighbouring data sets differ in all ratings of one user. The user set (n, and which
party holds whom) is public in mpc-rec, so the relation is *replace*: u's contribution
goes from g to g', ||g - g'|| <= 2C. ``add_remove`` (sensitivity C) is offered for a
deployment whose user set is itself private.

The functions ``step_norm_squared``, ``clip_scale``, ``clipped_step_aggregates`` and
their mean counterparts use only +, -, *, sum, matmul, t, unsqueeze and ``gt``, so they run
on float64 torch tensors and on CrypTen MPCTensors alike (like ``model.train_epoch``).
``clip_contributions`` is the independent plaintext reference used by the tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

NEIGHBOURING = {"replace": 2.0, "add_remove": 1.0}
STEP_AGGREGATES = ("item_factor_grad", "item_bias_grad")
MEAN_AGGREGATES = ("mean_numerator", "mean_denominator")


@dataclass(frozen=True)
class ClipBounds:
    """L2 bounds on one user's contribution: ``step`` (C) per training step, ``mean`` once."""

    step: float
    mean: float

    def __post_init__(self) -> None:
        for name in ("step", "mean"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"clip bound {name!r} must be a positive finite number, got {value!r}")


def sensitivity_factor(neighbouring: str) -> float:
    if neighbouring not in NEIGHBOURING:
        raise ValueError(f"unknown neighbouring relation {neighbouring!r}; expected one of {sorted(NEIGHBOURING)}")
    return NEIGHBOURING[neighbouring]


def sensitivities(bounds: ClipBounds, *, neighbouring: str = "replace") -> dict[str, float]:
    """L2 sensitivity of each released aggregate, and of each release as a whole.

    Each aggregate of a step moves by at most k*C, and so does their concatenation
    ("step", what is accounted: one noise scale on every coordinate), with k = 2 for
    replace and 1 for add/remove; likewise k*C_mean for the mean pair ("mean").
    """
    k = sensitivity_factor(neighbouring)
    out = {name: k * bounds.step for name in STEP_AGGREGATES}
    out.update({name: k * bounds.mean for name in MEAN_AGGREGATES})
    out["step"] = k * bounds.step
    out["mean"] = k * bounds.mean
    return out


# --- formulas for the MPC side (generic over torch tensors and MPCTensors) -----------


def _indicator_gt(x: Any, threshold: float) -> Any:
    """1.0 where x > threshold else 0.0: a float tensor in torch, a shared bit in CrypTen."""
    over = x.gt(threshold)
    dtype = getattr(over, "dtype", None)
    if dtype is not None and str(dtype) == "torch.bool":
        over = over.to(x.dtype)
    return over


def _inv_sqrt(x: Any) -> Any:
    if hasattr(x, "inv_sqrt"):  # CrypTen: Newton iteration, accurate for x in about [1, 150]
        return x.inv_sqrt()
    return x.rsqrt()


def step_norm_squared(error: Any, user_factors: Any) -> Any:
    """||g_u||^2 = (sum_i e_ui^2)(||p_u||^2 + 1) per user; ``error`` is E = M * S - R."""
    return (error * error).sum(1) * ((user_factors * user_factors).sum(1) + 1)


def mean_norm_squared(ratings: Any, mask: Any) -> Any:
    """||(sum_i r_ui, cnt_u)||^2 per user (ratings 0 where unobserved)."""
    total, count = ratings.sum(1), mask.sum(1)
    return total * total + count * count


def clip_scale(norm_squared: Any, bound: float, *, hard_bound: float | None = None, inv_sqrt: Any = None) -> Any:
    """s_u = min(1, bound / sqrt(norm_squared_u)), elementwise.

    Computed as 1 + [x > 1] (rsqrt(max(x, 1)) - 1) with x = norm_squared / bound^2, so the
    inverse square root only ever sees arguments >= 1 (``inv_sqrt`` replaces the default,
    CrypTen's, which is accurate only up to about 150). If ``hard_bound`` is given, a user
    whose scaled squared norm s^2 * norm_squared (as computed) exceeds hard_bound^2 gets
    s = 0: this turns an approximate inverse square root (MPC) into a guaranteed bound.
    """
    if not (math.isfinite(bound) and bound > 0):
        raise ValueError(f"bound must be positive and finite, got {bound!r}")
    x = norm_squared * (1.0 / (bound * bound))
    over = _indicator_gt(x, 1.0)
    at_least_one = over * (x - 1.0) + 1.0
    scale = over * ((inv_sqrt or _inv_sqrt)(at_least_one) - 1.0) + 1.0
    if hard_bound is not None:
        if not (math.isfinite(hard_bound) and hard_bound > 0):
            raise ValueError(f"hard_bound must be positive and finite, got {hard_bound!r}")
        # scale * (x * scale), not scale^2 * x: in fixed point scale^2 underflows
        scaled = (scale * (norm_squared * (1.0 / (hard_bound * hard_bound)))) * scale
        scale = scale * (1.0 - _indicator_gt(scaled, 1.0))
    return scale


def clipped_step_aggregates(error: Any, user_factors: Any, scale: Any) -> tuple[Any, Any]:
    """(sum_u s_u e_u. (x) p_u, sum_u s_u e_u.): the data parts of grad_Q and grad_c.

    The result must not be combined with data-dependent terms before noise is added:
    in particular not with the count-weighted regulariser lambda * cnt_i * q_i (cnt_i
    depends on every user); see protocols/dp-noise.md.
    """
    scaled = error * scale.unsqueeze(1)
    return scaled.t().matmul(user_factors), scaled.sum(0)


def clipped_mean_aggregates(ratings: Any, mask: Any, scale: Any) -> tuple[Any, Any]:
    """(sum_u s_u sum_i r_ui, sum_u s_u cnt_u): numerator and denominator of the mean."""
    return (ratings.sum(1) * scale).sum(), (mask.sum(1) * scale).sum()


def mpc_clip_target(
    bound: float, *, dimension: int, rounding_ulps: float = 2.0, frac_bits: int = 16
) -> float:
    """The bound to clip to on fixed-point shares so that the accounted bound C still holds.

    Fixed-point products round each coordinate of a user's clipped contribution (and of
    the aggregate) by up to ``rounding_ulps`` units of 2^-frac_bits; over ``dimension``
    coordinates that is at most rounding_ulps * sqrt(dimension) * 2^-frac_bits in L2.
    Clipping to C minus that margin keeps the integer vector the noise is added to within
    the sensitivity the accountant assumes. Raises if the margin eats the whole bound.
    """
    if dimension < 1:
        raise ValueError(f"dimension must be >= 1, got {dimension}")
    margin = rounding_ulps * math.sqrt(dimension) * 2.0**-frac_bits
    target = bound - margin
    if target <= 0.5 * bound:
        raise ValueError(
            f"clip bound {bound} is too small for fixed point: rounding margin {margin:.3g} "
            f"over {dimension} coordinates"
        )
    return target


# --- plaintext reference -------------------------------------------------------------


def clip_contributions(per_user_vectors, bound: float) -> np.ndarray:
    """Rows scaled to L2 norm at most ``bound`` (rows already within it are unchanged).

    Plaintext reference in float64 numpy: row u becomes v_u * min(1, bound / ||v_u||).
    """
    if not (math.isfinite(bound) and bound > 0):
        raise ValueError(f"bound must be positive and finite, got {bound!r}")
    v = np.asarray(per_user_vectors, dtype=np.float64)
    if v.ndim != 2:
        raise ValueError(f"per_user_vectors must be 2-D (users x coordinates), got shape {v.shape}")
    norms = np.sqrt((v * v).sum(axis=1))
    scale = np.minimum(1.0, bound / np.where(norms > 0, norms, 1.0))
    return v * scale[:, None]


def per_user_step_contributions(error, user_factors) -> np.ndarray:
    """Plaintext g_u = (e_u. (x) p_u flattened, e_u.) per user: (n, I*K + I) float64."""
    e = np.asarray(error, dtype=np.float64)
    p = np.asarray(user_factors, dtype=np.float64)
    outer = e[:, :, None] * p[:, None, :]
    return np.concatenate([outer.reshape(e.shape[0], -1), e], axis=1)
