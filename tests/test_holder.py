"""The files a data holder keeps: the released item model and its users' controls."""

import json

import numpy as np
import pytest

from mpc_rec.data import Ratings
from mpc_rec.errors import DataError
from mpc_rec.holder import (Controls, ItemRelease, load_controls, load_release, write_controls_atomic,
                            write_release_atomic)


def test_release_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    release = ItemRelease(["a", "b", "c"], rng.normal(size=(3, 4)), rng.normal(size=3), 3.5,
                          {"epsilon": 1.0, "delta": 1e-5})
    write_release_atomic(tmp_path / "items.npz", release)
    loaded = load_release(tmp_path / "items.npz")
    assert loaded.item_ids == ["a", "b", "c"]
    np.testing.assert_array_equal(loaded.factors, release.factors)
    np.testing.assert_array_equal(loaded.biases, release.biases)
    assert loaded.mean == 3.5 and loaded.privacy == {"epsilon": 1.0, "delta": 1e-5}


def test_bad_release_files_are_named(tmp_path):
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip")
    with pytest.raises(DataError, match="garbage.npz: not a readable item release"):
        load_release(garbage)
    partial = tmp_path / "partial.npz"
    np.savez(partial, item_ids=np.array(["a"]), factors=np.zeros((1, 2)))
    with pytest.raises(DataError, match="missing biases, mean, privacy"):
        load_release(partial)
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, item_ids=np.array([object()], dtype=object), factors=np.zeros((1, 2)),
             biases=np.zeros(1), mean=np.float64(0), privacy=np.asarray("{}"))
    with pytest.raises(DataError, match="pickled.npz"):
        load_release(pickled)
    shapes = tmp_path / "shapes.npz"
    np.savez(shapes, item_ids=np.array(["a", "b"]), factors=np.zeros((3, 2)), biases=np.zeros(2),
             mean=np.float64(0), privacy=np.asarray("{}"))
    with pytest.raises(DataError, match="factors have shape"):
        load_release(shapes)
    nan = tmp_path / "nan.npz"
    np.savez(nan, item_ids=np.array(["a"]), factors=np.full((1, 2), np.nan), biases=np.zeros(1),
             mean=np.float64(0), privacy=np.asarray("{}"))
    with pytest.raises(DataError, match="factors must be finite"):
        load_release(nan)


def test_controls_filter_ratings_and_round_trip(tmp_path):
    ratings = Ratings(["u1", "u1", "u2", "u3"], ["i1", "i2", "i1", "i3"], [5, 4, 3, 2])
    controls = Controls({"u1": frozenset({"i2"})}, frozenset({"u3"}))
    kept = controls.apply(ratings)
    assert list(zip(kept.users, kept.items)) == [("u1", "i1"), ("u2", "i1")]
    assert controls.hidden("u1") == {"i2"} and controls.hidden("u2") == frozenset()
    write_controls_atomic(tmp_path / "controls.json", controls)
    assert load_controls(tmp_path / "controls.json") == controls
    assert load_controls(tmp_path / "absent.json") == Controls()


@pytest.mark.parametrize("content, problem", [
    ("{", "not a readable controls file"),
    ("[]", "must be a JSON object"),
    (json.dumps({"exclude": {"u": "i"}}), "exclude must map each user"),
    (json.dumps({"forget": "u"}), "forget must be a list"),
    (json.dumps({"version": 2}), "controls version 2"),
    (json.dumps({"delete": []}), "unknown controls key 'delete'"),
])
def test_bad_controls_are_named(tmp_path, content, problem):
    path = tmp_path / "controls.json"
    path.write_text(content)
    with pytest.raises(DataError, match=problem):
        load_controls(path)
