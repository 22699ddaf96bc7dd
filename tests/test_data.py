"""Tests for mpc_rec.data: loaders, their errors, synthetic data, splits, writers."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from mpc_rec.data import (
    DEFAULT_RATING_RANGE,
    Ratings,
    dense_matrices,
    load_ratings,
    partition_users,
    read_catalogue,
    sort_ids,
    split_train_test,
    synthetic_ratings,
    write_catalogue,
    write_ratings_csv,
)
from mpc_rec.errors import DataError, InputError

ML100K = Path("/work/shared/datasets/ml-100k/ml-100k.inter")


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def triples(r: Ratings) -> list[tuple[str, str, float]]:
    return list(zip(r.users.tolist(), r.items.tolist(), r.values.tolist()))


# ---------------------------------------------------------------- formats


def test_inter_format(tmp_path):
    path = write(
        tmp_path, "x.inter",
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
        "196\t242\t3\t881250949\n186\t302\t4.5\t891717742\n\n\n",
    )
    r = load_ratings(path)
    assert triples(r) == [("196", "242", 3.0), ("186", "302", 4.5)]
    assert r.values.dtype == np.float64
    assert r.users.dtype == object and isinstance(r.users[0], str)


def test_inter_columns_by_name_in_any_order(tmp_path):
    path = write(
        tmp_path, "x.inter",
        "rating:float\tgenre:token_seq\titem_id:token\tuser_id:token\n2\ta b c\tm1\tu1\n",
    )
    assert triples(load_ratings(path)) == [("u1", "m1", 2.0)]


def test_csv_with_index_column_and_timestamp(tmp_path):
    path = write(
        tmp_path, "r.csv",
        ",userId,movieId,Rating,timestamp\n0,1,31,2.5,1260759144\n1,1,1029,3.0,1260759179\n"
        "2,7,31,5,1260759182\n",
    )
    r = load_ratings(path)
    assert triples(r) == [("1", "31", 2.5), ("1", "1029", 3.0), ("7", "31", 5.0)]


@pytest.mark.parametrize("header", ["user,item,score", "USER_ID, Movie_ID, rating", "item,rating,user"])
def test_csv_aliases(tmp_path, header):
    cols = [c.strip().lower() for c in header.split(",")]
    row = {"u": "a", "i": "b", "r": "4"}
    values = [row["u"] if c.startswith("user") else row["r"] if c in ("score", "rating") else row["i"]
              for c in cols]
    path = write(tmp_path, "r.csv", header + "\n" + ",".join(values) + "\n")
    assert triples(load_ratings(path)) == [("a", "b", 4.0)]


def test_csv_quoted_ids_and_bom_and_crlf(tmp_path):
    path = tmp_path / "r.csv"
    path.write_bytes(b'\xef\xbb\xbfuser,item,rating\r\n"x, y","it ""1""",1\r\n')
    assert triples(load_ratings(path)) == [("x, y", 'it "1"', 1.0)]


def test_udata_tabs_and_spaces(tmp_path):
    path = write(tmp_path, "u.data", "196\t242\t3\t881250949\n186  302 3\n22\t377\t1\t878887116\n\n")
    r = load_ratings(path)
    assert triples(r) == [("196", "242", 3.0), ("186", "302", 3.0), ("22", "377", 1.0)]
    assert r.user_ids() == ["22", "186", "196"]
    assert r.item_ids() == ["242", "302", "377"]


def test_custom_rating_range(tmp_path):
    path = write(tmp_path, "u.data", "1 1 0.5\n1 2 10\n")
    assert load_ratings(path, rating_range=(0.5, 10)).values.tolist() == [0.5, 10.0]
    with pytest.raises(ValueError):
        load_ratings(path, rating_range=(5, 1))


