"""A CrypTen communicator over the TLS mesh, in place of torch.distributed/gloo.

It implements every method CrypTen and its TTP dealer call (point-to-point, collectives,
objects, ranks, traffic counters), with CrypTen's own counting decorator so bytes and
rounds read the same as with gloo. It knows nothing of any particular protocol: any
tensor of an allowed dtype can go anywhere, which is what CrypTen's generic
send/recv/broadcast interface promises to callers such as new dealer requests.

Differences from CrypTen's DistributedCommunicator, on purpose:
- objects travel as JSON, never pickle;
- a received tensor must have exactly the shape and dtype the receiver expects;
- groups are plain tuples of ranks (every pair of processes is connected anyway);
- seeds shared between two processes become 256-bit AES keys sent over TLS (``prg``).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch.distributed import ReduceOp

from mpc_rec.compat import import_crypten
from mpc_rec.errors import PeerError
from mpc_rec.transport import framing
from mpc_rec.transport.mesh import Mesh, connect_mesh
from mpc_rec.transport.settings import TlsSettings

crypten = import_crypten()
from crypten.communicator.communicator import Communicator, _logging  # noqa: E402

_SPLIT_BYTES = 1 << 20  # all_reduce cuts tensors from this size into one part per rank
_pending: dict[str, Any] = {}  # CrypTen passes only rank and world size to initialize()


def _combine(op: Any, values: list[torch.Tensor]) -> torch.Tensor:
    """Reduce in rank order, so every party computes bit-identical results (floats too)."""
    if op == ReduceOp.SUM:
        combine = torch.Tensor.add_
    elif op == ReduceOp.BXOR:
        combine = torch.Tensor.bitwise_xor_
    else:
        raise ValueError(f"reduce operation {op} is not supported by the TLS transport")
    result = values[0].clone()  # in place from here: no new tensor per term
    for value in values[1:]:
        combine(result, value)
    return result


class _Request:
    """What isend/irecv return: the transfer completes in wait()."""

    def __init__(self, complete: Any):
        self._complete = complete
        self._done = False

    def wait(self) -> bool:
        if not self._done:
            self._complete()
            self._done = True
        return True

    def is_completed(self) -> bool:
        return self._done


class TlsCommunicator(Communicator):
    BYTES_PER_ELEMENT = 8
    instance: "TlsCommunicator | None" = None

    def __init__(self, rank: int, world_size: int, init_ttp: bool, settings: TlsSettings, timeout_s: float):
        self.rank = rank
        self.world_size = world_size
        self.ttp_initialized = init_ttp
        self._name = settings.peer(rank).name
        self.reset_communication_stats()
        processes = world_size + (1 if init_ttp else 0)
        if len(settings.peers) != processes:
            raise PeerError(f"the configuration lists {len(settings.peers)} processes, the run needs {processes}")
        self.main_group = tuple(range(world_size))
        self.ttp_group = tuple(range(processes))
        self.ttp_comm_group = (0, processes - 1)
        self.mesh: Mesh = connect_mesh(settings, rank, timeout_s)

    # --- CrypTen's class-level life cycle -------------------------------------------------

    @classmethod
    def initialize(cls, rank: int, world_size: int, init_ttp: bool = False) -> None:
        cls.instance = cls(_pending["rank"], _pending["world_size"], init_ttp, _pending["settings"], _pending["timeout_s"])

    @classmethod
    def is_initialized(cls) -> bool:
        return cls.instance is not None

    @classmethod
    def get(cls) -> "TlsCommunicator":
        return cls.instance

    @classmethod
    def shutdown(cls) -> None:
        instance = cls.instance
        if instance.rank == 0 and instance.ttp_initialized:
            instance.send_obj("terminate", instance.get_ttp_rank(), instance.ttp_group)
        instance.mesh.close()
        cls.instance = None

    # --- point to point ---------------------------------------------------------------------

    @_logging
    def send(self, tensor: torch.Tensor, dst: int) -> None:
        self.mesh.send_tensor(tensor, dst)

    @_logging
    def recv(self, tensor: torch.Tensor, src: int | None = None) -> torch.Tensor:
        return self.mesh.receive_tensor(self._source(src), tensor)

    @_logging
    def isend(self, tensor: torch.Tensor, dst: int) -> _Request:
        self.mesh.queue_tensor(tensor, dst)
        return _Request(lambda: self.mesh.flush(dst))

    @_logging
    def irecv(self, tensor: torch.Tensor, src: int | None = None) -> _Request:
        source = self._source(src)
        return _Request(lambda: tensor.copy_(self.mesh.receive_tensor(source, tensor)))

    # --- collectives (rank order everywhere, so results are identical at every party) -------

    @_logging
    def scatter(self, scatter_list: list[torch.Tensor], src: int, size: Any = None, device: Any = None) -> torch.Tensor:
        if src == self.rank:
            for dst in self._others(self.main_group):
                self.mesh.queue_tensor(scatter_list[dst], dst)
            self._flush(self.main_group)
            return scatter_list[self.rank]
        size = scatter_list[self.rank].size() if size is None else size
        return self.mesh.receive_tensor(src, torch.empty(size, dtype=torch.long))

    @_logging
    def reduce(self, input: Any, dst: int, op: Any = ReduceOp.SUM, batched: bool = False) -> Any:
        tensors = input if batched else [input]
        if self.rank != dst:
            for tensor in tensors:
                self.mesh.queue_tensor(tensor, dst)
            self.mesh.flush(dst)
            return None
        received = {r: [self.mesh.receive_tensor(r, t) for t in tensors] for r in self._others(self.main_group)}
        received[self.rank] = tensors
        result = [_combine(op, [received[r][i] for r in self.main_group]) for i in range(len(tensors))]
        return result if batched else result[0]

    @_logging
    def all_reduce(self, input: Any, op: Any = ReduceOp.SUM, batched: bool = False) -> Any:
        tensors = input if batched else [input]
        result = self._all_reduce(tensors, op, self.main_group)
        return result if batched else result[0]

    # The fused step's name for a reduction it need not keep its inputs for (crypten_fixes);
    # this transport never copies its inputs, so it is the same operation.
    all_reduce_in_place = all_reduce

    @_logging
    def gather(self, tensor: torch.Tensor, dst: int) -> list[Any]:
        if self.rank != dst:
            self.mesh.send_tensor(tensor, dst)
            return [None]
        return [tensor.clone() if r == self.rank else self.mesh.receive_tensor(r, tensor) for r in self.main_group]

    @_logging
    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        gathered = self._exchange([tensor], self.main_group)
        return [gathered[r][0].clone() if r == self.rank else gathered[r][0] for r in self.main_group]

    @_logging
    def broadcast(self, input: Any, src: int, group: Any = None, batched: bool = False) -> Any:
        group = self._group(group)
        tensors = input if batched else [input]
        if self.rank == src:
            for dst in self._others(group):
                for tensor in tensors:
                    self.mesh.queue_tensor(tensor, dst)
            self._flush(group)
        else:
            for tensor in tensors:
                tensor.copy_(self.mesh.receive_tensor(src, tensor))  # in place, as CrypTen's callers expect
        return input

    @_logging
    def barrier(self, group: Any = None) -> None:
        self._exchange([torch.empty(0, dtype=torch.uint8)], self._group(group))

    # --- objects: JSON only -------------------------------------------------------------------

    @_logging
    def send_obj(self, obj: Any, dst: int, group: Any = None) -> None:
        self.mesh.send_object(obj, dst)

    @_logging
    def recv_obj(self, src: int, group: Any = None) -> Any:
        value = self.mesh.receive(src, framing.OBJECT)
        # JSON has no tuples: a list of integers is a tensor size (the dealer's answers), and
        # comes back as the torch.Size gloo would give, which CrypTen's byte counter sizes too.
        if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return torch.Size(value)
        return value

    @_logging
    def broadcast_obj(self, obj: Any, src: int, group: Any = None) -> Any:
        group = self._group(group)
        if self.rank != src:
            return self.mesh.receive(src, framing.OBJECT)
        for dst in self._others(group):
            self.mesh.queue(dst, framing.OBJECT, framing.encode_object(obj))
        self._flush(group)
        return obj

    # --- identity -----------------------------------------------------------------------------

    def get_world_size(self) -> int:
        return self.world_size

    def get_rank(self) -> int:
        return self.rank

    def get_ttp_rank(self) -> int:
        return self.world_size

    def set_name(self, name: str) -> None:
        self._name = name

    def get_name(self) -> str:
        return self._name

    def get_distributed_backend(self) -> str:
        return "tls"

    # --- helpers --------------------------------------------------------------------------------

    def _group(self, group: Any) -> tuple[int, ...]:
        group = self.main_group if group is None else tuple(group)
        if self.rank not in group:
            raise ValueError(f"rank {self.rank} is not in group {group}")
        return group

    def _others(self, group: tuple[int, ...]) -> list[int]:
        return [r for r in group if r != self.rank]

    def _source(self, src: int | None) -> int:
        if src is None:
            raise ValueError("the TLS transport needs the source rank of every receive")
        return src

    def _flush(self, group: tuple[int, ...]) -> None:
        for rank in self._others(group):
            self.mesh.flush(rank)

    def _exchange(self, tensors: list[torch.Tensor], group: tuple[int, ...]) -> dict[int, list[torch.Tensor]]:
        """Everyone in the group sends its tensors to everyone else: one round."""
        for dst in self._others(group):
            for tensor in tensors:
                self.mesh.queue_tensor(tensor, dst)
        gathered = {r: [self.mesh.receive_tensor(r, t) for t in tensors] for r in self._others(group)}
        self._flush(group)
        gathered[self.rank] = list(tensors)
        return gathered

    def _all_reduce(self, tensors: list[torch.Tensor], op: Any, group: tuple[int, ...]) -> list[torch.Tensor]:
        """Sum (or XOR) over the group, each tensor in one network round or, if large, two.

        A large tensor is cut into one part per rank; rank j reduces part j from everyone
        and sends the result back to all (reduce-scatter, then all-gather, as gloo's ring
        does): each party encrypts and sends 2(n-1)/n of the tensor instead of n-1 times
        it. Each part is reduced once, in rank order, so every party holds the same bits.
        """
        others = self._others(group)
        size = len(group)
        parts: list[list[torch.Tensor] | None] = [
            list(torch.tensor_split(t.detach().contiguous().reshape(-1), size))
            if size > 2 and t.numel() * t.element_size() >= _SPLIT_BYTES else None for t in tensors]
        index = {rank: position for position, rank in enumerate(group)}

        def piece(i: int, rank: int) -> torch.Tensor:  # what goes to (or comes from) rank in step 1
            pieces = parts[i]
            return tensors[i] if pieces is None else pieces[index[rank]]

        for dst in others:
            for i in range(len(tensors)):
                self.mesh.queue_tensor(piece(i, dst), dst)
        received = {r: [self.mesh.receive_tensor(r, piece(i, self.rank)) for i in range(len(tensors))] for r in others}
        received[self.rank] = [piece(i, self.rank) for i in range(len(tensors))]
        reduced = [_combine(op, [received[r][i] for r in group]) for i in range(len(tensors))]
        split = [i for i, pieces in enumerate(parts) if pieces is not None]
        for dst in others:
            for i in split:
                self.mesh.queue_tensor(reduced[i], dst)
        for i in split:
            gathered = [reduced[i] if r == self.rank else self.mesh.receive_tensor(r, parts[i][index[r]]) for r in group]
            reduced[i] = torch.cat(gathered).reshape(tensors[i].shape)
        self._flush(group)  # the caller may reuse its tensors once this returns
        return reduced

    # Uncounted exchanges of key material (gloo's seed exchange by torch.distributed is
    # not counted by CrypTen either).
    def send_key(self, key: bytes, dst: int) -> None:
        self.mesh.send_tensor(torch.frombuffer(bytearray(key), dtype=torch.uint8), dst)

    def recv_key(self, src: int) -> bytes:
        return bytes(self.mesh.receive_tensor(src, torch.empty(32, dtype=torch.uint8)).numpy())


# --- installation into CrypTen ----------------------------------------------------------------


def _setup_prng_with_keys(original: Any) -> Any:
    """CrypTen's seed set-up, then 256-bit keys for the generators shared with neighbours."""
    from mpc_rec.mpc import prg

    def setup() -> None:
        original()
        comm = TlsCommunicator.get()
        cpu = torch.device("cpu")
        rank, size = comm.rank, comm.world_size
        next_key = os.urandom(32)
        comm.send_key(next_key, (rank + 1) % size)
        prev_key = comm.recv_key((rank - 1) % size)
        if rank == 0:
            global_key = os.urandom(32)
            for dst in range(1, size):
                comm.send_key(global_key, dst)
        else:
            global_key = comm.recv_key(0)
        generators = crypten.generators
        prg.bind_key(generators["next"][cpu], next_key)
        prg.bind_key(generators["prev"][cpu], prev_key)
        prg.bind_key(generators["global"][cpu], global_key)

    return setup


def _client_setup_generators(self: Any) -> None:
    """TTPClient: the key shared with the dealer arrives over TLS (CrypTen used torch.distributed)."""
    from mpc_rec.mpc import prg

    comm = TlsCommunicator.get()
    self.generator = torch.Generator(device="cpu")
    prg.bind_key(self.generator, comm.recv_key(comm.get_ttp_rank()))
    self.generator_cuda = None


def install(settings: TlsSettings, *, rank: int, world_size: int, timeout_s: float) -> None:
    """Make CrypTen use the TLS communicator in this process (call before crypten.init)."""
    import crypten.communicator as communicator
    from crypten.mpc.provider import ttp_provider

    _pending.update(settings=settings, rank=rank, world_size=world_size, timeout_s=timeout_s)
    communicator.DistributedCommunicator = TlsCommunicator
    if not getattr(crypten._setup_prng, "_mpc_rec_tls", False):
        crypten._setup_prng = _setup_prng_with_keys(crypten._setup_prng)
        crypten._setup_prng._mpc_rec_tls = True
    client = ttp_provider.TTPClient._TTPClient__TTPClient
    client._setup_generators = _client_setup_generators
