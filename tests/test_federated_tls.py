"""The federated mode over TLS (--transport tls): a whole run, and who may use the holder channel."""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from conftest import assert_one_line_error, mpc_rec_command, run_cli
from mpc_rec.config import dump_toml
from mpc_rec.data import synthetic_ratings, write_catalogue, write_ratings_csv
from mpc_rec.errors import ConfigError, PeerError
from mpc_rec.federated.compute import HolderChannel, holder_channel_tls
from mpc_rec.federated.config import load_compute_config, load_holder_config
from mpc_rec.federated.holder import packing_spec
from mpc_rec.federated.model import initial_items
from mpc_rec.holder import ItemRelease, write_release_atomic
from mpc_rec.ingest.transport import request
from mpc_rec.launch import free_port
from mpc_rec.paillier.keys import generate_keypair, save_public_key
from mpc_rec.transport.certs import make_pilot_certificates
from mpc_rec.transport.settings import PeerAddress, TlsSettings

NAMES = ["party-0", "party-1", "party-2", "dealer"]  # key holder, aggregator, a further party, the dealer
HOLDERS = ("h001", "h002")


def test_federated_run_over_tls(tmp_path):
    data = tmp_path / "ratings.csv"
    write_ratings_csv(synthetic_ratings(n_users=40, n_items=15, seed=3), data)
    out = tmp_path / "out"
    done = run_cli("run", "--mode", "federated", "--holders", "2", "--parties", "2", "--data", str(data),
                   "--epochs", "2", "--no-dp", "--insecure-1024-bit-key", "--transport", "tls", "--out", str(out),
                   "--ledger-dir", str(tmp_path / "ledgers"), "--timeout", "120", timeout=600)
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["transport"] == "tls"
    assert [r["holders_aggregated"] for r in summary["rounds"]] == [2, 2]
    assert summary["refused"] == []  # no handshake failed, no request was turned away
    for holder in HOLDERS:  # each holder authenticated the aggregator with the pilot CA, holding no certificate
        config = load_holder_config(out / "holders" / holder / "holder.toml")
        assert config.tls is not None and config.tls.aggregator == "party-1"
        assert not list((out / "holders" / holder).glob("*.key"))


# --- the holder channel's TLS, one piece at a time ------------------------------------------


@pytest.fixture(scope="module")
def channel(tmp_path_factory):
    """The aggregator's real HolderChannel, configured over TLS from a compute party's file."""
    root = tmp_path_factory.mktemp("federated-tls")
    make_pilot_certificates(root / "pilot", NAMES)
    make_pilot_certificates(root / "rogue", NAMES, ca_name="rogue CA")
    public_key, _ = generate_keypair(1024, allow_insecure_size=True)
    save_public_key(root / "public.json", public_key)
    ratings = synthetic_ratings(n_users=8, n_items=6, seed=2)
    catalogue = ratings.item_ids()
    write_catalogue(catalogue, root / "catalogue.txt")
    write_ratings_csv(ratings, root / "train.csv")
    address, run_id = f"127.0.0.1:{free_port()}", "run-tls"
    peers = [{"rank": rank, "name": name, "address": "127.0.0.1", "port": free_port()}
             for rank, name in enumerate(NAMES)]

    def party_file(rank: int) -> dict:
        name = NAMES[rank]
        return {"party": {"name": name, "rank": rank, "world_size": 3},
                "network": {"transport": "tls", "timeout_s": 20.0},
                "tls": {"ca": "pilot/ca.pem", "cert": f"pilot/{name}.pem", "key": f"pilot/{name}.key"},
                "federated": {"catalogue": "catalogue.txt", "release": "release.npz", "channel": address,
                              "holders": ",".join(HOLDERS), "rounds": 2, "factors": 2, "clip": 0.1, "max_users": 10,
                              "run_id": run_id, "wait_s": 20.0, "deadline_s": 1.0, "evaluation": "exact"},
                "paillier": {"fingerprint": public_key.fingerprint, "public_key": "public.json"},
                "output": {"dir": "out"}, "peer": peers}

    (root / "party-1.toml").write_text(dump_toml(party_file(1)))
    config = load_compute_config(root / "party-1.toml")
    spec = packing_spec(public_key.bits, clip=0.1, max_users=10, max_holders=len(HOLDERS))
    server = HolderChannel(config, public_key, spec, length=len(catalogue) * 3)
    write_release_atomic(root / "release.npz", ItemRelease(catalogue, *initial_items(len(catalogue), 2, scale=0.1, seed=1),
                                                           3.0, {"run_id": run_id, "round": 0}))

    def holder_file(hid: str, ca_folder: str, name: str):
        document = {"holder": {"id": hid, "dir": hid, "workers": 1}, "data": {"train": "train.csv"},
                    "federated": {"release": "release.npz", "aggregator": address, "rounds": 1, "clip": 0.1,
                                  "max_users": 10, "max_holders": len(HOLDERS), "run_id": run_id, "wait_s": 20.0},
                    "key": {"public_key": "public.json", "fingerprint": public_key.fingerprint},
                    "aggregator": {"ca": f"{ca_folder}/ca.pem", "name": name}}
        path = root / f"{hid}-{ca_folder}-{name}.toml"
        path.write_text(dump_toml(document))
        return path

    def party_client(rank: int):
        name = NAMES[rank]
        settings = TlsSettings(root / "pilot" / "ca.pem", root / "pilot" / f"{name}.pem", root / "pilot" / f"{name}.key",
                               tuple(PeerAddress(**peer) for peer in peers))
        return holder_channel_tls(settings)[0]

    yield {"server": server, "address": address, "holder_file": holder_file, "party_client": party_client,
           "root": root}
    server.close()