def test_ml100k():
    if not ML100K.is_file():
        pytest.skip(f"{ML100K} is not present")
    r = load_ratings(ML100K)
    assert len(r) == 100_000
    assert len(r.user_ids()) == 943 and len(r.item_ids()) == 1682
    assert r.user_ids()[:3] == ["1", "2", "3"] and r.item_ids()[-1] == "1682"
    assert triples(r.subset([0])) == [("196", "242", 3.0)]
    assert set(np.unique(r.values).tolist()) == {1.0, 2.0, 3.0, 4.0, 5.0}


# ---------------------------------------------------------------- errors


def expect_error(path: Path, line: int | None, *words: str, **kw) -> str:
    with pytest.raises(DataError) as info:
        load_ratings(path, **kw)
    msg = str(info.value)
    assert "\n" not in msg
    prefix = f"{path}:{line}: " if line is not None else f"{path}: "
    assert msg.startswith(prefix), msg
    for word in words:
        assert word in msg, msg
    return msg


def test_error_missing_file_and_directory(tmp_path):
    expect_error(tmp_path / "nope.csv", None, "no such file")
    expect_error(tmp_path, None, "directory")
    assert issubclass(DataError, InputError) and DataError.exit_code == 2


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root can read anything")
def test_error_unreadable(tmp_path):
    path = write(tmp_path, "r.csv", "user,item,rating\n1,2,3\n")
    path.chmod(0)
    expect_error(path, None, "cannot read")


def test_error_unreadable_simulated(tmp_path, monkeypatch):
    import mpc_rec.data as data

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    path = write(tmp_path, "r.csv", "user,item,rating\n1,2,3\n")
    monkeypatch.setattr(data, "open", denied, raising=False)
    expect_error(path, None, "cannot read", "Permission denied")


def test_error_not_utf8(tmp_path):
    path = tmp_path / "u.data"
    path.write_bytes(b"1 2 3\n1 3 4\n\xff\xfe 4 5\n")
    expect_error(path, 3, "UTF-8")


@pytest.mark.parametrize("text", ["", "\n\n  \n"])
def test_error_empty(tmp_path, text):
    expect_error(write(tmp_path, "u.data", text), None, "no ratings", "empty")


@pytest.mark.parametrize(
    "name, text",
    [("r.csv", "user,item,rating\n\n"), ("r.inter", "user_id:token\titem_id:token\trating:float\n")],
)
def test_error_header_only(tmp_path, name, text):
    expect_error(write(tmp_path, name, text), None, "no ratings")


def test_error_missing_column_csv(tmp_path):
    path = write(tmp_path, "r.csv", "\nuser,movie,stars\n1,2,3\n")
    msg = expect_error(path, 2, "rating column", "'user', 'movie', 'stars'")
    assert "score" in msg  # lists the accepted names


def test_error_missing_column_inter(tmp_path):
    path = write(tmp_path, "r.inter", "user_id:token\trating:float\n1\t3\n")
    expect_error(path, 1, "item_id", "'user_id', 'rating'")


def test_error_ambiguous_column(tmp_path):
    expect_error(write(tmp_path, "r.csv", "user,user_id,item,rating\n1,1,2,3\n"), 1, "more than one user")


@pytest.mark.parametrize(
    "name, text, line",
    [
        ("u.data", "1 2 3\n1 3 4 5\n1 4\n", 3),
        ("u.data", "1 2 3\n1 3 4 5 6\n", 2),
        ("r.csv", "user,item,rating\n1,2,3\n1,3\n", 3),
        ("r.csv", "user,item,rating\n1,2,3\n\n1,3,4,5\n", 4),
        ("r.inter", "user_id:token\titem_id:token\trating:float\n1\t2\t3\n1 3 4\n", 3),
    ],
)
def test_error_field_count(tmp_path, name, text, line):
    expect_error(write(tmp_path, name, text), line, "fields")


@pytest.mark.parametrize("bad", ["abc", "", "1_0", "3,5"])
def test_error_not_a_number(tmp_path, bad):
    path = write(tmp_path, "r.inter", f"user_id:token\titem_id:token\trating:float\n1\t2\t3\n1\t3\t{bad}\n")
    expect_error(path, 3, "not a number")


