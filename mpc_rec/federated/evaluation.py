"""The federated mode's evaluation round: test metrics released through MPC, with DP noise.

After the last training round each holder evaluates its own users against the final
release and sends one more Paillier contribution (round R, the training rounds being
0..R-1): the sum over its users of a per-user vector with public bounds,

    v_u = (s_u SSE_u, s_u n_u, C r_u, C f_u),   s_u = min(1, C' / ||(SSE_u, n_u)||),

C = ``clip_eval`` (the joint mode's C_eval), C' = C - sqrt(2) 2^-17, SSE_u the user's
squared error over its held-out ratings (predictions clamped to the rating scale), n_u
their number, r_u the user's recall@k and f_u = 1 if the user has a relevant held-out
item. The compute parties add the noise plan's "mean" release to their shares and open
only the noised sum T; RMSE = sqrt(T0 / T1) and recall@k = T2 / T3 are post-processing.
protocols/federated.md ("Metrics") proves the sensitivity 2C the plan is calibrated for.

Three kinds of evaluation vector, a public run setting agreed by every party:
- "clipped": v_u summed (a DP run);
- "clipped+exact": v_u summed, then the holder's exact (SSE, n, sum r_u, sum f_u) too,
  opened as declared public (``--benchmark-exact-rmse``: NOT covered by the DP guarantee);
- "exact": the exact sums only (a ``--no-dp`` run: nothing is protected anyway).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from mpc_rec.dp.reveal import RevealLog, declare_public, noised
from mpc_rec.federated.model import SCALE, UserMetrics, clip_target
from mpc_rec.paillier.packing import PackingSpec

EVALUATIONS = ("clipped", "clipped+exact", "exact")
PART = 4  # (squared error, test ratings, recall sum, users with a relevant item)
# Every sum a holder may send stays below 2^30 in value units: exact SSEs up to 16 x 67
# million held-out ratings, clipped sums up to 10^8 users at C = 10. The vector is one
# ciphertext whatever the range, so a generous public range costs nothing.
EVALUATION_RANGE = 2.0**30
NO_DP_REASON = "no-dp run: exact evaluation sums, for benchmarking only"
EXACT_REASON = ("benchmark_exact_rmse: the exact test sums of the DP model, NOT covered by the DP guarantee")
MIN_CLIP = 2.0**-10  # C' = C - sqrt(2) 2^-17 must stay well above 0


def evaluation_spec(key_bits: int, *, max_holders: int) -> PackingSpec:
    return PackingSpec.for_range(EVALUATION_RANGE, key_bits=key_bits, max_contributors=max_holders)


def evaluation_length(kind: str) -> int:
    if kind not in EVALUATIONS:
        raise ValueError(f"evaluation must be one of {', '.join(EVALUATIONS)}, got {kind!r}")
    return 2 * PART if kind == "clipped+exact" else PART


def clipped_user_units(metrics: UserMetrics, clip_eval: float) -> np.ndarray:
    """round(2^16 v_u) per user, int64 (users x 4): each row's pair has norm <= 2^16 C, every entry in [0, 2^16 C].

    Rounding the pair moves it by at most sqrt(2)/2 units, which C' leaves room for;
    recall and the flag are scaled by C on the grid (floor), so rounding cannot pass it.
    """
    if not clip_eval >= MIN_CLIP:
        raise ValueError(f"clip_eval must be at least {MIN_CLIP}, got {clip_eval}")
    target = clip_target(clip_eval, 2)
    norms = np.hypot(metrics.squared_error, metrics.test_ratings)
    scales = np.minimum(1.0, target / np.where(norms > 0, norms, 1.0))
    side = math.floor(clip_eval * SCALE)
    columns = [scales * metrics.squared_error * SCALE, scales * metrics.test_ratings * SCALE,
               metrics.recall * side, metrics.has_relevant * side]
    return np.rint(np.stack(columns, axis=1)).astype(np.int64)


def exact_sums(metrics: UserMetrics) -> np.ndarray:
    return np.array([metrics.squared_error.sum(), metrics.test_ratings.sum(), metrics.recall.sum(),
                     metrics.has_relevant.sum()], dtype=np.float64)


def evaluation_vector(metrics: UserMetrics, *, kind: str, clip_eval: float) -> np.ndarray:
    """What a holder encrypts for the evaluation round (values; the clipped part exact on the grid)."""
    exact = exact_sums(metrics)
    if kind == "exact":
        return exact
    clipped = clipped_user_units(metrics, clip_eval).sum(axis=0).astype(np.float64) / SCALE  # < 2^53 units: exact
    return np.concatenate([clipped, exact]) if kind == "clipped+exact" else clipped


def metrics_from_sums(sums: np.ndarray) -> dict[str, float | None]:
    """RMSE and recall from (SSE, count, recall sum, relevant users), noised or not: post-processing.

    Noise can push a sum below zero; the SSE is floored at 0 and recall kept in [0, 1]. A
    count or user sum that is not positive gives no figure (None).
    """
    sse, count, recall_sum, relevant = (float(x) for x in sums)
    return {"rmse": math.sqrt(max(sse, 0.0) / count) if count > 0 else None,
            "recall": min(1.0, max(0.0, recall_sum / relevant)) if relevant > 0 else None}


def reveal_evaluation(total: Any, plan: Any, kind: str, log: RevealLog) -> dict[str, Any]:
    """Noise this party's share of the clipped sums and open them; open the exact part if asked.

    Goes through the reveal choke point like every other opening: the clipped sums as the
    plan's one "mean" release, the exact sums declared public with their reason.
    """
    from mpc_rec.mpc.privacy import add_own_noise
    from mpc_rec.mpc.reveal import open_ring_to_all

    if kind == "exact":
        if plan is not None:
            raise ValueError("exact-only evaluation is for --no-dp runs")
        units = open_ring_to_all(declare_public(total, reason=NO_DP_REASON), name="evaluation sums", log=log)
        sums = units.numpy().astype(np.float64) / SCALE
        found = metrics_from_sums(sums)
        return {"kind": kind, "released_sums": sums.tolist(), "rmse": found["rmse"], "recall": found["recall"],
                "noise_sigma": 0.0, "rmse_exact_unprotected": found["rmse"], "recall_exact_unprotected": found["recall"]}
    if plan is None:
        raise ValueError("clipped evaluation sums are released with the plan's noise")
    clipped = total[:PART]
    tagged = noised(add_own_noise(clipped, plan, "mean"), plan=plan, release="mean", index=0,
                    aggregate="federated evaluation sums (clipped per user by holders)")
    sums = open_ring_to_all(tagged, name="evaluation sums", log=log).numpy().astype(np.float64) / SCALE
    found = metrics_from_sums(sums)
    result = {"kind": kind, "released_sums": sums.tolist(), "rmse": found["rmse"], "recall": found["recall"],
              "noise_sigma": plan.mean_sigma_total, "clip_eval": plan.clip.mean}
    if kind == "clipped+exact":
        exact = open_ring_to_all(declare_public(total[PART:], reason=EXACT_REASON), name="exact evaluation sums",
                                 log=log).numpy().astype(np.float64) / SCALE
        found = metrics_from_sums(exact)
        result.update(exact_sums_unprotected=exact.tolist(), rmse_exact_unprotected=found["rmse"],
                      recall_exact_unprotected=found["recall"])
    return result
