"""``ballast canary simulate``: routing parity with the gateway, JSON shape, determinism, and the
qualitative picture on small run counts (the 200-run measurement is a script, not a test)."""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict
from typing import Any

import numpy as np
import pytest

from ballast.serving import Deployment, VersionSpec
from ballast.simulate import SimConfig, main, route_to_canary, simulate, simulate_run
from infra.gateway.versions import Live, Slot

# Short canaries keep these tests at a second or two each: 20 s steps, 5-minute ceiling.
FAST: dict[str, Any] = {"step_seconds": 20.0, "max_seconds": 300.0}


def spec(version: str) -> VersionSpec:
    return VersionSpec(version=version, artifact_path=f"/a/{version}.onnx", sha256="0" * 64)


@pytest.mark.parametrize("weight", [0, 5, 25, 50, 100])
def test_simulated_routing_is_the_gateways_unkeyed_routing(weight: int) -> None:
    champion, canary = spec("1"), spec("2")
    dep = Deployment(
        model="m",
        champion=champion,
        canary=canary if weight else None,
        canary_weight=weight,
    )
    # route() reads only the slots and the weight; nothing needs loading for it.
    live = Live(
        dep,
        Slot("champion", champion, None),  # type: ignore[arg-type]  # no model needed
        Slot("canary", canary, None) if weight else None,  # type: ignore[arg-type]
    )
    gateway_rng, draws = random.Random(42), random.Random(42)
    gateway = [live.route(None, gateway_rng) is live.canary for _ in range(2000)]
    simulated = route_to_canary(np.array([draws.random() for _ in range(2000)]), weight)
    assert simulated.tolist() == [bool(g) and weight > 0 for g in gateway]


@pytest.mark.parametrize("weight", [5, 25, 50])
def test_simulated_keyed_routing_is_the_gateways_keyed_routing(weight: int) -> None:
    # The simulation sends a key to the canary iff its bucket (uniform in [0, 1)) is below the
    # weight; the gateway iff its salted hash falls in one of the weight's buckets.
    champion, canary = spec("1"), spec("2")
    dep = Deployment(
        model="m", champion=champion, canary=canary, canary_weight=weight, key_salt="5eed"
    )
    live = Live(
        dep,
        Slot("champion", champion, None),  # type: ignore[arg-type]  # no model needed
        Slot("canary", canary, None),  # type: ignore[arg-type]
    )
    ids = [live.key_id(f"user-{i}") for i in range(2000)]
    gateway = [live.route(k, random.Random(0)) is live.canary for k in ids]
    bucket = np.array([(int(k, 16) % 10_000) / 10_000 for k in ids])
    assert route_to_canary(bucket, weight).tolist() == gateway
    assert abs(sum(gateway) / 2000 - weight / 100) < 4 * math.sqrt(weight * (100 - weight)) / 4472