@pytest.mark.parametrize("bad", ["nan", "inf", "-Infinity"])
def test_error_not_finite(tmp_path, bad):
    expect_error(write(tmp_path, "u.data", f"1 2 3\n\n1 3 {bad}\n"), 3, "not finite")


def test_error_out_of_range(tmp_path):
    path = write(tmp_path, "r.csv", "user,item,rating\n1,2,5\n1,3,5.5\n")
    expect_error(path, 3, "5.5", "out of range", "[1, 5]")
    expect_error(write(tmp_path, "u.data", "1 2 0\n"), 1, "0 is out of range")
    expect_error(write(tmp_path, "u.data", "1 2 5.0000001\n"), 1, "5.0000001 is out")
    expect_error(write(tmp_path, "u.data", "1 2 1\n"), 1, "[1.5, 2]", rating_range=(1.5, 2))


@pytest.mark.parametrize(
    "text, line, what",
    [("user,item,rating\n1,2,3\n ,3,4\n", 3, "empty user id"),
     ("user,item,rating\n1,,3\n", 2, "empty item id")],
)
def test_error_empty_id(tmp_path, text, line, what):
    expect_error(write(tmp_path, "r.csv", text), line, what)


def test_error_duplicate(tmp_path):
    path = write(tmp_path, "u.data", "1 2 3\n1 3 4\n2 2 4\n1 3 5\n")
    expect_error(path, 4, "duplicate", "'1'", "'3'", "first on line 2")


def test_first_error_is_reported(tmp_path):
    # Line 3 has a bad rating, line 4 the wrong field count: line 3 wins.
    path = write(tmp_path, "u.data", "1 2 3\n1 3 4\n1 4 x\n1\n")
    expect_error(path, 3, "not a number")


# ---------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic_and_valid():
    a, b = synthetic_ratings(seed=3), synthetic_ratings(seed=3)
    assert triples(a) == triples(b)
    assert triples(a) != triples(synthetic_ratings(seed=4))
    assert len(a.user_ids()) == 300 and len(a.item_ids()) == 200
    assert a.user_ids()[:3] == ["u1", "u10", "u100"]  # non-integer ids sort as text
    assert set(np.unique(a.values).tolist()) == {1.0, 2.0, 3.0, 4.0, 5.0}
    _, per_user = np.unique(a.users.astype(str), return_counts=True)
    assert per_user.min() >= 5
    assert 0.09 < len(a) / (300 * 200) < 0.15
    assert 3.0 < a.values.mean() < 4.0
    pairs = set(zip(a.users.tolist(), a.items.tolist()))
    assert len(pairs) == len(a)


def test_synthetic_small_and_sparse_still_covers():
    r = synthetic_ratings(n_users=40, n_items=30, density=0.01, seed=1)
    assert r.item_ids() == sort_ids(f"i{k}" for k in range(1, 31))
    _, per_user = np.unique(r.users.astype(str), return_counts=True)
    assert len(per_user) == 40 and per_user.min() >= 5
    with pytest.raises(ValueError):
        synthetic_ratings(density=0.0)


