"""Release policy: the threshold mechanism's distribution, its DP bound, the per-user ledger."""

import itertools
import json
import math
import random
from collections import Counter

import pytest
from scipy import stats

from conftest import run_cli
from mpc_rec.errors import InputError
from mpc_rec.release import (
    ReleaseConfig, SeededRandom, ThresholdPlan, count_distribution, draw_threshold, read_user_levels,
    release_lists, threshold_plan,
)

ALPHA = 1e-3  # fixed seeds make each verdict deterministic; alpha sets how strict it is


def _release_counts(plan: ThresholdPlan, draws: int, seed: str) -> tuple[Counter, Counter]:
    """Over ``draws`` releases: which item sat in the first slot, and how many priority items."""
    rng = SeededRandom(seed)
    ranked = [f"r{i}" for i in range(plan.priority)]
    others = [f"o{i}" for i in range(plan.candidates - plan.priority)]
    first, priority = Counter(), Counter()
    for _ in range(draws):
        shown = draw_threshold(ranked, others, plan, rng)
        assert len(set(shown)) == plan.size
        first[shown[0]] += 1
        priority[sum(item.startswith("r") for item in shown)] += 1
    return first, priority


def _chi_square_p(observed: Counter, expected: dict, draws: int) -> float:
    keys = [k for k, p in expected.items() if p > 0]
    statistic, p_value = stats.chisquare([observed[k] for k in keys], [draws * expected[k] for k in keys])
    return p_value


def _intended(plan: ThresholdPlan) -> tuple[dict, dict]:
    """The intended law: the first slot is item i with P(i released) / k (the list is shuffled)."""
    high, low = plan.inclusion_probabilities()
    items = {f"r{i}": high / plan.size for i in range(plan.priority)}
    items.update({f"o{i}": low / plan.size for i in range(plan.candidates - plan.priority)})
    return items, dict(enumerate(plan.count_probabilities))


def test_threshold_draws_items_with_the_intended_probabilities():
    plan = threshold_plan(12, 5, 3.0, 5)
    assert plan.priority >= 2  # both groups have several items, so uniformity within them is tested
    draws = 20000
    first, priority = _release_counts(plan, draws, seed="release-chi-square")
    item_law, count_law = _intended(plan)
    assert _chi_square_p(first, item_law, draws) > ALPHA
    assert _chi_square_p(priority, count_law, draws) > ALPHA
    high, low = plan.inclusion_probabilities()
    assert high > low


def test_the_chi_square_test_catches_a_miscalibrated_sampler():
    """Power check: the same test, the same number of draws, a sampler using epsilon 3.5 instead of 3."""
    intended = threshold_plan(12, 5, 3.0, 5)
    wrong = ThresholdPlan(12, 5, 3.5, intended.priority, intended.min_priority,
                          count_distribution(12, intended.priority, 5, 3.5, intended.min_priority))
    draws = 20000
    first, priority = _release_counts(wrong, draws, seed="release-chi-square")
    item_law, count_law = _intended(intended)
    assert _chi_square_p(priority, count_law, draws) < ALPHA
    assert _chi_square_p(first, item_law, draws) < ALPHA


def test_one_release_is_epsilon_dp_for_any_two_rankings():
    """Exact check on a small catalogue: every k-subset's probability under every ranking."""
    n, k, epsilon = 7, 3, 1.5
    plan = threshold_plan(n, k, epsilon, k)

    def probability(subset, top):  # top: the ranking's priority set
        c = len(set(subset) & set(top))
        per_set = math.comb(plan.priority, c) * math.comb(n - plan.priority, k - c)
        return plan.count_probabilities[c] / per_set

    tops = list(itertools.combinations(range(n), plan.priority))
    for subset in itertools.combinations(range(n), k):
        values = [probability(subset, top) for top in tops]
        assert max(values) / min(values) <= math.exp(epsilon) * (1 + 1e-9)
    assert math.isclose(sum(probability(s, tops[0]) for s in itertools.combinations(range(n), k)), 1.0)


def test_priority_set_shrinks_as_epsilon_grows():
    sizes = [threshold_plan(1600, 10, eps, 10).priority for eps in (0.5, 1, 2, 4, 8)]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > sizes[-1]


class _NoDraws(random.Random):
    """A generator that fails the test if anything is drawn from it."""

    def random(self):
        raise AssertionError("a new release was drawn")

    def getrandbits(self, k):
        raise AssertionError("a new release was drawn")


def test_exhausted_user_budget_serves_the_last_release_again(tmp_path):
    ledger = tmp_path / "releases.json"
    config = ReleaseConfig(policy="threshold", epsilon=2.0, budget=3.0, ledger=ledger, run_id="run-1")
    users, ranked = ["alice"], [["a", "b", "c"]]
    unrated = [["a", "b", "c"] + [f"x{i}" for i in range(20)]]
    shown, record = release_lists(config, users, ranked, unrated, top_k=3, rng=SeededRandom(1))
    assert record["users"]["alice"]["status"] == "new" and record["users"]["alice"]["spent"] == 2.0
    again = ReleaseConfig(policy="threshold", epsilon=2.0, budget=3.0, ledger=ledger, run_id="run-2")
    repeat, record = release_lists(again, users, ranked, unrated, top_k=3, rng=_NoDraws())
    assert repeat == shown
    assert record["users"]["alice"] == {"status": "repeated", "epsilon": 2.0, "spent": 2.0, "budget": 3.0,
                                        "left": 1.0, "priority_set": None}
    saved = json.loads(ledger.read_text())["users"]["alice"]
    assert [r["run_id"] for r in saved["releases"]] == ["run-1"] and saved["last"] == shown[0]


