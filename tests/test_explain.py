"""Holder-side explanations: the user's own liked items that co-occur with the shown item."""

import numpy as np

from mpc_rec.explain import explain


def test_driver_is_the_liked_item_that_others_liked_with_the_shown_item():
    catalogue = ["a", "c", "x", "y"]
    # liked = rated at or above the user's own mean. Leaving u0 out: liked(a) = {u1, u2},
    # liked(c) = {u3}; signal(x) = {u1 (liked), u2, u3 (shown)}, signal(y) = {u1 (shown), u3 (liked)}
    ratings = np.array([[5, 5, 0, 0], [5, 1, 4, 0], [4, 0, 0, 0], [2, 5, 0, 5]], dtype=float)
    rated = (ratings > 0).astype(float)
    shown = [["x", "y"], ["y"], ["x"], ["x"]]
    result = explain(["u0", "u1", "u2", "u3"], catalogue, ratings, rated, shown, limit=1)
    (user,) = result["users"]
    why = {item["item"]: [d["item"] for d in item["drivers"]] for item in user["items"]}
    scores = {item["item"]: [round(d["score"], 6) for d in item["drivers"]] for item in user["items"]}
    assert why["x"] == ["a", "c"] and scores["x"] == [round(2 / 6 ** 0.5, 6), round(1 / 3 ** 0.5, 6)]
    assert why["y"] == ["c", "a"] and scores["y"] == [round(1 / 2 ** 0.5, 6), 0.5]
    assert result["users_total"] == 4 and "not the model's internal reason" in result["method"]