def test_holders_refuse_an_aggregator_they_cannot_authenticate(channel):
    server = channel["server"]
    server.open(0)
    cases = {  # holder -> (CA it trusts, name it expects), what it must say
        "h001": (("rogue", "party-1"), "TLS with the aggregator"),
        "h002": (("pilot", "party-0"), "is not 'party-0': its certificate names party-1; refused"),
    }
    holders = {hid: subprocess.Popen([*mpc_rec_command(), "holder", "--config", str(channel["holder_file"](hid, *trust))],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for hid, (trust, _) in cases.items()}
    for hid, process in holders.items():
        stdout, stderr = process.communicate(timeout=120)
        assert_one_line_error(subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr), 3,
                        cases[hid][1])
    assert server.collect(0) == []  # nothing reached the round (no plain-TCP fallback either)


def test_only_compute_parties_may_wait_on_the_holder_channel(channel):
    server, address = channel["server"], channel["address"]
    server.open(1)
    assert server.collect(1) == []  # the deadline passes with no holder: round 1 settles
    holder = load_holder_config(channel["holder_file"]("h001", "pilot", "party-1")).tls
    reply, _ = request(address, {"kind": "wait", "round": 1}, wait_s=10, tls=holder)
    assert reply["status"] == "rejected"
    assert "a 'wait' request needs the certificate of party-0 or party-2; refused" in reply["reason"]
    dealer = channel["party_client"](3)  # a pilot certificate, but the dealer never waits on holders
    assert request(address, {"kind": "wait", "round": 1}, wait_s=10, tls=dealer)[0]["status"] == "rejected"
    for rank in (0, 2):
        assert request(address, {"kind": "wait", "round": 1}, wait_s=10, tls=channel["party_client"](rank))[0] == {
            "status": "ok", "body": False}
    with pytest.raises(PeerError, match="lost the connection to the aggregator"):  # no plain TCP
        request(address, {"kind": "wait", "round": 1}, wait_s=5)


@pytest.mark.parametrize("case", ["ca without name", "missing CA file", "tls without [tls]", "bad peer entry",
                                  "peers as a table"])
def test_bad_tls_settings_are_one_line_config_errors(channel, tmp_path, case):
    root = channel["root"]
    if case in ("ca without name", "missing CA file"):
        path = channel["holder_file"]("h001", "pilot", "party-1")
        text = path.read_text()
        text = (text.replace('name = "party-1"\n', "") if case == "ca without name"
                else text.replace('ca = "pilot/ca.pem"', 'ca = "nowhere/ca.pem"'))
        load, expect = load_holder_config, {"ca without name": "aggregator.ca and aggregator.name go together",
                                            "missing CA file": "aggregator.ca"}[case]
    else:
        text = (root / "party-1.toml").read_text()
        if case == "tls without [tls]":
            text, expect = re.sub(r"\[tls\]\n[^\[]*", "", text), "missing required setting tls.ca"
        elif case == "bad peer entry":
            text, expect = text.replace('name = "party-2"\n', 'name = "party-2"\ncolour = "blue"\n'), "unknown setting peer.colour"
        else:
            text, expect = text.split("[[peer]]")[0] + "[peer]\nrank = 0\n", "[peer] must be an array of tables"
        load = load_compute_config
    path = tmp_path / "file.toml"
    path.write_text(text)
    for link in ("pilot", "public.json", "catalogue.txt", "train.csv", "release.npz"):
        (tmp_path / link).symlink_to(root / link)
    with pytest.raises(ConfigError) as error:
        load(path)
    assert str(path) in str(error.value) and expect in str(error.value) and "\n" not in str(error.value)
