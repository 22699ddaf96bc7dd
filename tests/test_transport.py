"""The TLS transport: who may connect, what a hostile peer can send, and that runs agree.

Authentication and hostile-peer cases use real TLS connections between threads of this
process (fast); the equality, abort and network-namespace cases use real party processes.
"""

import os
import pickle
import shutil
import signal
import struct
import subprocess
import threading
import time
import tomllib
import uuid
from pathlib import Path

import pytest
import torch

from conftest import REPO, mpc_rec_command
from mpc_harness import run_parties
from mpc_rec.config import dump_toml, parse_party_config
from mpc_rec.data import partition_users, split_train_test, synthetic_ratings
from mpc_rec.errors import ConfigError, PeerError
from mpc_rec.launch import RunOptions, free_port, write_deployment
from mpc_rec.model import TrainConfig
from mpc_rec.transport import framing
from mpc_rec.transport.certs import certificate_fingerprint, make_pilot_certificates
from mpc_rec.transport.dealer import checked_request
from mpc_rec.transport.mesh import connect_mesh
from mpc_rec.transport.settings import PeerAddress, TlsSettings

NAMES = ["party-0", "party-1", "dealer"]


@pytest.fixture(scope="module")
def pilot(tmp_path_factory) -> dict[str, Path]:
    """The pilot CA, and a rogue CA issuing certificates with the same names."""
    root = tmp_path_factory.mktemp("certs")
    make_pilot_certificates(root / "pilot", NAMES)
    make_pilot_certificates(root / "rogue", NAMES, ca_name="rogue CA")
    return {"pilot": root / "pilot", "rogue": root / "rogue"}


def _settings(pilot, *, cert_of=None, ca_of=None, pins=None) -> list[TlsSettings]:
    """One TlsSettings per rank; cert_of/ca_of map a rank to (folder, name) it really uses."""
    peers = tuple(PeerAddress(r, n, "127.0.0.1", free_port(), (pins or {}).get(r)) for r, n in enumerate(NAMES[:2]))
    result = []
    for rank, name in enumerate(NAMES[:2]):
        folder, identity = (cert_of or {}).get(rank, (pilot["pilot"], name))
        ca = (ca_of or {}).get(rank, pilot["pilot"])
        result.append(TlsSettings(ca / "ca.pem", folder / f"{identity}.pem", folder / f"{identity}.key", peers))
    return result


def _connect_all(settings: list[TlsSettings], timeout_s: float = 5.0) -> list:
    """connect_mesh for every rank, each in its own thread; a mesh or the exception per rank."""
    results: list = [None] * len(settings)

    def one(rank):
        try:
            results[rank] = connect_mesh(settings[rank], rank, timeout_s)
        except Exception as exc:  # the test inspects it
            results[rank] = exc

    threads = [threading.Thread(target=one, args=(r,)) for r in range(len(settings))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout_s + 10)
    return results


def _close(results):
    for mesh in results:
        if mesh is not None and not isinstance(mesh, Exception):
            mesh.abort()


