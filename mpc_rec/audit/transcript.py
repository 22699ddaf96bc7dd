"""Transcript capture: every message a party receives, recorded on the receiving side.

The recorder wraps the object that ``crypten.communicator.get()`` returns (whatever
transport sits underneath: gloo, or an encrypted channel that replaces it), so every
CrypTen protocol that asks for the communicator talks through it. For each receiving
operation it records what this party obtains: the operation, the peer, the protocol
phase (set by the party with ``phase``), shape, dtype and the tensor values.

On disk, per party: ``rank<r>.index.jsonl`` (one JSON object per record) and
``rank<r>.values.bin`` (raw little-endian values; the index gives offset, dtype and
count). No pickle: peers' objects (only sizes, from the dealer) are kept as text.
Tensors above ``max_elements`` keep an evenly spaced sample of that many elements
(``sample_positions`` recomputes which), so large runs stay a manageable size while
aggregate-sized tensors are kept whole.

Besides received messages the recorder keeps one kind of local knowledge: the plaintext
values this party itself drew for each Beaver triple (``kind = "local-triple"``). Under
the TTP dealer these are only this party's shares of the masks; under CrypTen's TFP
provider party 0 draws the masks themselves. An attacker holding a party's transcript
holds this too, which is what the audit's reconstruction attack uses.

Not recorded: the seed exchange inside ``crypten.init()`` (it happens before a party
installs the recorder; setup.md describes it), and the dealer process, which receives
only party 0's requests (tuple kinds and sizes).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

DEFAULT_MAX_ELEMENTS = 32_768
_RECEIVING = ("recv", "all_reduce", "all_reduce_in_place", "reduce", "broadcast", "gather", "all_gather", "scatter",
              "recv_obj", "broadcast_obj")


def sample_positions(nelement: int, max_elements: int) -> np.ndarray | None:
    """Flat positions kept for a tensor of ``nelement`` values (None: all of them)."""
    if nelement <= max_elements:
        return None
    return (np.arange(max_elements, dtype=np.int64) * nelement) // max_elements


class Recorder:
    def __init__(self, directory: Path, rank: int, max_elements: int = DEFAULT_MAX_ELEMENTS):
        directory.mkdir(parents=True, exist_ok=True)
        self.rank = rank
        self.max_elements = max_elements
        self.phase = "start"
        self._seq = 0
        self._offset = 0
        self._index = open(directory / f"rank{rank}.index.jsonl", "w", encoding="utf-8")
        self._values = open(directory / f"rank{rank}.values.bin", "wb")

    def tensor(self, op: str, peer: Any, value: torch.Tensor, *, part: int = 0, kind: str = "message", **extra: Any) -> None:
        if self._index.closed:  # teardown after the party's last phase
            return
        array = value.detach().cpu().contiguous().numpy()
        flat = array.reshape(-1)
        positions = sample_positions(flat.size, self.max_elements)
        kept = flat if positions is None else flat[positions]
        data = np.ascontiguousarray(kept).astype(kept.dtype.newbyteorder("<"), copy=False).tobytes()
        self._write({"kind": kind, "op": op, "peer": peer, "part": part, "shape": list(array.shape),
                     "dtype": str(array.dtype), "nelement": int(flat.size), "stored": int(kept.size),
                     "sampled": positions is not None, "offset": self._offset, **extra})
        self._values.write(data)
        self._offset += len(data)

    def obj(self, op: str, peer: Any, value: Any) -> None:
        if self._index.closed:
            return
        text = repr(list(value)) if isinstance(value, torch.Size) else repr(value)
        self._write({"kind": "object", "op": op, "peer": peer, "type": type(value).__name__, "repr": text[:200]})

    def _write(self, record: dict[str, Any]) -> None:
        record = {"seq": self._seq, "phase": self.phase, **record}
        self._seq += 1
        self._index.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if not self._index.closed:
            self._index.close()
            self._values.close()


class RecordingCommunicator:
    """Delegates everything to the real communicator; records what receiving calls return."""

    def __init__(self, inner: Any, recorder: Recorder):
        self._inner = inner
        self._recorder = recorder

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._inner, name)
        if name not in _RECEIVING:
            return attribute

        def receiving(*args: Any, **kwargs: Any) -> Any:
            result = attribute(*args, **kwargs)
            # an in-place all-reduce (mpc.crypten_fixes) is the same opening, recorded as one
            self._record("all_reduce" if name == "all_reduce_in_place" else name, args, kwargs, result)
            return result

        return receiving

    def _record(self, name: str, args: tuple, kwargs: dict, result: Any) -> None:
        rec, rank = self._recorder, self._recorder.rank
        if name in ("recv_obj", "broadcast_obj"):
            src = args[1] if name == "broadcast_obj" and len(args) > 1 else kwargs.get("src", args[0] if name == "recv_obj" else None)
            if src != rank:
                rec.obj(name, src, result)
        elif name in ("all_reduce", "reduce"):
            # the opened sum of every party's share: what this party learns from the others
            if result is not None:
                for part, tensor in enumerate(result if isinstance(result, list) else [result]):
                    rec.tensor(name, "all", tensor, part=part)
        elif name in ("gather", "all_gather"):
            for peer, tensor in enumerate(result):
                if peer != rank and tensor is not None:
                    rec.tensor(name, peer, tensor)
        elif name in ("broadcast", "scatter"):
            src = args[1] if len(args) > 1 else kwargs.get("src")
            if src != rank:
                for part, tensor in enumerate(result if isinstance(result, list) else [result]):
                    rec.tensor(name, src, tensor, part=part)
        elif name == "recv":
            src = args[1] if len(args) > 1 else kwargs.get("src")
            rec.tensor(name, src, result)


_active: Recorder | None = None


def install(directory: Path, rank: int, max_elements: int = DEFAULT_MAX_ELEMENTS) -> Recorder:
    """Route this process's CrypTen communicator through a recorder (after crypten.init)."""
    global _active
    import crypten.communicator as communicator

    recorder = Recorder(directory, rank, max_elements)
    previous = communicator.get
    proxies: dict[int, RecordingCommunicator] = {}

    def recording_get() -> Any:
        inner = previous()
        proxy = proxies.get(id(inner))
        if proxy is None or proxy._inner is not inner:
            proxy = proxies[id(inner)] = RecordingCommunicator(inner, recorder)
        return proxy

    communicator.get = recording_get
    _capture_local_triples()
    _active = recorder
    return recorder


