import math

import pytest

from edgetts.strategies import aggregate as agg


def test_majority_drops_invalid_and_breaks_ties_by_first_seen():
    v = agg.majority_vote([None, "4", "3", "3", "4", None])
    assert v.answer == "4" and v.tally == {"4": 2.0, "3": 2.0} and v.valid == 4
    assert agg.majority_vote([None, None]).answer is None
    assert agg.majority_vote([]).answer is None


def test_weighted_vote_uses_weights():
    assert agg.weighted_vote(["a", "b", "b"], [5.0, 1.0, 1.0]).answer == "a"
    assert agg.weighted_vote(["a", None, "b"], [1.0, 9.0, 1.5]).answer == "b"
    with pytest.raises(ValueError):
        agg.weighted_vote(["a"], [1.0, 2.0])


def test_confidences():
    lps = [-0.1, -0.1, -3.0, -3.0, -0.1, -0.1]
    assert agg.mean_confidence(lps) == pytest.approx(sum(lps) / 6)
    assert agg.lowest_window_confidence(lps, window=2) == pytest.approx(-3.0)
    assert agg.lowest_window_confidence(lps, window=100) == pytest.approx(agg.mean_confidence(lps))
    assert agg.mean_confidence([]) == -math.inf


def test_beta_posterior_matches_closed_forms():
    assert agg.beta_prob_leader(0, 0) == pytest.approx(0.5)
    assert agg.beta_prob_leader(5, 0) == pytest.approx(1 - 0.5**6)  # Beta(6, 1): 1 - x^6 at 1/2
    assert agg.beta_prob_leader(3, 1) == pytest.approx(0.8125)  # Beta(4, 2)
    assert agg.beta_prob_leader(2, 2) == pytest.approx(0.5)


def test_adaptive_stops_when_agreeing_and_continues_when_split():
    assert agg.adaptive_should_stop(["7"] * 4)
    assert not agg.adaptive_should_stop(["7"] * 3)
    assert not agg.adaptive_should_stop(["7", "8", "7", "8", "7", "8"])
    assert not agg.adaptive_should_stop([None] * 8)


def test_esc_window():
    assert agg.esc_should_stop(["1", "2", "2", "2", "2"], window=4)
    assert not agg.esc_should_stop(["2", "2", "1", "2"], window=4)
    assert not agg.esc_should_stop([None] * 4, window=4)
    assert not agg.esc_should_stop(["2"] * 3, window=4)


def test_round_plans_and_replay():
    assert agg.adaptive_rounds(8) == [4, 2, 2] and agg.adaptive_rounds(3) == [3]
    assert agg.esc_rounds(8) == [2, 2, 2, 2] and agg.esc_rounds(10, window=4) == [4, 4, 2]

    def esc_stop(used, last):
        return agg.esc_should_stop(last, len(last))

    assert agg.replay_rounds(["7"] * 8, agg.esc_rounds(8), esc_stop) == 2
    assert agg.replay_rounds(["7", "8", "7", "7", "5", "6", "1", "2"], agg.esc_rounds(8), esc_stop) == 4
    assert agg.replay_rounds(["1", "2"] * 4, agg.esc_rounds(8), esc_stop) == 8
