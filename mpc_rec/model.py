"""Biased matrix factorization: the maths, shared by the plaintext reference and MPC.

``train_epoch`` is written against the small operator set that both torch tensors and
CrypTen ``MPCTensor`` support (+, -, *, matmul, sum, t, unsqueeze), so the secure run and
the plaintext reference execute literally the same algorithm. Only the inputs differ:
plaintext float64 tensors, or secret shares.

Model: r_ui ~ mu + b_u + c_i + p_u . q_i, trained by full-batch gradient descent with
(heavy-ball) momentum on the sum of squared errors over observed ratings plus an L2
penalty weighted by each user's and item's rating count (the full-batch form of the
per-rating regularization that SGD recommenders use).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import torch


@dataclass(frozen=True)
class TrainConfig:
    factors: int = 16
    epochs: int = 30
    learning_rate: float = 0.003
    momentum: float = 0.9
    regularization: float = 0.1
    init_scale: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        checks = {
            "factors": self.factors >= 1,
            "epochs": self.epochs >= 1,
            "learning_rate": 0 < self.learning_rate < 1,
            "momentum": 0 <= self.momentum < 1,
            "regularization": self.regularization >= 0,
            "init_scale": 0 < self.init_scale <= 1,
            "seed": self.seed >= 0,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid training setting(s): {', '.join(bad)} ({self})")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainingData:
    """Dense observed ratings (0 where unobserved), the 0/1 mask and derived weights.

    ``item_weights`` scale the item-side L2 penalty: the item rating counts, or (under
    differential privacy, where counts would be an un-noised aggregate) a public constant.
    """

    ratings: Any
    mask: Any
    user_counts: Any
    item_weights: Any
    mean: Any


@dataclass
class ModelState:
    user_factors: Any
    item_factors: Any
    user_bias: Any
    item_bias: Any
    velocity: list[Any] = field(default_factory=list)

    @property
    def params(self) -> list[Any]:
        return [self.user_factors, self.item_factors, self.user_bias, self.item_bias]


def initial_parameters(n_users: int, n_items: int, config: TrainConfig) -> list[torch.Tensor]:
    """Public, data-independent start: Gaussian factors from the seed, zero biases."""
    generator = torch.Generator().manual_seed(config.seed)
    shape_u, shape_i = (n_users, config.factors), (n_items, config.factors)
    user_factors = torch.randn(shape_u, generator=generator, dtype=torch.float64)
    item_factors = torch.randn(shape_i, generator=generator, dtype=torch.float64)
    return [
        user_factors * config.init_scale,
        item_factors * config.init_scale,
        torch.zeros(n_users, dtype=torch.float64),
        torch.zeros(n_items, dtype=torch.float64),
    ]


def predictions(state: ModelState, mean: Any) -> Any:
    """Full score matrix mu + b_u + c_i + P Q^T (users x items)."""
    scores = state.user_factors.matmul(state.item_factors.t())
    return scores + state.user_bias.unsqueeze(1) + state.item_bias.unsqueeze(0) + mean


def exact_item_aggregates(error: Any, state: ModelState) -> tuple[Any, Any]:
    """The data parts of the item-side gradients: E^T P and the column sums of E."""
    return error.t().matmul(state.user_factors), error.sum(0)


DataGradients = Callable[[ModelState, TrainingData], tuple[Any, Any, Any, Any]]


def data_gradients(
    state: ModelState,
    data: TrainingData,
    item_aggregates: Callable[[Any, ModelState], tuple[Any, Any]] = exact_item_aggregates,
) -> tuple[Any, Any, Any, Any]:
    """The data parts of the four gradients: E Q, the item sums, E 1, from E = M*pred - R.

    ``item_aggregates`` computes the sums over users that the item side needs; the
    differentially private run passes one that clips and adds noise. The secure run
    computes the same four quantities with fused openings (``mpc.fused``).
    """
    error = data.mask * predictions(state, data.mean) - data.ratings  # 0 where unobserved
    item_factor_sum, item_bias_sum = item_aggregates(error, state)
    return error.matmul(state.item_factors), item_factor_sum, error.sum(1), item_bias_sum


def train_epoch(
    state: ModelState,
    data: TrainingData,
    config: TrainConfig,
    gradients_of_data: DataGradients = data_gradients,
) -> ModelState:
    """One full-batch momentum step. Works on torch tensors and on MPCTensors alike.

    Counts multiply parameters before the public regularization constant, so that in
    fixed point an integer-encoded count times a fixed-point value needs no truncation.
    """
    user_part, item_part, user_sum, item_sum = gradients_of_data(state, data)
    reg = config.regularization
    users, items = data.user_counts.unsqueeze(1), data.item_weights.unsqueeze(1)
    gradients = [
        user_part + (state.user_factors * users) * reg,
        item_part + (state.item_factors * items) * reg,
        user_sum + (state.user_bias * data.user_counts) * reg,
        item_sum + (state.item_bias * data.item_weights) * reg,
    ]
    if state.velocity:
        velocity = [v * config.momentum + g for v, g in zip(state.velocity, gradients)]
    else:
        velocity = gradients
    params = [p - v * config.learning_rate for p, v in zip(state.params, velocity)]
    return ModelState(*params, velocity=velocity)


def plaintext_data(ratings: np.ndarray, mask: np.ndarray) -> TrainingData:
    r = torch.as_tensor(ratings, dtype=torch.float64)
    m = torch.as_tensor(mask, dtype=torch.float64)
    count = float(m.sum())
    mean = float(r.sum()) / count if count else 0.0
    return TrainingData(r, m, m.sum(1), m.sum(0), torch.tensor(mean, dtype=torch.float64))


def squared_error_sum(state: ModelState, mean: Any, ratings: Any, mask: Any) -> Any:
    """Sum of squared errors over the observed entries of (ratings, mask)."""
    error = mask * predictions(state, mean) - ratings
    return (error * error).sum()


def top_k_plain(scores: np.ndarray, exclude: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k best-scored items per row, skipping excluded entries."""
    masked = np.where(exclude > 0, -np.inf, scores)
    order = np.argsort(-masked, axis=1, kind="stable")[:, :k]
    return order


def rmse_from(sse: float, count: float) -> float:
    return math.sqrt(sse / count) if count > 0 else float("nan")