def _biased_mf_rmse(train: Ratings, test: Ratings, k: int = 4, lam: float = 3.0) -> float:
    """A few sweeps of ALS on mean + biases + rank-k factors; test RMSE."""
    users, items = train.user_ids(), train.item_ids()
    R, M = dense_matrices(train, users, items)
    rng = np.random.default_rng(0)
    mu = train.values.mean()
    P = np.hstack([np.ones((len(users), 1)), rng.normal(0, 0.1, (len(users), k + 1))])
    Q = np.hstack([rng.normal(0, 0.1, (len(items), 1)), np.ones((len(items), 1)),
                   rng.normal(0, 0.1, (len(items), k))])
    # Column 0 of P is fixed at 1 (Q[:,0] = item bias); column 1 of Q is 1 (P[:,1] = user bias).
    for _ in range(15):
        for A, B, X, W, fixed in ((P, Q, R - mu, M, 0), (Q, P, (R - mu).T, M.T, 1)):
            free = [c for c in range(k + 2) if c != fixed]
            for row in range(A.shape[0]):
                obs = W[row] > 0
                Bf = B[obs][:, free]
                y = X[row, obs] - B[obs, fixed] * A[row, fixed]
                A[row, free] = np.linalg.solve(Bf.T @ Bf + lam * np.eye(len(free)), Bf.T @ y)
    u = {x: n for n, x in enumerate(users)}
    i = {x: n for n, x in enumerate(items)}
    pred = np.array([mu + P[u[a]] @ Q[i[b]] for a, b in zip(test.users, test.items)])
    return float(np.sqrt(np.mean((np.clip(pred, 1, 5) - test.values) ** 2)))


def test_synthetic_is_learnable():
    train, test = split_train_test(synthetic_ratings(seed=0), seed=0)
    keep = np.isin(test.users, train.users) & np.isin(test.items, train.items)
    test = test.subset(keep)
    baseline = float(np.sqrt(np.mean((test.values - train.values.mean()) ** 2)))
    assert _biased_mf_rmse(train, test) < 0.7 * baseline


# ---------------------------------------------------------------- split / partition


def test_split_train_test():
    r = synthetic_ratings(n_users=50, n_items=40, seed=2)
    train, test = split_train_test(r, test_fraction=0.25, seed=7)
    assert len(test) == round(0.25 * len(r)) and len(train) + len(test) == len(r)
    tr, te = set(triples(train)), set(triples(test))
    assert not tr & te and tr | te == set(triples(r))
    again = split_train_test(r, test_fraction=0.25, seed=7)
    assert triples(again[1]) == triples(test)
    assert triples(split_train_test(r, test_fraction=0.25, seed=8)[1]) != triples(test)
    order = {t: n for n, t in enumerate(triples(r))}
    assert [order[t] for t in triples(test)] == sorted(order[t] for t in triples(test))
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError):
            split_train_test(r, test_fraction=bad)


def test_partition_users():
    r = synthetic_ratings(n_users=31, n_items=20, seed=5)
    parts = partition_users(r, 3, seed=1)
    assert len(parts) == 3
    user_sets = [set(p.users.tolist()) for p in parts]
    assert sorted(len(s) for s in user_sets) == [10, 10, 11]
    assert not (user_sets[0] & user_sets[1] or user_sets[0] & user_sets[2] or user_sets[1] & user_sets[2])
    assert set().union(*user_sets) == set(r.user_ids())
    assert sum(len(p) for p in parts) == len(r)
    assert sorted(t for p in parts for t in triples(p)) == sorted(triples(r))
    again = partition_users(r, 3, seed=1)
    assert [triples(p) for p in again] == [triples(p) for p in parts]
    assert [set(p.users.tolist()) for p in partition_users(r, 3, seed=2)] != user_sets
    order = {t: n for n, t in enumerate(triples(r))}
    assert [order[t] for t in triples(parts[0])] == sorted(order[t] for t in triples(parts[0]))
    with pytest.raises(DataError, match="31 users among 32"):
        partition_users(r, 32)
    with pytest.raises(DataError):
        partition_users(r, 0)


# ---------------------------------------------------------------- writing and matrices


def test_ratings_csv_round_trip(tmp_path):
    r = Ratings(np.array(["1", "a,b", 'q"x']), np.array(["10", "2", "3"]),
                np.array([1.0, 1.1 + 2.2, 4.999999999999999]))
    path = tmp_path / "out.csv"
    write_ratings_csv(r, path)
    assert path.read_text().splitlines()[0] == "user,item,rating"
    back = load_ratings(path)
    assert triples(back) == triples(r)
    write_ratings_csv(r.subset([0]), path)  # replacing an existing file
    assert triples(load_ratings(path)) == [("1", "10", 1.0)]
    assert [p.name for p in tmp_path.iterdir()] == ["out.csv"]  # no temp files left
    with pytest.raises(DataError):
        write_ratings_csv(Ratings(np.array([" x"]), np.array(["1"]), np.array([1.0])), path)


