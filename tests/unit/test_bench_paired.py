"""The paired statistic the serving benchmarks report: median change with its interval."""

from __future__ import annotations

import random

import pytest

from ballast.bench.paired import median_interval, paired_change


def test_interval_uses_the_sign_test_order_statistics() -> None:
    # n = 20 at 95 %: the 6th and 15th smallest (the textbook ranks).
    assert median_interval([float(i) for i in range(1, 21)]) == (6.0, 15.0)
    # n = 6: the extremes cover 1 - 2/64 = 96.9 %; n = 5 cannot reach 95 % (93.75 %).
    assert median_interval([3.0, 1.0, 2.0, 6.0, 5.0, 4.0]) == (1.0, 6.0)
    assert median_interval([1.0, 2.0, 3.0, 4.0, 5.0]) is None
    assert median_interval([1.0, 2.0, 3.0, 4.0, 5.0], confidence=0.9) == (1.0, 5.0)


def test_interval_covers_the_true_median_about_as_often_as_it_says() -> None:
    rng = random.Random(7)
    trials, covered = 2000, 0
    for _ in range(trials):
        xs = [rng.gauss(-3.0, 8.0) for _ in range(40)]
        low, high = median_interval(xs) or (0.0, 0.0)
        covered += low <= -3.0 <= high
    # Order-statistic intervals are conservative: at least 95 %, and not wildly more.
    assert 0.94 <= covered / trials <= 0.985


def test_interval_narrows_with_more_rounds() -> None:
    rng = random.Random(3)
    few = median_interval([rng.gauss(0, 8) for _ in range(20)])
    many = median_interval([rng.gauss(0, 8) for _ in range(400)])
    assert few is not None and many is not None
    assert many[1] - many[0] < (few[1] - few[0]) / 2


def test_paired_change_compares_each_round_with_its_own_baseline() -> None:
    base = [100.0, 200.0, 100.0, 200.0, 100.0, 200.0, 100.0]
    # 10 % slower in every round, although the rounds themselves swing by 2x.
    c = paired_change([90.0, 180.0, 90.0, 180.0, 90.0, 180.0, 90.0], base)
    assert c.rounds == 7
    assert c.median == pytest.approx(-10.0)
    assert c.low == pytest.approx(-10.0) and c.high == pytest.approx(-10.0)
    assert c.text().startswith("-10.0% [-10,-10] (95% CI -10.0..-10.0, 7 rounds)")


def test_paired_change_says_when_rounds_are_too_few() -> None:
    c = paired_change([110.0, 200.0], [100.0, 200.0])
    assert c.median == pytest.approx(5.0)
    assert c.low is None and c.high is None
    assert c.text() == "+5.0% (too few rounds for a 95% interval)"


@pytest.mark.parametrize(
    ("values", "base", "match"),
    [([], [], "same number"), ([1.0], [1.0, 2.0], "same number"), ([1.0], [0.0], "positive")],
)
def test_paired_change_refuses_what_it_cannot_compare(
    values: list[float], base: list[float], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        paired_change(values, base)


@pytest.mark.parametrize("confidence", [0.0, 1.0, 1.5])
def test_interval_refuses_an_impossible_confidence(confidence: float) -> None:
    with pytest.raises(ValueError, match="confidence"):
        median_interval([1.0, 2.0, 3.0], confidence)


def test_split_cost_leaves_out_rounds_with_failures(monkeypatch: pytest.MonkeyPatch) -> None:
    """``ballast bench serving``'s alternating rounds, wrk and /proc replaced by a script of
    rounds: a round where either side failed requests (or served nothing) is no pair."""
    from pathlib import Path

    from ballast.bench import serving

    # Per round and gateway (one, split): req/s, failed requests. Round 1's split failed
    # requests, round 2's one version served nothing.
    script = {
        ("one", 0): (1000.0, 0),
        ("split", 0): (950.0, 0),
        ("one", 1): (1000.0, 0),
        ("split", 1): (10.0, 3),
        ("one", 2): (0.0, 0),
        ("split", 2): (900.0, 0),
        ("one", 3): (2000.0, 0),
        ("split", 3): (1900.0, 0),
    }
    calls: list[str] = []
    ticks = iter(range(0, 10_000, 100))

    def wrk(url: str, _script: Path, c: int, seconds: float, server: str) -> serving.Row:
        rps, errors = script[(server, len(calls) // 2)]
        calls.append(server)
        return serving.Row(server, c, rps, 1.0, 2.0, errors, seconds)

    monkeypatch.setattr(serving, "_wrk", wrk)
    monkeypatch.setattr(serving, "cpu_ticks", lambda pids: next(ticks))
    cost, errors = serving._split_cost(
        2, ("one", "u1", 1), ("split", "u2", 2), Path("x.lua"), 4, 1.0, lambda msg: None
    )
    # Rounds alternate which goes first; every one of them was run.
    assert calls == ["one", "split", "split", "one", "one", "split", "split", "one"]
    assert errors == 3
    assert cost.rounds == 2  # rounds 0 and 3
    assert cost.rps_change is not None and cost.rps_change.median == pytest.approx(-5.0)
    assert cost.cpu_change is not None and cost.cpu_change.rounds == 2
