"""Differential privacy inside the protocol: clip per user, add every party's noise.

User-level DP with joint-DP post-processing (see protocols/dp-noise.md):
- every training step, the item-side sums (E^T P and the column sums of E) are formed
  from per-user contributions clipped to L2 norm C on shares, and each compute party
  adds its own exact discrete Gaussian sample (OS CSPRNG) to its share of them before
  the step uses them; nothing depends on the un-noised sums;
- user-side state uses only the user's own data and the noised item side;
- the global mean is not estimated from data: it is the public midpoint of the rating
  scale (the biases absorb the rest), so it costs no budget;
- the test metric is one "mean" release: per-user (SSE, count) pairs clipped to C_eval
  (a user's squared errors per rating are about the size of the MSE, so both parts carry
  comparable signal), noised the same way, divided on shares; only the ratio is opened.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from mpc_rec.dp.clipping import clip_scale, mpc_clip_target
from mpc_rec.dp.noise import party_noise
from mpc_rec.model import ModelState, TrainingData, predictions
from mpc_rec.mpc.training import divide


# Squared norms over clip bound squared, x = ||g_u||^2 / C^2, span many orders of magnitude
# (C is often far below typical norms). One batched comparison finds each x's octave:
# b_j = [x > 2^j] for j = 1..OCTAVES; the bits are monotone in j, so the public-weight sum
# y0 = START (1 - sum_j b_j (c^(j-1) - c^j)), c = 2^-1/2, telescopes to START c^m for x in
# (2^m, 2^(m+1)], and y0 sqrt(x) lies in (START, START sqrt 2]. Newton's iteration for
# 1/sqrt(x) then gains quadratically: from the worst start (1.19 or 0.84 times the root)
# four steps reach 1e-5 relative, NEWTON_STEPS keep a margin for fixed-point rounding.
# In 16-bit fixed point y0 and y lose precision as x grows (y ~ 2^-10 is 64 units at
# x = 2^20, and the rounded weights add up to +-10 units), so the range stops at
# 2^(OCTAVES+1): a user beyond it (one more comparison bit) gets 0, i.e. no contribution
# that step, rather than a diverging iterate. ML-100K's users reach x ~ 2^18.5 at C = 0.1.
# Clipping aims 5% below C (or lower, for the fixed-point margin) and the hard bound in
# ``clip_scale`` sits at C, so rounding in the scale cannot push a clipped user over.
CLIP_SLACK = 0.95
OCTAVES = 20
START = 2.0**-0.25  # the geometric middle of (1, 2^-1/2]
NEWTON_STEPS = 5


def _octave_weights() -> torch.Tensor:
    c = 2.0**-0.5
    weights = [START * (c ** (j - 1) - c**j) for j in range(1, OCTAVES + 1)]
    return torch.tensor(weights + [0.0], dtype=torch.float64)  # the last bit only marks "out of range"


def wide_inv_sqrt(x: Any) -> Any:
    """1/sqrt(x) on shares for x in [1, 2^(OCTAVES+1)], 0 above (see above)."""
    thresholds = torch.tensor([2.0**j for j in range(1, OCTAVES + 2)], dtype=torch.float64)
    octaves = (x.unsqueeze(1) - thresholds).gt(0)  # one comparison for every user and octave
    # The bits are integer-encoded: a public float factor would be rounded to an integer,
    # so the weights enter as a fixed-point sharing (x * 0 + w) of public values.
    weights = x.unsqueeze(1) * 0 + _octave_weights()
    y = (octaves * weights).sum(1).neg() + START
    for _ in range(NEWTON_STEPS):
        y = y * (1.5 - ((x * y) * y) * 0.5)  # (x y) y keeps precision where y^2 would underflow
    return y * (1 - octaves[:, OCTAVES])


def add_own_noise(shared: Any, plan: Any, release: str) -> Any:
    """Add this party's noise to its own additive share: the opened sum carries all parties' noise."""
    noisy = shared.clone()
    noise = torch.from_numpy(party_noise(plan, tuple(shared.size()), release=release))
    noisy._tensor.share = noisy._tensor.share + noise
    return noisy


def private_training_data(ratings: Any, mask: Any, *, midpoint: float, item_weight: float, item_step: float) -> TrainingData:
    """Counts stay per user (own data); the item penalty weight and the mean are public.

    Clipped sums are much smaller than exact ones, so the item side takes ``item_step``
    times the common step: the hook scales the noised sums and this scales the item
    penalty, which together multiply the item gradient by item_step.
    """
    n_items = mask.size(1)
    weights = torch.full((n_items,), float(item_weight * item_step), dtype=torch.float64)
    return TrainingData(ratings, mask, mask.sum(1), weights, torch.tensor(midpoint, dtype=torch.float64))


def noised_item_aggregates(plan: Any, *, factors: int, item_step: float = 1.0) -> Callable[[Any, ModelState], tuple[Any, Any]]:
    """The ``model.train_epoch`` hook: clipped per-user contributions plus noise.

    User u's contribution is g_u = (e_u (x) p_u, e_u), ||g_u||^2 = |e_u|^2 (|p_u|^2 + 1);
    one scale s_u = min(1, C'/||g_u||) covers both sums, applied to P's rows and to the
    all-ones column, so both sums come from one matmul E^T [s*P | s]. C' sits below C
    (CLIP_SLACK and the fixed-point margin); the hard bound at C zeroes any user the
    approximate inverse square root failed to bring under C.
    """

    def aggregates(error: Any, state: ModelState) -> tuple[Any, Any]:
        n_items = error.size(1)
        bound = min(mpc_clip_target(plan.clip.step, dimension=n_items * (factors + 1)), CLIP_SLACK * plan.clip.step)
        p = state.user_factors
        norm_squared = (error * error).sum(1) * ((p * p).sum(1) + 1)
        scale = clip_scale(norm_squared, bound, hard_bound=plan.clip.step, inv_sqrt=wide_inv_sqrt)
        ones = scale.unsqueeze(1)
        combined = error.t().matmul(_cat([p * ones, ones], dim=1))  # I x (K + 1)
        noisy = add_own_noise(combined, plan, "step") * item_step  # post-processing
        return noisy[:, :factors], noisy[:, factors]

    return aggregates


def private_mse(state: ModelState, mean: Any, test_ratings: Any, test_mask: Any, plan: Any) -> Any:
    """Noised test MSE as a sharing: sum of clipped (SSE_u, n_u), noised, divided."""
    error = test_mask * predictions(state, mean) - test_ratings
    per_user_sse = (error * error).sum(1)
    counts = test_mask.sum(1)
    norm_squared = per_user_sse * per_user_sse + counts * counts
    bound = min(mpc_clip_target(plan.clip.mean, dimension=2), CLIP_SLACK * plan.clip.mean)
    scale = clip_scale(norm_squared, bound, hard_bound=plan.clip.mean, inv_sqrt=wide_inv_sqrt)
    pair = _cat([(per_user_sse * scale).sum().unsqueeze(0), (counts * scale).sum().unsqueeze(0)], dim=0)
    noisy = add_own_noise(pair, plan, "mean")
    n_users = test_mask.size(0)
    # The noisy count can be below 1 only when nearly no test data exists; clamp to the
    # divide routine's domain with a public floor rather than reveal anything about it.
    count = noisy[1] + 1.0
    # Each clipped count is at most C_eval, so the sum stays below n C_eval plus noise (all
    # N parties' noise, bounded at 20 sigma); a tight public bound keeps the fixed-point
    # quotient precise (the loose n x I bound quantised the MSE in ~1% steps).
    noise_bound = 20 * plan.mean_sigma_party * math.sqrt(plan.parties)
    count_max = int(math.ceil(n_users * plan.clip.mean + noise_bound)) + 1
    return divide(noisy[0], count, count_max=count_max, fixed_point=True)


def _cat(parts: list[Any], dim: int) -> Any:
    from mpc_rec.compat import import_crypten

    return import_crypten().cat(parts, dim=dim)