def test_write_errors_are_input_errors(tmp_path):
    r = synthetic_ratings(n_users=5, n_items=5, seed=0)
    (tmp_path / "d").mkdir()
    with pytest.raises(InputError, match="d: cannot write"):
        write_ratings_csv(r, tmp_path / "d")
    with pytest.raises(InputError, match="cannot write"):
        write_catalogue(["a"], tmp_path / "no" / "such" / "dir.txt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # temp file cleaned up


def test_synthetic_round_trip(tmp_path):
    r = synthetic_ratings(n_users=20, n_items=15, seed=1)
    write_ratings_csv(r, tmp_path / "s.csv")
    assert triples(load_ratings(tmp_path / "s.csv")) == triples(r)


def test_catalogue_round_trip_and_errors(tmp_path):
    path = tmp_path / "cat.txt"
    write_catalogue(["b", "a", "10"], path)
    assert path.read_text() == "item\nb\na\n10\n"
    assert read_catalogue(path) == ["b", "a", "10"]
    with pytest.raises(DataError, match="duplicate"):
        write_catalogue(["a", "a"], path)
    with pytest.raises(DataError, match=r"cat2.txt:4: duplicate item 'x' \(first on line 2\)"):
        read_catalogue(write(tmp_path, "cat2.txt", "item\nx\ny\nx\n"))
    with pytest.raises(DataError, match="missing.txt: no such file"):
        read_catalogue(tmp_path / "missing.txt")
    with pytest.raises(DataError, match="e.txt: empty"):
        read_catalogue(write(tmp_path, "e.txt", ""))
    with pytest.raises(DataError, match="h.txt: empty"):
        read_catalogue(write(tmp_path, "h.txt", "item\n"))
    with pytest.raises(DataError, match="w.txt:1: expected the header"):
        read_catalogue(write(tmp_path, "w.txt", "user,item,rating\n"))


def test_dense_matrices():
    r = Ratings(np.array(["u2", "u1", "u2"]), np.array(["b", "a", "c"]), np.array([4.0, 2.5, 1.0]))
    R, M = dense_matrices(r, ["u1", "u2"], ["a", "b", "c", "d"])
    assert R.dtype == M.dtype == np.float64 and R.shape == M.shape == (2, 4)
    np.testing.assert_array_equal(R, [[2.5, 0, 0, 0], [0, 4.0, 1.0, 0]])
    np.testing.assert_array_equal(M, [[1, 0, 0, 0], [0, 1, 1, 0]])
    with pytest.raises(DataError, match="item 'c' is not in the catalogue"):
        dense_matrices(r, ["u1", "u2"], ["a", "b"])
    with pytest.raises(DataError, match="user 'u2'"):
        dense_matrices(r, ["u1"], ["a", "b", "c"])


def test_ratings_basics():
    r = Ratings([1, 2, 10], ["x", "y", "z"], [3, 4, 5])
    assert len(r) == 3 and r.users.tolist() == ["1", "2", "10"] and r.values.dtype == np.float64
    assert r.user_ids() == ["1", "2", "10"]
    assert triples(r.subset(np.array([False, True, True]))) == [("2", "y", 4.0), ("10", "z", 5.0)]
    assert len(r.subset([])) == 0
    with pytest.raises(ValueError):
        Ratings(["1"], ["x", "y"], [1.0, 2.0])
    assert sort_ids(["10", "9", "007", "7", "9"]) == ["007", "7", "9", "10"]
    assert sort_ids(["b", "10", "9"]) == ["10", "9", "b"]
    assert DEFAULT_RATING_RANGE == (1.0, 5.0)