def _capture_local_triples() -> None:
    """Record the mask values this party draws for each additive Beaver triple."""
    from crypten.mpc.provider import tfp_provider, ttp_provider
    from crypten.mpc.provider.tfp_provider import TrustedFirstParty
    from crypten.mpc.provider.ttp_provider import TrustedThirdParty

    for cls, module in ((TrustedFirstParty, tfp_provider), (TrustedThirdParty, ttp_provider)):
        original = cls.generate_additive_triple

        def wrapped(self: Any, size0: Any, size1: Any, op: str, *args: Any, _original=original, _module=module, **kwargs: Any) -> Any:
            drawn: list[torch.Tensor] = []
            draw = _module.generate_random_ring_element

            def drawing(*a: Any, **k: Any) -> torch.Tensor:
                value = draw(*a, **k)
                drawn.append(value)
                return value

            _module.generate_random_ring_element = drawing
            try:
                triple = _original(self, size0, size1, op, *args, **kwargs)
            finally:
                _module.generate_random_ring_element = draw
            record_local_triple(drawn[0], drawn[1], op)  # the a and b masks, in that order
            return triple

        cls.generate_additive_triple = wrapped


def record_local_triple(a: torch.Tensor, b: torch.Tensor, operation: str) -> None:
    """This party's own shares of a Beaver triple's masks, recorded just before the opening
    of x - a, y - b (no-op when nothing records): ``views.unmasked_values`` pairs them."""
    if _active is not None:
        for part, value in enumerate((a, b)):
            _active.tensor("triple", "local", value, part=part, kind="local-triple", operation=operation)


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """Label the messages received inside this block (no-op when nothing records)."""
    if _active is None:
        yield
        return
    before, _active.phase = _active.phase, name
    try:
        yield
    finally:
        _active.phase = before


def set_phase(name: str) -> None:
    if _active is not None:
        _active.phase = name


def close() -> None:
    if _active is not None:
        _active.close()


# ------------------------------------------------------------------ reading
class Transcript:
    """One party's recorded transcript, read back without pickle."""

    def __init__(self, directory: Path, rank: int):
        self.rank = rank
        index = Path(directory) / f"rank{rank}.index.jsonl"
        values = Path(directory) / f"rank{rank}.values.bin"
        if not index.exists() or not values.exists():
            from mpc_rec.errors import InputError

            raise InputError(f"{directory}: no transcript for rank {rank}")
        self.records = [json.loads(line) for line in index.read_text(encoding="utf-8").splitlines() if line]
        self._values = np.memmap(values, dtype=np.uint8, mode="r") if values.stat().st_size else np.zeros(0, np.uint8)

    def values(self, record: dict[str, Any]) -> np.ndarray:
        """The stored values of one tensor record (flat; a sample when ``record['sampled']``)."""
        dtype = np.dtype(record["dtype"]).newbyteorder("<")
        start = record["offset"]
        raw = self._values[start:start + record["stored"] * dtype.itemsize]
        return np.frombuffer(raw.tobytes(), dtype=dtype).astype(np.dtype(record["dtype"]))

    def messages(self, *, exclude_phases: tuple[str, ...] = ()) -> list[dict[str, Any]]:
        return [r for r in self.records if r["kind"] == "message" and not r["phase"].startswith(exclude_phases)]

    def local_triples(self) -> list[dict[str, Any]]:
        return [r for r in self.records if r["kind"] == "local-triple"]