def test_a_user_with_no_budget_for_even_one_release_is_shown_nothing(tmp_path):
    config = ReleaseConfig(policy="threshold", epsilon=2.0, budget=1.0, ledger=tmp_path / "l.json")
    shown, record = release_lists(config, ["bob"], [["a"]], [["a", "b", "c"]], top_k=1, rng=_NoDraws())
    assert shown == [[]] and record["releases"]["withheld"] == 1


def test_a_stronger_user_level_is_used_and_exact_users_are_untouched(tmp_path):
    levels = tmp_path / "levels.csv"
    levels.write_text("user,epsilon\nalice,0.5\n")
    config = ReleaseConfig(policy="exact", ledger=tmp_path / "l.json", users=levels, budget=1.0)
    ranked = [["a", "b"], ["c", "d"]]
    unrated = [["a", "b"] + [f"x{i}" for i in range(9)], ["c", "d", "e"]]
    shown, record = release_lists(config, ["alice", "carol"], ranked, unrated, top_k=2, rng=SeededRandom(2))
    assert shown[1] == ["c", "d"] and record["releases"] == {"exact": 1, "new": 1, "repeated": 0, "withheld": 0}
    assert record["users"]["alice"]["epsilon"] == 0.5 and "carol" not in record["users"]


@pytest.mark.parametrize("content, problem", [
    ("user,epsilon\nalice,5\n", "line 2: user 'alice' asks for epsilon 5, weaker than the run's 2"),
    ("user,epsilon\nalice,x\n", "line 2: epsilon 'x' is not a number"),
    ("user,eps\n", "line 1: expected the header 'user,epsilon'"),
    ("user,epsilon\nzed,1\n", "line 2: user 'zed' is not a user of this data"),
    ("user,epsilon\nalice,1\nalice,1\n", "line 3: user 'alice' appears twice"),
])
def test_bad_user_level_files_are_refused_with_the_line(tmp_path, content, problem):
    path = tmp_path / "levels.csv"
    path.write_text(content)
    with pytest.raises(InputError, match=problem):
        read_user_levels(path, 2.0, {"alice"})


def test_cli_refuses_threshold_without_epsilon(tmp_path):
    done = run_cli("run", "--release", "threshold", "--out", str(tmp_path / "o"), timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip() == "mpc-rec: error: --release threshold needs --release-epsilon"
    assert not (tmp_path / "o" / "summary.json").exists()


def test_unknown_policy_in_a_party_config_is_refused(tmp_path):
    from mpc_rec.config import parse_party_config
    from mpc_rec.errors import ConfigError

    raw = {"party": {"name": "a", "rank": 0, "world_size": 2}, "network": {"rendezvous": "tcp://127.0.0.1:1"},
           "data": {"train": "t.csv", "catalogue": "c.txt"}, "output": {"dir": "out"},
           "release": {"policy": "fuzzy"}}
    with pytest.raises(ConfigError, match="release.policy must be one of exact, threshold, got 'fuzzy'"):
        parse_party_config(raw, base=tmp_path)


def test_real_run_draws_new_lists_and_repeats_for_a_spent_user(tmp_path):
    """Real party processes: a user whose ledger budget is spent gets the stored list back."""
    from mpc_rec.data import partition_users, synthetic_ratings, write_ratings_csv

    data = tmp_path / "small.csv"
    ratings = synthetic_ratings(n_users=30, n_items=20, density=0.3, seed=3)
    write_ratings_csv(ratings, data)
    spent_user = sorted(partition_users(ratings, 2, seed=0)[0].user_ids())[0]
    ledger_dir = tmp_path / "ledger"
    ledger_dir.mkdir()
    stored = ["i1", "i2"]
    (ledger_dir / "party-0-releases.json").write_text(json.dumps({
        "format": "mpc-rec-release-ledger/1",
        "users": {spent_user: {"budget": 3.0, "last": stored, "releases": [
            {"run_id": "earlier", "epsilon": 2.0, "timestamp": "2026-01-01T00:00:00Z"}]}}}))
    out = tmp_path / "out"
    done = run_cli("run", "--parties", "2", "--data", str(data), "--epochs", "2", "--top-k", "2", "--no-dp",
                   "--release", "threshold", "--release-epsilon", "2", "--release-budget", "3",
                   "--ledger-dir", str(ledger_dir), "--out", str(out))
    assert done.returncode == 0, done.stderr
    party = json.loads((out / "party-0" / "party.json").read_text())["release"]
    assert party["users"][spent_user]["status"] == "repeated"
    assert party["releases"] == {"exact": 0, "new": len(party["users"]) - 1, "repeated": 1, "withheld": 0}
    rows = [line.split(",") for line in (out / "party-0" / "recommendations.csv").read_text().splitlines()[1:]]
    assert [item for user, _, item in rows if user == spent_user] == stored
    per_user = {}
    for user, _, item in rows:
        per_user.setdefault(user, []).append(item)
    assert all(len(items) == 2 for items in per_user.values())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["release"]["parties"]["party-0"]["releases"]["repeated"] == 1
    ledger = json.loads((ledger_dir / "party-1-releases.json").read_text())["users"]
    assert all(len(u["releases"]) == 1 and u["releases"][0]["epsilon"] == 2.0 for u in ledger.values())