def run_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    assert main([*args, "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    doc: dict[str, Any] = json.loads(out[-1])
    assert "rollback" in "\n".join(out[:-1]), "the table comes before the JSON line"
    return doc


def test_json_line_has_the_documented_shape(capsys: pytest.CaptureFixture[str]) -> None:
    doc = run_json(
        capsys, "--scenario", "errors", "--runs", "5", "--step-seconds", "20", "--seed", "3"
    )
    for key in ("rollback_rate", "promote_rate", "inconclusive_rate"):
        assert 0.0 <= doc[key] <= 1.0, key
    assert doc["rollback_rate"] + doc["promote_rate"] + doc["inconclusive_rate"] == 1.0
    for key in ("seconds_to_decision", "canary_requests", "excess_errors"):
        assert set(doc[key]) == {"p50", "p95"}, key
        assert doc[key]["p50"] <= doc[key]["p95"], key
    assert (doc["scenario"], doc["judge"], doc["runs"]) == ("errors", "sequential", 5)
    assert doc["config"]["effect"] == 0.05 and doc["config"]["seed"] == 3
    assert doc["config"]["steps"] == [5, 25, 50, 100]


def test_several_pairs_give_one_object_with_results(capsys: pytest.CaptureFixture[str]) -> None:
    doc = run_json(
        capsys,
        "--scenario",
        "errors",
        "--judge",
        "sequential,flagger",
        "--runs",
        "2",
        "--seed",
        "1",
    )
    assert [(r["scenario"], r["judge"]) for r in doc["results"]] == [
        ("errors", "sequential"),
        ("errors", "flagger"),
    ]


def test_same_seed_same_runs_other_seed_other_runs() -> None:
    cfg = SimConfig(scenario="errors", runs=8, seed=11, **FAST)
    a_summary, a = simulate(cfg)
    b_summary, b = simulate(cfg)
    assert a == b
    assert asdict(a_summary) | {"wall_seconds": 0} == asdict(b_summary) | {"wall_seconds": 0}
    _, c = simulate(SimConfig(scenario="errors", runs=8, seed=12, **FAST))
    assert [r.seconds for r in a] != [r.seconds for r in c]


def test_a_run_does_not_depend_on_how_many_runs_come_before_it() -> None:
    _, three = simulate(SimConfig(scenario="errors", runs=3, seed=5, **FAST))
    _, one = simulate(SimConfig(scenario="errors", runs=1, seed=5, **FAST))
    assert three[0] == one[0]


def test_sequential_judge_rolls_back_bad_canaries_and_promotes_a_copy() -> None:
    for scenario in ("errors", "latency", "drift"):
        summary, runs = simulate(SimConfig(scenario=scenario, runs=6, **FAST))
        assert summary.rollback_rate == 1.0, (scenario, summary)
        assert summary.seconds_to_decision["p95"] <= 60.0, (scenario, summary)
    summary, runs = simulate(SimConfig(scenario="aa", runs=6, **FAST))
    assert summary.promote_rate == 1.0, summary
    assert all(r.excess_errors == 0 for r in runs), "a copy of the champion fails nothing extra"


def test_sticky_keys_no_longer_roll_back_identical_canaries_nor_promote_bad_ones() -> None:
    # 200 keys that differ (some err or are slow far more than others), all traffic sticky.
    # Judged as if each request were routed at random, half of these identical canaries were
    # rolled back; judged per key, none is.
    keyed = {"keys": 200, **FAST}
    blind, _ = simulate(SimConfig(runs=12, hide_keys=True, **keyed))
    aware, _ = simulate(SimConfig(runs=12, **keyed))
    assert blind.rollback_rate >= 0.25, blind
    assert aware.rollback_rate == 0.0, aware
    # A canary failing five times as often: caught in most runs, good enough in none.
    bad, _ = simulate(SimConfig(scenario="errors", runs=12, **keyed))
    assert bad.rollback_rate >= 0.5 and bad.promote_rate == 0.0, bad


def test_threshold_judge_no_longer_reads_a_dominant_sticky_client_as_certain() -> None:
    # 200 clients, one of them carrying about 60 % of the traffic (Zipf 2), differing widely
    # in error rate. The plain sandwich read that client as nearly certain: 6 % of 400
    # identical canaries were rolled back on their error rate, against 2 % with the jackknife.
    keyed = {"judge": "threshold", "keys": 200, "key_skew": 2.0, "key_spread": 2.0, "runs": 400}
    aware, _ = simulate(SimConfig(**keyed))
    assert aware.rollback_reasons.get("error rate", 0) <= 16, aware  # 4 %
    # Still caught: a canary failing five times as often, over 200 clients.
    bad, _ = simulate(SimConfig(scenario="errors", judge="threshold", keys=200, runs=40))
    assert bad.rollback_rate >= 0.85, bad


def test_flagger_rolls_back_healthy_canaries_at_a_one_percent_error_rate() -> None:
    # The figure: with 1 % champion errors Flagger's 99 % success-rate check fails
    # about half its checks, so many healthy canaries reach 5 failed checks.
    summary, _ = simulate(SimConfig(scenario="aa", judge="flagger", runs=40))
    assert 0.15 <= summary.rollback_rate <= 0.75, summary
    bad, _ = simulate(SimConfig(scenario="errors", judge="flagger", runs=5))
    assert bad.rollback_rate == 1.0
    assert bad.seconds_to_decision["p50"] == 300.0, "5 failed checks x 60 s"


def test_excess_errors_count_only_failures_the_champion_would_not_have_had() -> None:
    _, runs = simulate(SimConfig(scenario="errors", runs=10, **FAST))
    for r in runs:
        expected = 0.04 * r.canary_requests  # 5 % against 1 % on the same requests
        assert 0 <= r.excess_errors <= r.canary_requests
        assert abs(r.excess_errors - expected) <= 4 * np.sqrt(expected) + 2, r


@pytest.mark.parametrize(
    ("judge", "extra"),
    [
        ("threshold", {"steps": (5, 100)}),  # its look at 120 s was after the 90 s limit
        ("flagger", {"peer_interval": 100.0, "max_seconds": 150.0}),  # its look at 200 s
    ],
    ids=["threshold", "flagger"],
)
def test_a_canary_undecided_at_max_seconds_is_inconclusive_then_not_decided_after_it(
    judge: str, extra: dict[str, Any]
) -> None:
    # Given a max_seconds that falls between two of the judge's looks
    cfg = SimConfig(
        scenario="aa", judge=judge, **{"step_seconds": 60.0, "max_seconds": 90.0} | extra
    )
    # When no look up to max_seconds decides
    result = simulate_run(cfg, np.random.default_rng([0, 0]))
    # Then the run is inconclusive at max_seconds, not decided at the next look after it
    assert (result.decision, result.seconds) == ("inconclusive", cfg.max_seconds), result
    assert result.reason == "out of time"


@pytest.mark.parametrize("judge", ["sequential", "threshold", "flagger", "kayenta"])
def test_no_run_reports_a_time_past_max_seconds(judge: str) -> None:
    cfg = SimConfig(
        scenario="errors",
        judge=judge,
        runs=4,
        step_seconds=60.0,
        max_seconds=130.0,
        peer_interval=45.0,
        look_seconds=7.0,
    )
    _, runs = simulate(cfg)
    assert all(r.seconds <= cfg.max_seconds for r in runs), [r.seconds for r in runs]


@pytest.mark.parametrize(
    "args",
    [
        ["--scenario", "nope"],
        ["--judge", "nope"],
        ["--steps", "50,25,100"],
        ["--runs", "0"],
        ["--champion-error-rate", "2"],
        ["--keys", "-1"],
        ["--keys", "10", "--key-spread", "-1"],
    ],
    ids=["scenario", "judge", "steps", "runs", "rate", "keys", "key-spread"],
)
def test_bad_arguments_exit_with_code_2_and_a_message(
    args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        code = main(args)
    except SystemExit as exc:  # argparse's own refusal
        code = int(exc.code or 0)
    assert code == 2
    assert capsys.readouterr().err.strip(), "the refusal says why"


@pytest.mark.parametrize("rate", [0.0, -1.0, float("inf"), float("nan"), 1e12])
def test_rates_the_simulation_cannot_draw_are_refused(rate: float) -> None:
    # Before: 1e12 ran out of memory (3.6 TiB), inf raised numpy's "lam value too large".
    with pytest.raises(ValueError, match="rate in"):
        SimConfig(rate=rate)
