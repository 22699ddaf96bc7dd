"""The secure training step, fused: two openings of users x items matrices per epoch.

``model.train_epoch`` written with CrypTen's generic operators opens five users x items
matrices per epoch (mask and prediction for M * pred, the error twice for E Q and E^T P)
and truncates one (P Q^T), which for three or more parties costs a wrap count over the
whole matrix. This module computes the same step on raw shares (protocols/training.md):

- P and Q are truncated to 14 fractional bits before P Q^T, so predictions and errors live
  at 2^28 and need no truncation: M is an integer and R, the biases and the mean are
  rescaled by a public power of two. (|E| 2^28 Q 2^16 summed over items stays below 2^62
  for |E| <= 8, |Q| <= 4 and up to 2^17 items.)
- M * pred uses a mask A the dealer keeps for the run: M - A is opened once, each epoch
  opens only pred - B.
- E - A is opened once for E Q and E^T P (a dealer triple whose two products share A);
  row and column sums of E are linear.
- Truncations are exact (to one unit in the last place) with one opening and a dealer
  correlation, for any number of parties (``truncate``).

The users x items arithmetic between the openings runs in ``ring``'s compiled one-pass
kernels. Only small n x K, I x K and vector work (regularization, momentum) stays on
CrypTen's generic operators. Needs the TTP dealer: an epoch's correlations come in one
bundle, asked for one epoch ahead (``mpc.deals``), so nobody waits while it computes them.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from mpc_rec.audit import transcript
from mpc_rec.compat import import_crypten
from mpc_rec.model import ModelState, TrainConfig, TrainingData
from mpc_rec.mpc import ring
from mpc_rec.mpc.dealer import epoch_requests
from mpc_rec.mpc.deals import Bundle, Deal, TripleDeal, TruncationDeal, deals_for, fetch, request
from mpc_rec.mpc.deals import comm as _comm
from mpc_rec.mpc.deals import draw as _draw
from mpc_rec.mpc.deals import rank as _rank

FRACTION_BITS = 16  # CrypTen's fixed-point precision
FACTOR_BITS = 14  # P and Q as they enter P Q^T
ERROR_BITS = 2 * FACTOR_BITS  # predictions and errors


def open_all(shares: list[torch.Tensor]) -> list[torch.Tensor]:
    """Open masked values (uniform in the ring) to every party, in one round.

    Consumes ``shares``: they may be overwritten by the opened values.
    """
    return _comm().all_reduce_in_place(shares, batched=True)


def _public(value: torch.Tensor) -> torch.Tensor:
    """A public ring value as a sharing: rank 0 holds it, the rest hold zero."""
    return value if _rank() == 0 else torch.zeros_like(value)


def truncate(shares: list[torch.Tensor], bits: int | list[int], deal: TruncationDeal | None = None) -> list[torch.Tensor]:
    """Divide shared values with |x| < 2^62 by 2^bits (floor, or one more), in one opening.

    With y = x + 2^62 in [0, 2^63) and the dealer's r uniform: z = y + r is opened (it is
    uniform, so it shows nothing) and y + r wraps around 2^64 exactly when msb(r) = 1 and
    msb(z) = 0. So y >> b = (z >> b) - (r >> b) + msb(r) (1 - msb(z)) 2^(64-b), one too
    many when the low bits of z - r borrow; every term is public or a dealer sharing.
    ``bits`` may differ per tensor; ``deal`` is the correlation if already drawn.
    """
    per_share = bits if isinstance(bits, list) else [bits] * len(shares)
    sizes = [s.numel() for s in shares]
    segments = [[size, b] for size, b in zip(sizes, per_share)]
    if deal is None:
        deal = fetch(TruncationDeal(segments))
    elif deal.segments != segments:
        raise ValueError(f"truncation deal for {deal.segments}, used for {segments}")
    flat = torch.cat([s.flatten() for s in shares])
    if len(set(per_share)) == 1:  # one shift for all: no per-element shift tensors (n x I for E)
        shift: int | torch.Tensor = per_share[0]
        low_bits, carry, offset = (1 << (64 - shift)) - 1, _signed(1 << (64 - shift)), 1 << (62 - shift)
    else:
        shift = torch.cat([torch.full((n,), b, dtype=torch.int64) for n, b in segments])
        low_bits, carry, offset = (1 << (64 - shift)) - 1, 1 << (64 - shift), 1 << (62 - shift)
    if _rank() == 0:
        flat += 1 << 62
    flat += deal.r
    (z,) = open_all([flat])
    z_high = (z >> shift) & low_bits
    wrapped = deal.msb * (z >= 0).to(torch.int64) * carry
    result = wrapped - deal.high + _public(z_high - offset)
    return [part.reshape(s.shape) for part, s in zip(result.split(sizes), shares)]


def _signed(value: int) -> int:
    """A ring element 0 <= value < 2^64 as the int64 that holds it."""
    return value - (1 << 64) if value >= 1 << 63 else value


def beaver(op: str, x: torch.Tensor, y: torch.Tensor, triple: TripleDeal | None = None) -> torch.Tensor:
    """x op y for shares x, y ("mul" or "matmul"), with a TTP triple and one opening."""
    if triple is None:
        triple = fetch(TripleDeal(list(x.shape), list(y.shape), op))
    elif (triple.size0, triple.size1, triple.op) != (list(x.shape), list(y.shape), op):
        raise ValueError(f"triple for {triple.op} of {triple.size0} and {triple.size1}, used for {op}")
    transcript.record_local_triple(triple.a, triple.b, op)
    d_x, d_y = open_all([x - triple.a, y - triple.b])
    return recombine(getattr(torch, op), triple.c, d_x, d_y, triple.a, triple.b)


def recombine(f: Callable, c: torch.Tensor, d_x: torch.Tensor, d_y: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Beaver's x y = c + d_x b + a d_y + d_x d_y, as two products (c is updated in place).

    d_x = x - a and d_y = y - b are open; rank 0 alone adds the public d_x d_y, folded
    into d_x (b + d_y).
    """
    c += f(d_x, b + d_y if _rank() == 0 else b)
    c += f(a, d_y)
    return c


