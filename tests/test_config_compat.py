"""Party configuration parsing and the CrypTen import shim."""

import sys
from pathlib import Path

import pytest

from mpc_rec.config import dump_toml, load_party_config, parse_party_config
from mpc_rec.errors import ConfigError

VALID = {
    "party": {"name": "org-a", "rank": 0, "world_size": 3},
    "network": {"rendezvous": "tcp://127.0.0.1:29500", "timeout_s": 20},
    "data": {"train": "a.csv", "catalogue": "items.txt"},
    "train": {"epochs": 5, "learning_rate": 0.01},
    "output": {"dir": "out", "top_k": 4},
}


def test_round_trip_and_relative_paths(tmp_path):
    path = tmp_path / "org-a.toml"
    path.write_text(dump_toml(VALID))
    config = load_party_config(path)
    assert config.endpoint.rank == 0 and config.endpoint.timeout_s == 20.0
    assert config.train.epochs == 5 and config.train.learning_rate == 0.01
    assert config.train_path == tmp_path / "a.csv" and config.output_dir == tmp_path / "out"
    assert config.test_path is None and config.top_k == 4 and config.endpoint.dealer == "ttp"


@pytest.mark.parametrize("change,message", [
    (("party", "rank", 3), "compute party rank must be below world_size"),
    (("party", "rank", "0"), "party.rank must be int"),
    (("dealer", "kind", "tfp"), "unknown dealer 'tfp'"),
    (("network", "rendezvous", "127.0.0.1:1"), "rendezvous must be tcp://"),
    (("train", "momentum", 1.5), "momentum"),
    (("output", "top_k", -1), "top_k must be 0"),
    (("extra", "x", 1), "unknown section [extra]"),
])
def test_invalid_configs_name_the_problem(change, message):
    raw = {table: dict(values) for table, values in VALID.items()}
    table, key, value = change
    raw.setdefault(table, {})[key] = value
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_party_config(raw, base=Path("."))


def test_missing_required_setting():
    raw = {table: dict(values) for table, values in VALID.items()}
    del raw["data"]["catalogue"]
    with pytest.raises(ConfigError, match="missing required setting data.catalogue"):
        parse_party_config(raw, base=Path("."))


def test_invalid_toml_names_file(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("[party\n")
    with pytest.raises(ConfigError, match="broken.toml: invalid TOML"):
        load_party_config(path)


def test_crypten_imports_through_the_shim():
    from mpc_rec.compat import import_crypten

    crypten = import_crypten()
    assert crypten.__version__ == "0.4.1"
    assert import_crypten() is crypten
    stand_in = sys.modules.get("torch.onnx._internal.registration")
    assert stand_in is not None  # torch 2.13 lacks it; the shim must have provided it


def test_dp_defaults_follow_the_public_schedule_unless_set():
    from mpc_rec.cli import run
    from mpc_rec.launch import RunOptions

    def options(*args):
        return RunOptions.from_cli(run.make_context("run", list(args)).params)

    small = options("--epsilon", "1")
    assert (small.train.epochs, small.train.momentum) == (10, 0.5)
    assert (small.privacy["clip_step"], small.privacy["item_step"]) == (0.1, 1.0)
    large = options("--epsilon", "8", "--epochs", "7", "--dp-clip", "0.2")
    assert (large.train.epochs, large.privacy["clip_step"], large.privacy["item_step"]) == (7, 0.2, 3.0)
    exact = options("--no-dp")
    assert (exact.train.epochs, exact.train.momentum, exact.privacy) == (30, 0.9, None)
