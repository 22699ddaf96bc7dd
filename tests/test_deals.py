"""Bad replies and requests on the dealer line are refused before anything is allocated.

Rank 0's side runs against a scripted dealer line (what a faulty or hostile dealer could
send); the dealer's side is the real request handler.
"""

import pytest
import torch

from mpc_rec.errors import PeerError
from mpc_rec.mpc import deals


class _DealerLine:
    """Rank 0's communicator, with the dealer's announced size and payload scripted."""

    ttp_group = ttp_comm_group = None

    def __init__(self, announced, payload=None, max_bytes=None):
        self.announced, self.payload = announced, payload
        self.requests, self.payloads_read = [], 0
        if max_bytes is not None:
            link = type("Link", (), {"max_bytes": max_bytes})()
            self.mesh = type("Mesh", (), {"link": lambda _, rank: link})()

    def get_rank(self):
        return 0

    def get_ttp_rank(self):
        return 2

    def send_obj(self, message, dst, group):
        self.requests.append(message["function"])

    def recv_obj(self, src, group):
        return self.announced

    def broadcast(self, tensor, src, group):
        self.payloads_read += 1
        tensor.copy_(self.payload.reshape(tensor.shape))
        return tensor


@pytest.fixture
def line(monkeypatch):
    def install(*args, **kwargs):
        fake = _DealerLine(*args, **kwargs)
        monkeypatch.setattr(deals, "comm", lambda: fake)
        monkeypatch.setattr(deals, "draw", lambda shape: torch.zeros(shape, dtype=torch.int64))
        monkeypatch.setattr(deals, "_unread", [])
        return fake
    return install


@pytest.mark.parametrize("announced", [[deals.MAX_ELEMENTS + 1], [1 << 20, 1 << 20], [-1], [2.0], [True], "8",
                                       [1] * 9, None])
def test_an_invalid_announced_size_is_refused_before_the_payload(line, announced):
    fake = line(announced)
    with pytest.raises(PeerError, match="the dealer announced an invalid result size"):
        deals.request("mf_truncation", [[4, 16]])
    assert fake.payloads_read == 0


def test_the_announced_size_is_held_to_the_links_message_limit(line):
    fake = line([101], max_bytes=800)  # the TLS link carries at most 100 int64 elements
    with pytest.raises(PeerError, match="invalid result size"):
        deals.request("mf_truncation", [[4, 16]])
    fake = line([100], torch.arange(100), max_bytes=800)
    assert torch.equal(deals.request("mf_truncation", [[4, 16]]), torch.arange(100))
    assert fake.payloads_read == 1


def test_a_bundle_reply_of_the_wrong_length_is_refused_with_the_request_named(line):
    fake = line([7], torch.arange(7))  # a truncation of 4 elements needs 2 x 4
    bundle = deals.Bundle([deals.TruncationDeal([[4, 16]])], ("mf_epoch", [1, 4, 1, 0, 0])).send()
    assert fake.requests == ["mf_epoch"]
    with pytest.raises(PeerError, match="the dealer's reply to mf_epoch has 7 elements, not 8"):
        bundle.ready()
    fake.announced, fake.payload = [8], torch.arange(8)
    (deal,) = deals.Bundle([deals.TruncationDeal([[4, 16]])], ("mf_epoch", [1, 4, 1, 0, 0])).send().ready()
    assert torch.equal(deal.high, torch.arange(4)) and torch.equal(deal.msb, torch.arange(4, 8))


@pytest.mark.parametrize("arguments, words", [
    ([10, 10, 4, 2, 0], "malformed epoch request"), ([10, 10, 4, 0, -1], "malformed epoch request"),
    ([0, 10, 4, 0, 0], "malformed epoch request"), ([1 << 15, 1 << 15, 4, 0, 0], "refused a request for shape"),
])
def test_the_dealer_refuses_a_malformed_epoch_request(arguments, words):
    from mpc_rec.compat import import_crypten
    from mpc_rec.mpc.dealer import make_server_class

    import_crypten()
    dealer_class = make_server_class()
    dealer = dealer_class.__new__(dealer_class)  # no generators: the request must fail before any draw
    with pytest.raises(PeerError, match=words):
        dealer.mf_epoch(*arguments)