class MaskedProduct:
    """M * X for the fixed shared mask M: M - A opened once, X - B per product (``MaskProductDeal``)."""

    def __init__(self, mask_share: torch.Tensor):
        shape = list(mask_share.shape)
        self.shape = shape
        self.a = _draw(shape)
        if _rank() == 0:
            request("mf_mask_setup", shape)
        (self.opened_mask,) = open_all([mask_share - self.a])


def _share(x: Any) -> torch.Tensor:
    return x._tensor.share


def _wrap(share: torch.Tensor) -> Any:
    return import_crypten().mpc.MPCTensor.from_shares(share, precision=FRACTION_BITS)


def _scaled(x: Any, bits: int) -> torch.Tensor:
    """A shared value or a public float at 2^bits fixed point, as this party's share."""
    if torch.is_tensor(x):
        return _public(torch.round(x.to(torch.float64) * 2.0**bits).to(torch.int64))
    return _share(x) << (bits - FRACTION_BITS)


class FusedStep:
    """One party's state for fused epochs over fixed training data."""

    def __init__(self, data: TrainingData, factors: int, private: bool):
        """``private``: the epochs pass an ``item_aggregates`` hook (the DP item side).

        The first epoch's correlations are asked for here, before the kernels load: the
        dealer computes them during set-up instead of during the first epoch.
        """
        self.data, self.factors, self.private = data, factors, private
        self.masked = MaskedProduct(_share(data.mask))
        self._next: Bundle | None = self._bundle()  # the next epoch's correlations, asked for in advance
        ring.warm_up()
        self.ratings = _share(data.ratings) << (ERROR_BITS - FRACTION_BITS)

    def _bundle(self) -> Bundle:
        (n, i), k = self.data.ratings.size(), self.factors
        shared_items = not torch.is_tensor(self.data.item_weights)
        arguments = [n, i, k, int(self.private), int(shared_items)]
        return Bundle(deals_for(epoch_requests(n, i, k, self.private, shared_items)), ("mf_epoch", arguments)).send()

    def gradients_data_part(
        self, state: ModelState, item_aggregates: Callable[[Any, ModelState], tuple[Any, Any]] | None,
        deals: list[Deal],
    ) -> tuple[Any, Any, Any, Any]:
        """E Q, E^T P (or the hook's item sums), row and column sums of E, as MPCTensors.

        E = M * (mu + b_u + c_i + P Q^T) - R at 2^ERROR_BITS. Three openings: the small
        Beaver differences for P Q^T, then pred - B (users x items), then E - A with the
        partners of the error triple (users x items); ``ring`` does the users x items
        arithmetic between them in one pass each. ``deals``: this part's correlations,
        in ``dealer.epoch_requests``' order.
        """
        rank0 = _rank() == 0
        private = item_aggregates is not None
        to_factor_bits, product, masked, triple, to_gradient_bits, *rest = deals
        p, q = truncate([_share(state.user_factors), _share(state.item_factors)], FRACTION_BITS - FACTOR_BITS,
                        to_factor_bits)
        a_p, b_q, scores = product.a, product.b, product.c
        mask_b, masked_c = masked.b, masked.c
        transcript.record_local_triple(a_p, b_q, "matmul")
        d_p, d_q = open_all([p - a_p, q.t() - b_q])
        left = torch.cat([d_p, a_p], 1)  # Beaver's d_P (B + d_Q) + A d_Q as one product of width 2K
        right = torch.cat([b_q + d_q if rank0 else b_q, d_q], 0)
        user_offset = _scaled(state.user_bias, ERROR_BITS) + _scaled(self.data.mean, ERROR_BITS)
        item_offset = _scaled(state.item_bias, ERROR_BITS)
        ring.masked_scores(scores.numpy(), left.numpy(), right.numpy(), user_offset.numpy(), item_offset.numpy(),
                           mask_b.numpy())  # scores becomes pred - B
        (opened_x,) = open_all([scores])
        masked_e, row_sums, column_sums = ring.masked_error(
            masked_c.numpy(), self.masked.opened_mask.numpy(), mask_b.numpy(), opened_x.numpy(), self.masked.a.numpy(),
            self.ratings.numpy(), triple.a.numpy(), rank0)  # masked_c becomes E
        error = masked_c
        rights = [_share(state.item_factors)] if private else [_share(state.item_factors), _share(state.user_factors)]
        opened = open_all([torch.from_numpy(masked_e)] + [r - b for r, b in zip(rights, triple.bs)])
        d_e, d_rights = opened[0].numpy(), [d.numpy() for d in opened[1:]]
        lefts = [(b + d if rank0 else b).numpy() for b, d in zip(triple.bs, opened[1:])]
        if private:
            ring.error_products(d_e, triple.a.numpy(), lefts[0], d_rights[0], triple.cs[0].numpy())
        else:
            ring.error_products(d_e, triple.a.numpy(), lefts[0], d_rights[0], triple.cs[0].numpy(),
                                lefts[1], d_rights[1], triple.cs[1].numpy())
        up = FRACTION_BITS  # sums of E at 2^28 brought to the products' 2^44
        sums = [torch.from_numpy(row_sums) << up] + ([] if private else [torch.from_numpy(column_sums) << up])
        parts = truncate(triple.cs + sums, ERROR_BITS, to_gradient_bits)
        if private:
            user_part, user_sum = parts
            (error16,) = truncate([error], ERROR_BITS - FRACTION_BITS, rest[0])
            item_part, item_sum = item_aggregates(_wrap(error16), state)
            return _wrap(user_part), item_part, _wrap(user_sum), item_sum
        user_part, item_part, user_sum, item_sum = parts
        return _wrap(user_part), _wrap(item_part), _wrap(user_sum), _wrap(item_sum)

    def epoch(
        self, state: ModelState, config: TrainConfig,
        item_aggregates: Callable[[Any, ModelState], tuple[Any, Any]] | None = None, *, last: bool = True,
    ) -> ModelState:
        """``model.train_epoch`` on shares: the same update, with two truncations in all.

        Gradients and velocities are formed at 2^32 (count-weighted penalty: a Beaver
        product with the integer counts, or a public weight), then truncated together.
        Unless this is the ``last`` epoch, the next epoch's correlations are asked for
        first: the dealer computes them during this one.
        """
        private = item_aggregates is not None
        if private != self.private or list(state.user_factors.size()) != [self.data.ratings.size(0), self.factors]:
            raise ValueError("a fused epoch with another hook or factor count than its step was made for")
        bundle = self._next or self._bundle()
        deals = bundle.ready()
        self._next = None if last else self._bundle()
        *data_deals, weighting, to_velocity, to_parameters = deals
        data, f = self.data, FRACTION_BITS
        parts = [_share(x) for x in self.gradients_data_part(state, item_aggregates, data_deals)]
        params = [_share(x) for x in state.params]
        user_counts = _share(data.user_counts)
        k = params[0].shape[1]
        shared_items = not torch.is_tensor(data.item_weights)
        counted = [params[0], params[2]] + ([params[1], params[3]] if shared_items else [])
        counts = [user_counts.unsqueeze(1).expand(-1, k), user_counts]
        if shared_items:
            item_counts = _share(data.item_weights)
            counts += [item_counts.unsqueeze(1).expand(-1, k), item_counts]
        flat = beaver("mul", torch.cat([c.flatten() for c in counted]), torch.cat([c.flatten() for c in counts]),
                      weighting)
        weighted = [part.reshape(c.shape) for part, c in zip(flat.split([c.numel() for c in counted]), counted)]
        reg = _fixed(torch.tensor(config.regularization))
        if shared_items:  # reg (2^16) times count-weighted parameters (2^16)
            penalties = [reg * w for w in (weighted[0], weighted[2], weighted[1], weighted[3])]
        else:  # public item weights: reg * w as one public constant (2^16) times the parameter
            item_reg = _fixed(config.regularization * data.item_weights)
            penalties = [reg * weighted[0], params[1] * item_reg.unsqueeze(1), reg * weighted[1], params[3] * item_reg]
        gradients = [(part << f) + penalty for part, penalty in zip(parts, penalties)]
        if state.velocity:
            momentum = _fixed(torch.tensor(config.momentum))
            gradients = [momentum * _share(v) + g for v, g in zip(state.velocity, gradients)]
        velocity = truncate(gradients, f, to_velocity)
        rate = _fixed(torch.tensor(config.learning_rate))
        updated = truncate([(p << f) - rate * v for p, v in zip(params, velocity)], f, to_parameters)
        return ModelState(*[_wrap(p) for p in updated], velocity=[_wrap(v) for v in velocity])


def _fixed(value: torch.Tensor) -> torch.Tensor:
    """A public float (tensor) at 2^16 fixed point, the same on every party."""
    return torch.round(value.to(torch.float64) * 2.0**FRACTION_BITS).to(torch.int64)
