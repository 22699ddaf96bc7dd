"""Corrections to CrypTen 0.4.1 internals that mpc-rec depends on (installed per process).

- TTP triples: every party but rank 0 used to *compute* the whole product of its two
  random masks only to learn the product's shape (an int64 matmul of n x K by K x I
  per Beaver matmul, discarded). The shape is now computed (``deals.product_shape``;
  other products: inferred on torch's "meta" device, which is slow).
- Truncation for three or more parties: CrypTen's wrap count assumes x + r does not wrap
  (wrong with probability ~|x| 2^-64 per element, then off by 2^48) and does a wrap count
  over every share. Division by a power of two now uses ``fused.truncate`` (one opening,
  exact to one unit for |x| < 2^62) when the TTP dealer is present; other divisors keep
  CrypTen's protocol. Two parties keep CrypTen's local share division (no opening).
- ``TTPClient.ttp_request`` goes through ``deals``' line to the dealer, which may hold
  replies not read yet (the next epoch's correlations): they are read first, in order.
- ``all_reduce_in_place``: CrypTen's batched all_reduce clones every input first; the
  fused step opens users x items matrices it no longer needs, so it reduces them where
  they are (each clone of 13 MB cost a fresh allocation and its page faults).
"""

from __future__ import annotations

from typing import Any

import torch


def _additive_triple(self: Any, size0: Any, size1: Any, op: str, device: Any = None, *args: Any, **kwargs: Any) -> Any:
    import crypten.communicator as comm
    from crypten.mpc.primitives import ArithmeticSharedTensor
    from crypten.mpc.provider.ttp_provider import TTPClient, generate_random_ring_element

    from mpc_rec.mpc.deals import product_shape

    generator = TTPClient.get().get_generator(device=device)
    a = generate_random_ring_element(size0, generator=generator, device=device)
    b = generate_random_ring_element(size1, generator=generator, device=device)
    if comm.get().get_rank() == 0:
        c = TTPClient.get().ttp_request("additive", device, size0, size1, op, *args, **kwargs)
    else:
        if op in ("mul", "matmul") and not args and not kwargs:
            shape = product_shape(size0, size1, op)
        else:
            shape = getattr(torch, op)(a.to("meta"), b.to("meta"), *args, **kwargs).size()
        c = generate_random_ring_element(shape, generator=generator, device=device)
    return tuple(ArithmeticSharedTensor.from_shares(x, precision=0) for x in (a, b, c))


def _truncate_with_dealer(original: Any) -> Any:
    def truncate(x: Any, y: Any) -> Any:
        from crypten.config import cfg

        if cfg.mpc.provider == "TTP" and isinstance(y, int) and y > 1 and y & (y - 1) == 0:
            from mpc_rec.mpc.fused import truncate as exact_truncate

            (x.share,) = exact_truncate([x.share], y.bit_length() - 1)
            return x
        return original(x, y)

    truncate.mpc_rec_patched = True  # type: ignore[attr-defined]
    return truncate


def _all_reduce_in_place() -> Any:
    import torch.distributed as dist
    from crypten.communicator.communicator import _logging

    def all_reduce(self: Any, input: list[torch.Tensor], op: Any = dist.ReduceOp.SUM, batched: bool = True) -> list[torch.Tensor]:
        # Named all_reduce so that CrypTen's _logging counts it as one: same bytes and rounds.
        work = [dist.all_reduce(t.data, op=op, group=self.main_group, async_op=True) for t in input]
        for handle in work:
            handle.wait()
        return input

    return _logging(all_reduce)


def install() -> None:
    from crypten.communicator.distributed_communicator import DistributedCommunicator
    from crypten.mpc.primitives import beaver
    from crypten.mpc.provider.ttp_provider import TrustedThirdParty, TTPClient

    from mpc_rec.mpc import deals

    TrustedThirdParty.generate_additive_triple = _additive_triple
    TTPClient._TTPClient__TTPClient.ttp_request = deals.ttp_request
    DistributedCommunicator.all_reduce_in_place = _all_reduce_in_place()
    if not getattr(beaver.truncate, "mpc_rec_patched", False):
        beaver.truncate = _truncate_with_dealer(beaver.truncate)
