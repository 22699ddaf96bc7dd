"""The ingest channel over TLS (network.transport = "tls"): who may ask what, and a whole run."""

import json

import pytest

from conftest import run_cli
from mpc_rec.data import synthetic_ratings, write_ratings_csv
from mpc_rec.errors import PeerError
from mpc_rec.ingest.phase import channel_tls
from mpc_rec.ingest.transport import ChannelTls, Server, aggregator_client_tls, request
from mpc_rec.launch import free_port
from mpc_rec.transport.certs import make_pilot_certificates
from mpc_rec.transport.settings import PeerAddress, TlsSettings

NAMES = ["party-0", "party-1", "dealer"]  # key holder, aggregator, dealer


@pytest.fixture(scope="module")
def channel(tmp_path_factory):
    root = tmp_path_factory.mktemp("ingest-certs")
    make_pilot_certificates(root / "pilot", NAMES)
    make_pilot_certificates(root / "rogue", NAMES, ca_name="rogue CA")
    peers = tuple(PeerAddress(r, n, "127.0.0.1", 1) for r, n in enumerate(NAMES))

    def settings(rank, folder="pilot"):
        name = NAMES[rank]
        return TlsSettings(root / folder / "ca.pem", root / folder / f"{name}.pem", root / folder / f"{name}.key", peers)

    address = f"127.0.0.1:{free_port()}"
    handled = []

    def handle(header, body):
        handled.append(header["kind"])
        return {"status": "ok"}, (b"masked" if header["kind"] == "masked_sum" else None)

    _, server_tls = channel_tls(settings(1))
    server = Server(address, handle, lambda header: 1 << 16, io_timeout_s=5.0, tls=server_tls)
    yield {"address": address, "settings": settings, "handled": handled, "server": server, "root": root}
    server.close()


def _client(channel, rank, folder="pilot"):
    return channel_tls(channel["settings"](rank, folder))[0]


def test_parties_and_contributors_are_served_over_tls(channel):
    address = channel["address"]
    reply, body = request(address, {"kind": "masked_sum"}, wait_s=10, tls=_client(channel, 0), reply_limit=100)
    assert reply["status"] == "ok" and body == b"masked"
    assert request(address, {"kind": "ready", "rank": 2}, wait_s=10, tls=_client(channel, 2))[0]["status"] == "ok"
    contributor = aggregator_client_tls(channel["root"] / "pilot" / "ca.pem", "party-1", channel["root"])
    assert request(address, {"kind": "contribution"}, b"ciphertexts", wait_s=10, tls=contributor)[0]["status"] == "ok"
    assert channel["handled"][-3:] == ["masked_sum", "ready", "contribution"]


@pytest.mark.parametrize("case", ["contributor asks for the masked sum", "dealer asks for the masked sum",
                                  "certificate of another CA", "not the configured aggregator", "plain TCP"])
def test_wrong_peers_are_refused_on_the_ingest_channel(channel, case):
    address, handled = channel["address"], len(channel["handled"])
    contributor = aggregator_client_tls(channel["root"] / "pilot" / "ca.pem", "party-1", channel["root"])
    if case.endswith("masked sum"):
        tls = contributor if case.startswith("contributor") else _client(channel, 2)
        reply, _ = request(address, {"kind": "masked_sum"}, wait_s=10, tls=tls)
        assert reply["status"] == "rejected" and "needs the certificate of party-0" in reply["reason"]
    else:
        tls, expect = {
            "certificate of another CA": (_client(channel, 0, "rogue"), "TLS with the aggregator"),
            "not the configured aggregator": (ChannelTls(contributor.context, aggregator="org-x"),
                                              "is not 'org-x': its certificate names party-1; refused"),
            "plain TCP": (None, "lost the connection to the aggregator"),
        }[case]
        with pytest.raises(PeerError, match=expect):
            request(address, {"kind": "masked_sum"}, wait_s=5, tls=tls)
    assert len(channel["handled"]) == handled  # nothing reached the round


def test_run_with_contributors_over_tls(tmp_path):
    data = tmp_path / "r.csv"
    write_ratings_csv(synthetic_ratings(n_users=18, n_items=10, density=0.35, seed=4), data)
    done = run_cli("run", "--parties", "2", "--data", str(data), "--epochs", "2", "--no-dp", "--contributors", "2",
                   "--insecure-1024-bit-key", "--transport", "tls", "--out", str(tmp_path / "o"))
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["ingest"]["contributors_aggregated"] == 2 and summary["ingest"]["users_aggregated"] == 18