def test_mutual_authentication_succeeds_and_carries_tensors(pilot):
    meshes = _connect_all(_settings(pilot))
    assert not any(isinstance(m, Exception) for m in meshes), meshes
    big = torch.arange(3_000_000, dtype=torch.int64)  # both send at once: must not deadlock
    done = {}

    def exchange(rank):
        meshes[rank].queue_tensor(big + rank, 1 - rank)
        done[rank] = meshes[rank].receive_tensor(1 - rank, big)
        meshes[rank].flush(1 - rank)

    threads = [threading.Thread(target=exchange, args=(r,)) for r in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert torch.equal(done[0], big + 1) and torch.equal(done[1], big)
    closers = [threading.Thread(target=m.close) for m in meshes]
    for thread in closers:
        thread.start()
    for thread in closers:
        thread.join(15)


@pytest.mark.parametrize("case", ["unknown CA", "wrong certificate", "identity swap", "pinned fingerprint"])
def test_wrong_peers_are_refused(pilot, case):
    if case == "unknown CA":  # rank 1 holds a certificate named party-1, issued by another CA
        settings = _settings(pilot, cert_of={1: (pilot["rogue"], "party-1")})
        expect = {0: "not a certificate of the pilot CA", 1: "the peer rejected the handshake"}
    elif case == "wrong certificate":  # a genuine pilot certificate, but the dealer's
        settings = _settings(pilot, cert_of={1: (pilot["pilot"], "dealer")})
        expect = {0: "certificate identifies dealer, but rank 1 is 'party-1'"}
    elif case == "identity swap":  # rank 0 answers with party-1's certificate
        settings = _settings(pilot, cert_of={0: (pilot["pilot"], "party-1")})
        expect = {1: "certificate identifies party-1, but rank 0 is 'party-0'"}
    else:  # a CA-valid certificate that is not the pinned one
        pin = certificate_fingerprint(pilot["rogue"] / "party-0.pem")
        settings = _settings(pilot, pins={0: pin})
        expect = {1: f"not the pinned {pin}; refused"}
    results = _connect_all(settings, timeout_s=2.0)  # the side not refused waits this long
    try:
        for rank, text in expect.items():
            assert isinstance(results[rank], PeerError), results
            assert text in str(results[rank]), str(results[rank])
        assert all(isinstance(r, (PeerError, type(None))) or not isinstance(r, Exception) for r in results)
    finally:
        _close(results)


class _Exploit:
    """Unpickling this would create the marker file: proof that nothing was unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _header(kind, code, shape, length):
    dims = list(shape) + [0] * (framing.MAX_DIMS - len(shape))
    return struct.pack(f"<4sBBBBQ{framing.MAX_DIMS}Q", b"MPCR", framing.VERSION, kind, code, len(shape), length, *dims)


@pytest.mark.parametrize("case", ["wrong shape", "wrong dtype", "unknown dtype", "giant size", "garbage",
                                  "pickle as object", "raw pickle"])
def test_hostile_peer_is_rejected_without_executing_anything(pilot, tmp_path, case):
    marker = tmp_path / "pwned"
    evil = pickle.dumps(_Exploit(marker))
    payload, receive, expect = {
        "wrong shape": (_header(1, 1, (5,), 40) + bytes(40), "tensor", "expected torch.int64 of shape (3,)"),
        "wrong dtype": (_header(1, 6, (3,), 24) + bytes(24), "tensor", "sent a torch.float64 tensor"),
        "unknown dtype": (_header(1, 99, (3,), 24) + bytes(24), "tensor", "dtype code 99, which is not allowed"),
        "giant size": (_header(1, 1, (1 << 40,), 8 << 40), "tensor", "over the"),
        "garbage": (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".ljust(framing.HEADER_BYTES, b"A"), "tensor", "bad magic"),
        "pickle as object": (_header(2, 0, (), len(evil)) + evil, "object", "not valid JSON"),
        "raw pickle": (evil.ljust(framing.HEADER_BYTES, b"."), "object", "not an mpc-rec message"),
    }[case]
    honest, hostile = _connect_all(_settings(pilot), timeout_s=3.0)
    try:
        hostile.link(0).outbox.append(memoryview(payload))  # raw bytes, past the sender's own framing
        hostile._wake()
        with pytest.raises(PeerError) as error:
            if receive == "tensor":
                honest.receive_tensor(1, torch.empty(3, dtype=torch.int64))
            else:
                honest.receive(1, framing.OBJECT)
        assert "party-1" in str(error.value) and expect in str(error.value), str(error.value)
        assert not marker.exists()
    finally:
        _close([honest, hostile])


def test_a_peer_that_stalls_mid_transfer_is_detected_within_the_bounded_wait(pilot):
    honest, stalling = _connect_all(_settings(pilot), timeout_s=1.5)
    try:  # a valid header announcing 8 MB, then 1 MB of it, then silence
        stalling.link(0).outbox.append(memoryview(_header(1, 1, (1 << 20,), 8 << 20) + bytes(1 << 20)))
        stalling._wake()
        started = time.monotonic()
        with pytest.raises(PeerError, match="lost contact with party-1: nothing received or sent for 1.5 s"):
            honest.receive_tensor(1, torch.empty(1 << 20, dtype=torch.int64))
        assert time.monotonic() - started < 1.5 + 5  # bounded: the wait ended, it did not hang
    finally:
        _close([honest, stalling])


def test_a_large_send_completes_while_the_receiver_computes(pilot):
    """24 MB (more than the kernel buffers hold) to a party whose main thread is busy
    elsewhere: the send completes anyway, because the receiver's I/O thread drains it."""
    meshes = _connect_all(_settings(pilot), timeout_s=20.0)
    assert not any(isinstance(m, Exception) for m in meshes), meshes
    big = torch.arange(3_000_000, dtype=torch.int64)
    sent = threading.Event()
    outcome = {}

    def sender():
        try:
            meshes[0].send_tensor(big, 1)  # returns once the bytes have left
            sent.set()
        except PeerError as exc:
            outcome["sender"] = exc

    thread = threading.Thread(target=sender)
    try:
        thread.start()
        # The receiver asks for the data only after the send completed (or gave up).
        completed = sent.wait(25)
        assert completed, f"the send waited for the receiver's main thread: {outcome}"
        assert torch.equal(meshes[1].receive_tensor(0, big), big)
        thread.join(10)
    finally:
        _close(meshes)


def test_all_reduce_of_large_tensors_in_parts_among_three_parties(pilot):
    """Large tensors travel as reduce-scatter + all-gather: same sums (and identical float
    bits) at every party, and the bytes and rounds CrypTen counts are unchanged."""
    from mpc_rec.transport.communicator import TlsCommunicator

    peers = tuple(PeerAddress(r, n, "127.0.0.1", free_port()) for r, n in enumerate(NAMES))
    settings = [TlsSettings(pilot["pilot"] / "ca.pem", pilot["pilot"] / f"{n}.pem", pilot["pilot"] / f"{n}.key", peers)
                for n in NAMES]
    inputs = [[torch.arange(200_001, dtype=torch.int64) * (r + 1), torch.full((5,), r + 1, dtype=torch.int64),
               torch.rand(300, 1001, generator=torch.Generator().manual_seed(r), dtype=torch.float64)]
              for r in range(3)]
    results: dict = {}

    def party(rank):
        try:
            comm = TlsCommunicator(rank, 3, False, settings[rank], 20.0)
            summed = comm.all_reduce([t.clone() for t in inputs[rank]], batched=True)
            xored = comm.all_reduce(inputs[rank][0].clone(), op=torch.distributed.ReduceOp.BXOR)
            results[rank] = (summed, xored, comm.get_communication_stats())
            comm.mesh.close()
        except Exception as exc:  # reported below
            results[rank] = exc

    import crypten

    threads = [threading.Thread(target=party, args=(r,)) for r in range(3)]
    with crypten.cfg.temp_override({"communicator.verbose": True}):  # CrypTen counts only when verbose
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    assert all(isinstance(results.get(r), tuple) for r in range(3)), results
    expected_xor = inputs[0][0] ^ inputs[1][0] ^ inputs[2][0]
    for rank in range(3):
        summed, xored, stats = results[rank]
        assert torch.equal(summed[0], inputs[0][0] * 6) and torch.equal(summed[1], torch.full((5,), 6))
        assert torch.equal(summed[2].view(torch.int64), results[0][0][2].view(torch.int64))  # same bits everywhere
        assert torch.allclose(summed[2], inputs[0][2] + inputs[1][2] + inputs[2][2])
        assert torch.equal(xored, expected_xor)
        elements = sum(t.numel() for t in inputs[rank]) + inputs[rank][0].numel()
        assert stats["rounds"] == 2 and stats["bytes"] == 2 * elements * 8  # what CrypTen counts over gloo


def test_dealer_serves_only_listed_functions_with_bounded_sizes():
    functions = ["additive", "square"]
    ok = checked_request({"function": "additive", "device": None, "args": [[2, 3], [3, 4], "matmul"], "kwargs": {}},
                         functions, 1000, "party-0")
    assert ok == ("additive", [torch.Size([2, 3]), torch.Size([3, 4]), "matmul"], {})
    bad = [
        ({"function": "__init__", "device": None, "args": [], "kwargs": {}}, "not a dealer function"),
        ({"function": "additive", "device": None, "args": [[2, 3], [3, 4], "system"], "kwargs": {}}, "not a product"),
        ({"function": "square", "device": None, "args": [[1 << 20, 1 << 20]], "kwargs": {}}, "over the message limit"),
        ({"function": "square", "device": "cuda:0", "args": [[2]], "kwargs": {}}, "not served"),
        ({"function": "square", "device": None, "args": [{"a": 1}], "kwargs": {}}, "not accepted"),
        ("terminate now", "not a request"),
    ]
    for message, text in bad:
        with pytest.raises(PeerError, match=text):
            checked_request(message, functions, 1000, "party-0")


def test_dealer_serves_the_requests_its_class_adds():
    from mpc_rec.compat import import_crypten
    from mpc_rec.mpc.dealer import make_server_class
    from mpc_rec.transport.dealer import served_functions

    import_crypten()
    served = served_functions(make_server_class())
    assert {"additive", "square", "B2A", "mf_truncation", "mf_error_triple", "mf_epoch"} <= set(served)
    assert not any(name.startswith("_") for name in served)
    request = {"function": "mf_truncation", "device": None, "args": [[[10, 16], [5, 20]]], "kwargs": {}}
    assert checked_request(request, served, 1000, "party-0")[1] == [[[10, 16], [5, 20]]]
    with pytest.raises(PeerError, match="malformed list"):
        checked_request({**request, "args": [[[10, "x"]]]}, served, 1000, "party-0")


def test_tls_configuration_is_checked(pilot, tmp_path):
    base = {"party": {"name": "party-0", "rank": 0, "world_size": 2}, "network": {"transport": "tls"},
            "tls": {"ca": "ca.pem", "cert": "party-0.pem", "key": "party-0.key"},
            "data": {"train": "t.csv", "catalogue": "c.txt"}, "output": {"dir": "out"},
            "peer": [{"rank": r, "name": n, "address": "10.0.0.1", "port": 7000 + r} for r, n in enumerate(NAMES)]}
    config = parse_party_config(base, base=pilot["pilot"])
    assert config.endpoint.tls.peer(2).name == "dealer" and config.endpoint.tls.ca == pilot["pilot"] / "ca.pem"
    broken = [
        ({"peer": base["peer"][:2]}, "no [[peer]] entry for rank 2"),
        ({"party": {**base["party"], "name": "org-x"}}, "is named 'party-0', but this party is 'org-x'"),
        ({"tls": {"ca": "ca.pem", "cert": "x"}}, "missing required setting tls.key"),
        ({"network": {"transport": "quic"}}, "network.transport must be one of"),
        ({"peer": [{**p, "fingerprint": "md5:00"} for p in base["peer"]]}, "fingerprint must be"),
        ({"network": {"transport": "gloo", "rendezvous": "tcp://h:1"}}, "apply only with"),
    ]
    for change, text in broken:
        with pytest.raises(ConfigError) as error:
            parse_party_config({**base, **change}, base=pilot["pilot"])
        assert text in str(error.value), str(error.value)


def _exact_job(session):
    """Truncation-free secure arithmetic: its revealed outputs do not depend on the shares."""
    import crypten

    a = crypten.cryptensor(torch.arange(-6, 6).reshape(3, 4), src=0, precision=0)
    b = crypten.cryptensor(torch.arange(8).reshape(4, 2) * 3 - 5, src=1, precision=0)
    product = a.matmul(b)
    positive = product > 10
    chosen = (product * positive).sum(dim=1)
    comm, rank = session.comm, session.comm.get_rank()
    mine = torch.tensor([rank + 1, 10 * rank + 3], dtype=torch.long)
    gathered = comm.gather(mine, 0)
    summed = comm.reduce(mine, 1)
    scattered = comm.scatter([mine * 0 + 5, mine * 0 + 7], 0)
    xor = comm.all_reduce(mine, op=torch.distributed.ReduceOp.BXOR)
    announced = comm.broadcast_obj({"run": "x", "sizes": [1, 2]} if rank == 0 else None, 0)
    comm.barrier()
    collectives = [[None if t is None else t.tolist() for t in gathered], None if summed is None else summed.tolist(),
                   scattered.tolist(), xor.tolist(), announced]
    return (product.get_plain_text().tolist(), positive.get_plain_text().tolist(), chosen.get_plain_text().tolist(),
            collectives, session.traffic())


def test_tls_run_equals_gloo_run(pilot):
    peers = tuple(PeerAddress(r, n, "127.0.0.1", free_port()) for r, n in enumerate(NAMES))
    tls = [TlsSettings(pilot["pilot"] / "ca.pem", pilot["pilot"] / f"{n}.pem", pilot["pilot"] / f"{n}.key", peers)
           for n in NAMES]
    over_tls = run_parties(_exact_job, 2, tls=tls)
    over_gloo = run_parties(_exact_job, 2)
    expected = (torch.arange(-6, 6).reshape(3, 4) @ (torch.arange(8).reshape(4, 2) * 3 - 5)).tolist()
    assert over_tls[0][0] == expected
    assert over_tls[0][3][0] == [[1, 3], [2, 13]] and over_tls[1][3][1] == [3, 16] and over_tls[1][3][2] == [7, 7]
    assert over_tls == over_gloo  # outputs at both parties, and the bytes and rounds CrypTen counts


def _tls_deployment(tmp_path, *, epochs, timeout_s):
    ratings = synthetic_ratings(n_users=20, n_items=8, density=0.4, seed=5)
    train, test = split_train_test(ratings, seed=0)
    options = RunOptions(parties=2, train=TrainConfig(epochs=epochs, learning_rate=0.01), timeout_s=timeout_s,
                         top_k=2, privacy=None, transport="tls")
    staging = tmp_path / "staging"
    parties, _ = write_deployment(options, tmp_path, staging, train, test, partition_users(ratings, 2),
                                  ratings.item_ids())
    return parties, staging


def _start(party, log_dir, prefix=()):
    log = open(log_dir / f"{party.name}.err", "w")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([*prefix, *mpc_rec_command(), "party", "--config", str(party.config)],
                            stdout=subprocess.DEVNULL, stderr=log, stdin=subprocess.DEVNULL, env=env)


def test_killed_party_aborts_the_tls_run_cleanly(tmp_path):
    parties, staging = _tls_deployment(tmp_path, epochs=300, timeout_s=8.0)
    processes = {p.name: _start(p, tmp_path) for p in parties}
    deadline = time.monotonic() + 120  # wait until training runs (its epochs print nothing here)
    while time.monotonic() < deadline and not _connected(processes):
        time.sleep(0.5)
    time.sleep(3)
    assert processes["party-0"].poll() is None, (tmp_path / "party-0.err").read_text()
    processes["party-1"].send_signal(signal.SIGKILL)
    started = time.monotonic()
    code = processes["party-0"].wait(timeout=60)
    assert code == 3 and time.monotonic() - started < 8.0 + 15
    error = (tmp_path / "party-0.err").read_text().strip().splitlines()[-1]
    assert "lost contact with party-1" in error, error
    assert processes["dealer"].wait(timeout=60) in (0, 3)
    assert not staging.exists() or not any(staging.rglob("*"))


def _connected(processes) -> bool:
    """Every process holds established TCP connections (the mesh is up)."""
    done = subprocess.run(["ss", "-tnp", "state", "established"], capture_output=True, text=True).stdout
    return all(f"pid={p.pid}," in done for p in processes.values())


def _results(staging: Path) -> dict[str, tuple[str, str]]:
    import json

    return {party.name: (json.loads((party / "party.json").read_text())["rmse_secure"],
                         (party / "recommendations.csv").read_text()) for party in sorted(staging.iterdir())}


def _netns(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True)


def test_parties_in_separate_network_namespaces(tmp_path):
    tag = uuid.uuid4().hex[:6]
    hub = f"mpcrec-hub-{tag}"
    if shutil.which("ip") is None:
        pytest.skip("iproute2 ('ip') is not installed")
    made = _netns("netns", "add", hub)
    if made.returncode != 0:
        pytest.skip(f"cannot create network namespaces here (needs root / CAP_SYS_ADMIN): {made.stderr.strip()}")
    spaces = [hub]
    try:
        assert _netns("-n", hub, "link", "add", "br0", "type", "bridge").returncode == 0
        assert _netns("-n", hub, "link", "set", "br0", "up").returncode == 0
        parties, staging = _tls_deployment(tmp_path, epochs=3, timeout_s=30.0)
        addresses = {}
        for index, party in enumerate(parties):
            space, address = f"mpcrec-{index}-{tag}", f"10.231.0.{index + 1}"
            spaces.append(space)
            steps = [("netns", "add", space),
                     ("link", "add", f"v{index}{tag}", "type", "veth", "peer", "name", f"h{index}{tag}"),
                     ("link", "set", f"v{index}{tag}", "netns", space),
                     ("link", "set", f"h{index}{tag}", "netns", hub),
                     ("-n", hub, "link", "set", f"h{index}{tag}", "master", "br0"),
                     ("-n", hub, "link", "set", f"h{index}{tag}", "up"),
                     ("-n", space, "addr", "add", f"{address}/24", "dev", f"v{index}{tag}"),
                     ("-n", space, "link", "set", f"v{index}{tag}", "up"),
                     ("-n", space, "link", "set", "lo", "up")]
            for step in steps:
                done = _netns(*step)
                assert done.returncode == 0, f"ip {' '.join(step)}: {done.stderr}"
            addresses[party.name] = address
        # The same deployment, first on loopback, then with each process in its namespace.
        loopback = [_start(p, tmp_path) for p in parties]
        assert [p.wait(timeout=240) for p in loopback] == [0] * len(parties), _logs(tmp_path)
        expected = _results(staging)
        shutil.rmtree(staging)
        for index, party in enumerate(parties):
            document = tomllib.loads(party.config.read_text())
            for peer in document["peer"]:
                peer["address"] = addresses[peer["name"]]
            party.config.write_text(dump_toml(document))
        isolated = [_start(p, tmp_path, prefix=("ip", "netns", "exec", spaces[i + 1])) for i, p in enumerate(parties)]
        assert [p.wait(timeout=240) for p in isolated] == [0] * len(parties), _logs(tmp_path)
        got = _results(staging)
        assert got.keys() == expected.keys()
        for name in expected:  # training truncates on random shares: two runs agree to ~1e-4, not bitwise
            assert abs(got[name][0] - expected[name][0]) < 2e-3
            same = set(got[name][1].splitlines()) & set(expected[name][1].splitlines())
            assert len(same) >= 0.8 * len(expected[name][1].splitlines())
    finally:
        for space in reversed(spaces):
            _netns("netns", "del", space)


def _logs(folder: Path) -> str:
    return "\n".join(f"{p.name}: {p.read_text()[-400:]}" for p in folder.glob("*.err"))


def test_certs_command_writes_private_keys_0600(tmp_path):
    done = subprocess.run([*mpc_rec_command(), "certs", "--out", str(tmp_path / "c"), "--parties", "org-a,org-b"],
                          capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "c" / "org-a.key").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "c" / "ca.key").stat().st_mode & 0o777 == 0o600
    assert "fingerprint sha256:" in done.stdout
    bad = subprocess.run([*mpc_rec_command(), "certs", "--out", str(tmp_path / "d"), "--parties", "Org A"],
                         capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert bad.returncode == 2 and "not a valid party name" in bad.stderr



def test_pilot_templates_describe_one_consistent_deployment():
    from mpc_rec.config import load_party_config

    configs = [load_party_config(path) for path in sorted((REPO / "parties" / "pilot").glob("*.toml"))]
    assert sorted(c.name for c in configs) == ["dealer", "org-a", "org-b", "org-c"]
    tables = {c.endpoint.tls.peers for c in configs}
    assert len(tables) == 1  # every organisation lists the same peers
    for config in configs:
        assert config.endpoint.tls.peer(config.endpoint.rank).name == config.name
        assert config.role == ("dealer" if config.endpoint.is_dealer else "compute")
        assert config.endpoint.tls.cert.name == f"{config.name}.pem"
