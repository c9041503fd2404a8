"""``ballast canary simulate``: canary scenarios through the real judges, on simulated time.

Each run is one canary: requests arrive (Poisson, ``--rate`` per second in total), the gateway's
weighted routing sends each to the canary with probability weight/100 (the unkeyed branch of
``infra.gateway.versions.Live.route``, ``rng.random() * 100 < weight``, vectorised; a unit test
checks the two agree), every request gets an outcome from the scenario, and the judge sees the
traffic batch by batch, as :func:`ballast.canary.run_canary` feeds it, one batch per look: every
``--look-seconds`` for the sequential judge, at each step's end for the threshold judge (as the
controller asks it), every ``--peer-interval`` for Flagger and Kayenta. Steps follow
:func:`ballast.canary.step_action`, the controller's own rule: each step lasts
``--step-seconds``, the step into 100 % waits for the judge's "good enough", and a canary still
undecided after ``--max-seconds`` is inconclusive (the controller rolls it back). No sleeping:
200 canaries of 10 simulated minutes take seconds.

Traffic model (the same per-request random numbers drive both arms, so an A/A canary answers
exactly as the champion would have, and "excess errors" are the canary's failures on requests
the champion would have served):

* errors: the champion fails ``--champion-error-rate`` of requests; the canary its own rate;
* latency: log-normal, median 20 ms, champion p99 60 ms; a slower canary keeps the median and
  stretches the tail (``--effect 0.5``: p99 + 50 %);
* answers: binary classes (37 % positive, as the bundled breast-cancer data); the champion is
  right with probability ``--champion-accuracy``; a drifting canary flips a share of the
  champion's answers; ``--label-share`` of answers come back labelled (the replay generator
  sends held-out rows with their labels).

Sticky traffic (``--keys N``): requests carry one of ``N`` routing keys, drawn with Zipf
popularity (``--key-skew``), and the gateway's keyed routing sends a key to the canary iff its
bucket (uniform per canary: the hash is salted with the canary's version) is below the weight.
Keys differ (``--key-spread S``, 0: alike): each key's error rate is its arm's times a
log-normal factor of mean 1 and log-sd ``S``, its latencies are multiplied by a log-normal
factor of log-sd ``S/4``, and its share of positive answers has logit-sd ``S`` around
``positive_share``. ``--hide-keys`` hands the judge the batches without their keys (how the
judges read sticky traffic before they knew of keys).

Scenarios and what ``--effect`` means in each (default in brackets): ``aa`` (the canary is the
champion), ``errors`` (canary error rate [0.05]), ``latency`` (relative p99 increase [0.5]),
``drift`` (share of flipped answers [0.05]), ``slow-drift`` (flip share growing per minute
[0.01]).

Judges: ``sequential`` (:class:`~ballast.judge.SequentialJudge`, asked every
``--look-seconds``), ``threshold`` (:class:`~ballast.judge.ThresholdJudge`, asked at the end of
each step, as the controller does), ``flagger`` and ``kayenta``
(:mod:`ballast.peer_judges`, asked every ``--peer-interval`` seconds: their check interval).

``--json`` prints one JSON object on the last line (one result, or ``{"results": [...]}`` for
several scenario/judge pairs).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np

from ballast.canary import step_action
from ballast.decisions import validate_steps
from ballast.judge import (
    Judge,
    ObservationBatch,
    SequentialJudge,
    StreamJudge,
    ThresholdJudge,
    VersionStats,
    clustered_effective_n,
)
from ballast.peer_judges import FlaggerJudge, KayentaJudge
from ballast.sequential import LogHistogram

__all__ = [
    "DEFAULT_EFFECTS",
    "JUDGES",
    "SCENARIOS",
    "RunResult",
    "SimConfig",
    "Summary",
    "main",
    "route_to_canary",
    "simulate",
    "simulate_run",
    "summarize",
]

SCENARIOS = ("aa", "errors", "latency", "drift", "slow-drift")
JUDGES = ("sequential", "threshold", "flagger", "kayenta")
MAX_RATE = 1e5  # requests per second
MAX_KEYS = 1_000_000
DEFAULT_EFFECTS = {"aa": 0.0, "errors": 0.05, "latency": 0.5, "drift": 0.05, "slow-drift": 0.01}

_Z99 = 2.3263478740408408  # standard normal 99th percentile
_EPS = 1e-9

Outcome = Literal["promote", "rollback", "inconclusive"]


@dataclass(frozen=True, slots=True)
class SimConfig:
    """One scenario/judge pair; defaults are the issue's measurement setting."""

    scenario: str = "aa"
    judge: str = "sequential"
    runs: int = 200
    seed: int = 0
    rate: float = 200.0
    steps: tuple[int, ...] = (5, 25, 50, 100)
    step_seconds: float = 60.0
    max_seconds: float = 600.0
    look_seconds: float = 0.5
    peer_interval: float = 60.0
    champion_error_rate: float = 0.01
    effect: float | None = None
    champion_accuracy: float = 0.98
    label_share: float = 1.0
    latency_median_ms: float = 20.0
    latency_p99_ms: float = 60.0
    positive_share: float = 0.37
    keys: int = 0  # 0: requests carry no routing key (random routing)
    key_skew: float = 1.1
    key_spread: float = 1.0
    hide_keys: bool = False

    def __post_init__(self) -> None:
        if self.scenario not in SCENARIOS:
            raise ValueError(f"unknown scenario {self.scenario!r}; choose from {SCENARIOS}")
        if self.judge not in JUDGES:
            raise ValueError(f"unknown judge {self.judge!r}; choose from {JUDGES}")
        validate_steps(self.steps)
        # Simulated traffic is drawn in memory per tick: 10^5 req/s is beyond any canary here,
        # and a larger (or infinite) rate ran out of memory instead of answering.
        if self.runs < 1 or not 0 < self.rate <= MAX_RATE:
            raise ValueError(f"runs must be >= 1 and rate in (0, {MAX_RATE:g}]")
        if not (self.step_seconds >= 1 and self.max_seconds >= self.step_seconds):
            raise ValueError("need step_seconds >= 1 and max_seconds >= step_seconds")
        if not (self.look_seconds >= 0.1 and self.peer_interval >= 1):
            raise ValueError("need look_seconds >= 0.1 and peer_interval >= 1")
        for name in ("champion_error_rate", "champion_accuracy", "label_share", "positive_share"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must lie in [0, 1]")
        if not 0 < self.latency_median_ms < self.latency_p99_ms:
            raise ValueError("need 0 < latency_median_ms < latency_p99_ms")
        if self.effect is not None and self.effect < 0:
            raise ValueError("effect must be >= 0")
        if not (0 <= self.keys <= MAX_KEYS and self.key_skew >= 0 and self.key_spread >= 0):
            raise ValueError(f"need keys in [0, {MAX_KEYS}], key_skew >= 0 and key_spread >= 0")

    @property
    def effect_size(self) -> float:
        return DEFAULT_EFFECTS[self.scenario] if self.effect is None else self.effect


@dataclass(frozen=True, slots=True)
class RunResult:
    """How one simulated canary ended."""

    decision: Outcome
    seconds: float
    canary_requests: int
    excess_errors: int
    final_weight: int
    reason: str


@dataclass(frozen=True, slots=True)
class Summary:
    """Rates and percentiles over the runs of one scenario/judge pair."""

    scenario: str
    judge: str
    runs: int
    rollback_rate: float
    promote_rate: float
    inconclusive_rate: float
    seconds_to_decision: dict[str, float]
    canary_requests: dict[str, float]
    excess_errors: dict[str, float]
    rollback_reasons: dict[str, int]
    wall_seconds: float
    config: dict[str, object] = field(default_factory=dict)


def route_to_canary(u: np.ndarray, weight: int) -> np.ndarray:
    """The gateway's unkeyed weighted routing on uniform draws ``u``: canary iff u*100 < weight."""
    if weight <= 0:
        return np.zeros(u.shape, dtype=bool)
    if weight >= 100:
        return np.ones(u.shape, dtype=bool)
    return np.asarray(u * 100.0 < weight)


class _Scenario:
    """The canary's behaviour at time t (seconds since the canary began)."""

    def __init__(self, cfg: SimConfig) -> None:
        self.cfg = cfg
        self.sigma_b = math.log(cfg.latency_p99_ms / cfg.latency_median_ms) / _Z99
        effect = cfg.effect_size
        self.sigma_c = self.sigma_b
        if cfg.scenario == "latency":
            self.sigma_c = (
                math.log(cfg.latency_p99_ms * (1 + effect) / cfg.latency_median_ms) / _Z99
            )
        self.error_c = min(effect, 1.0) if cfg.scenario == "errors" else cfg.champion_error_rate

    def flip_rate(self, t: float) -> float:
        if self.cfg.scenario == "drift":
            return min(self.cfg.effect_size, 1.0)
        if self.cfg.scenario == "slow-drift":
            return min(self.cfg.effect_size * t / 60.0, 1.0)
        return 0.0


class _Counters:
    """Running per-arm totals, to hand judges cumulative :class:`VersionStats` cheaply."""

    def __init__(self, version: str, keys: int = 0) -> None:
        self.version = version
        self.n = self.errors = self.labelled = self.correct = 0
        self.hist = LogHistogram()
        # Requests and errors per routing key (sticky traffic), for VersionStats.n_effective.
        self.key_n = np.zeros(keys)
        self.key_e = np.zeros(keys)

    def add(
        self,
        ok: np.ndarray,
        latency_s: np.ndarray,
        correct: np.ndarray,
        ids: np.ndarray | None = None,
    ) -> None:
        self.n += int(ok.size)
        self.errors += int(ok.size - np.count_nonzero(ok))
        self.hist.add(latency_s[ok])
        lab = correct[correct >= 0]
        self.labelled += int(lab.size)
        self.correct += int(np.count_nonzero(lab == 1))
        if ids is not None:
            size = len(self.key_n)
            self.key_n += np.bincount(ids, minlength=size)
            self.key_e += np.bincount(ids, weights=(~ok).astype(np.float64), minlength=size)

    def n_effective(self) -> float | None:
        if not len(self.key_n):
            return None
        return clustered_effective_n(self.key_n, self.key_e)

    def stats(self) -> VersionStats:
        def pct(q: float) -> float | None:
            v = self.hist.quantile(q)
            return None if v is None else v * 1000.0

        n_ok = self.n - self.errors
        return VersionStats(
            version=self.version,
            n=self.n,
            errors=self.errors,
            error_rate=self.errors / self.n if self.n else 0.0,
            n_ok=n_ok,
            latency_p50_ms=pct(0.5),
            latency_p95_ms=pct(0.95),
            latency_p99_ms=pct(0.99),
            n_labelled=self.labelled,
            n_correct=self.correct,
            accuracy=self.correct / self.labelled if self.labelled else None,
            n_effective=self.n_effective(),
        )


def make_judge(cfg: SimConfig) -> tuple[Judge, float | None]:
    """A fresh judge and its cadence in seconds (None: at the end of each step)."""
    if cfg.judge == "sequential":
        return SequentialJudge(), cfg.look_seconds
    if cfg.judge == "threshold":
        return ThresholdJudge(), None
    if cfg.judge == "flagger":
        return FlaggerJudge(), cfg.peer_interval
    return KayentaJudge(), cfg.peer_interval


class _Keys:
    """One canary's routing keys: popularity, buckets (salted per canary) and how each differs."""

    def __init__(self, cfg: SimConfig, rng: np.random.Generator) -> None:
        n, spread = cfg.keys, cfg.key_spread
        popularity = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** cfg.key_skew
        self.cum = np.cumsum(popularity / popularity.sum())
        self.names = np.array([f"k{i}" for i in range(n)], dtype=object)
        self.bucket = rng.random(n)
        self.error_factor = np.exp(spread * rng.standard_normal(n) - spread**2 / 2)
        self.log_latency = spread / 4 * rng.standard_normal(n)
        p = cfg.positive_share
        if 0 < p < 1:
            logit = math.log(p / (1 - p)) + spread * rng.standard_normal(n)
            self.positive = 1.0 / (1.0 + np.exp(-logit))
        else:
            self.positive = np.full(n, p)

    def draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return np.minimum(np.searchsorted(self.cum, rng.random(n)), len(self.cum) - 1)


def _tick(
    rng: np.random.Generator,
    cfg: SimConfig,
    scen: _Scenario,
    weight: int,
    t: float,
    dt: float,
    keys: _Keys | None = None,
) -> tuple[ObservationBatch, int, np.ndarray | None]:
    """``dt`` seconds of traffic at ``weight``: the batch the judge sees, the excess errors,
    and each request's key index (None: unkeyed traffic)."""
    n = int(rng.poisson(cfg.rate * dt))
    ids = None
    if keys is None:
        can = route_to_canary(rng.random(n), weight)
        error_factor: np.ndarray | float = 1.0
        log_latency: np.ndarray | float = 0.0
        positive: np.ndarray | float = cfg.positive_share
    else:
        ids = keys.draw(rng, n)
        can = route_to_canary(keys.bucket[ids], weight)
        error_factor, log_latency = keys.error_factor[ids], keys.log_latency[ids]
        positive = keys.positive[ids]
    e = rng.random(n)
    fail_b = e < cfg.champion_error_rate * error_factor
    fail_c = e < scen.error_c * error_factor
    ok = ~np.where(can, fail_c, fail_b)
    z = rng.standard_normal(n)
    sigma = np.where(can, scen.sigma_c, scen.sigma_b)
    latency = cfg.latency_median_ms / 1000.0 * np.exp(z * sigma + log_latency)
    y = rng.random(n) < positive
    champion_right = rng.random(n) < cfg.champion_accuracy
    answer = np.where(champion_right, y, ~y)
    flip = rng.random(n) < scen.flip_rate(t)
    answer = np.where(can, answer ^ flip, answer)
    labelled = ok & (rng.random(n) < cfg.label_share)
    correct = np.where(labelled, (answer == y).astype(np.int8), np.int8(-1)).astype(np.int8)
    prediction = np.where(ok, answer.astype(np.int64), -1)
    excess = int(np.count_nonzero(can & fail_c & ~fail_b))
    key = None if keys is None or cfg.hide_keys else keys.names[ids]
    return ObservationBatch(can, ok, latency, correct, prediction, key), excess, ids


def simulate_run(cfg: SimConfig, rng: np.random.Generator) -> RunResult:
    """One canary from start to decision (or to ``max_seconds``: inconclusive).

    Looks fall on their cadence only, up to and including ``max_seconds``: when ``max_seconds``
    is not a multiple of the cadence, the last tick is cut short at it and has no look, so the
    run ends inconclusive at ``max_seconds`` rather than deciding after it.
    """
    scen = _Scenario(cfg)
    keys = _Keys(cfg, rng) if cfg.keys else None
    judge, cadence = make_judge(cfg)
    stream = judge if isinstance(judge, StreamJudge) else None
    if stream is not None:
        stream.start("1", "2")
    # With --hide-keys the judges see no keys at all: no per-key counts either.
    clustered = cfg.keys if keys is not None and not cfg.hide_keys else 0
    champion, canary = _Counters("1", clustered), _Counters("2", clustered)
    weights = cfg.steps
    # One batch of traffic per look: the judge cannot tell finer ticks apart, since the weight
    # only changes at a look too.
    dt = cadence if cadence is not None else cfg.step_seconds
    step, step_started, t = 0, 0.0, 0.0
    next_look = cadence if cadence is not None else cfg.step_seconds
    canary_requests = excess = 0
    while t < cfg.max_seconds - _EPS:
        weight = weights[step]
        # The last tick stops at max_seconds: no traffic, and no look, after the canary's time.
        tick = min(dt, cfg.max_seconds - t)
        batch, extra, ids = _tick(rng, cfg, scen, weight, t, tick, keys)
        excess += extra
        canary_requests += int(np.count_nonzero(batch.canary))
        c, b = batch.canary, ~batch.canary
        c_ids = b_ids = None
        if clustered and ids is not None:
            c_ids, b_ids = ids[c], ids[b]
        canary.add(batch.ok[c], batch.latency_s[c], batch.correct[c], c_ids)
        champion.add(batch.ok[b], batch.latency_s[b], batch.correct[b], b_ids)
        if stream is not None:
            stream.observe_batch(batch, weight)
        t = min(t + tick, cfg.max_seconds)
        if t + _EPS < next_look:
            continue
        verdict = judge.judge(champion.stats() if champion.n else None, canary.stats(), weight)
        nxt = weights[step + 1] if step + 1 < len(weights) else None
        action = step_action(
            verdict, next_weight=nxt, step_done=t - step_started + _EPS >= cfg.step_seconds
        )
        if action == "end":
            decision: Outcome = "promote" if verdict.decision == "promote" else "rollback"
            return RunResult(decision, t, canary_requests, excess, weight, verdict.reasons[0])
        if action == "advance":
            step, step_started = step + 1, t
        next_look = t + (cadence if cadence is not None else cfg.step_seconds)
    return RunResult("inconclusive", t, canary_requests, excess, weights[step], "out of time")


def _pcts(values: Sequence[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    return {"p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95))}


def _reason_key(reason: str) -> str:
    """The words of a reason before its first number: "errors: canary 12/240 ..." -> "errors",
    "error rate 0.034 (20/597) above ..." -> "error rate"."""
    head = reason.split(":", 1)[0]
    words = []
    for word in head.split():
        try:
            float(word.strip("%()"))
        except ValueError:
            words.append(word)
            continue
        break
    return " ".join(words) or re.sub(r"\d+", "N", head)[:30]


def summarize(cfg: SimConfig, results: Sequence[RunResult], wall_seconds: float) -> Summary:
    n = len(results)
    outcomes = Counter(r.decision for r in results)
    return Summary(
        scenario=cfg.scenario,
        judge=cfg.judge,
        runs=n,
        rollback_rate=outcomes["rollback"] / n,
        promote_rate=outcomes["promote"] / n,
        inconclusive_rate=outcomes["inconclusive"] / n,
        seconds_to_decision=_pcts([r.seconds for r in results]),
        canary_requests=_pcts([r.canary_requests for r in results]),
        excess_errors=_pcts([r.excess_errors for r in results]),
        rollback_reasons=dict(
            Counter(_reason_key(r.reason) for r in results if r.decision == "rollback")
        ),
        wall_seconds=wall_seconds,
        config={k: v for k, v in asdict(cfg).items() if k not in ("scenario", "judge")}
        | {"effect": cfg.effect_size},
    )


def simulate(
    cfg: SimConfig, progress: Callable[[int], None] | None = None
) -> tuple[Summary, list[RunResult]]:
    """Run ``cfg.runs`` canaries; run ``i`` uses its own seed derived from (``seed``, ``i``), so a
    run's outcome does not depend on how many runs come before it."""
    started = time.perf_counter()
    results = []
    for i in range(cfg.runs):
        rng = np.random.default_rng([cfg.seed, i])
        results.append(simulate_run(cfg, rng))
        if progress is not None:
            progress(i + 1)
    return summarize(cfg, results, time.perf_counter() - started), results


# ------------------------------------------------------------------------------ CLI


def _steps(text: str) -> tuple[int, ...]:
    try:
        return validate_steps(tuple(int(s) for s in text.split(",")))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _choices(allowed: tuple[str, ...]) -> Callable[[str], tuple[str, ...]]:
    def parse(text: str) -> tuple[str, ...]:
        names = allowed if text == "all" else tuple(s.strip() for s in text.split(","))
        bad = [s for s in names if s not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {allowed} or all")
        return names

    return parse


def _parser() -> argparse.ArgumentParser:
    d = SimConfig()  # one source of defaults for the flags and the library
    p = argparse.ArgumentParser(
        prog="ballast canary simulate",
        description="Canary scenarios through the real judges on simulated time.",
    )
    p.add_argument(
        "--scenario",
        type=_choices(SCENARIOS),
        default=(d.scenario,),
        help=f"comma-separated from {', '.join(SCENARIOS)}, or all (default {d.scenario})",
    )
    p.add_argument(
        "--judge",
        type=_choices(JUDGES),
        default=(d.judge,),
        help=f"comma-separated from {', '.join(JUDGES)}, or all (default {d.judge})",
    )
    p.add_argument("--runs", type=int, default=d.runs)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--rate", type=float, default=d.rate, help="requests per second, in total")
    p.add_argument("--steps", type=_steps, default=d.steps, help="e.g. 5,25,50,100")
    p.add_argument("--step-seconds", type=float, default=d.step_seconds)
    p.add_argument(
        "--max-seconds",
        type=float,
        default=d.max_seconds,
        help="maximum canary duration; undecided runs are inconclusive",
    )
    p.add_argument(
        "--look-seconds",
        type=float,
        default=d.look_seconds,
        help="how often the sequential judge is asked",
    )
    p.add_argument(
        "--peer-interval",
        type=float,
        default=d.peer_interval,
        help="Flagger's check interval and Kayenta's window",
    )
    p.add_argument("--champion-error-rate", type=float, default=d.champion_error_rate)
    p.add_argument(
        "--effect",
        type=float,
        default=None,
        help="scenario's effect size (defaults: "
        + ", ".join(f"{k} {v}" for k, v in DEFAULT_EFFECTS.items() if k != "aa")
        + ")",
    )
    p.add_argument(
        "--champion-accuracy",
        type=float,
        default=d.champion_accuracy,
        help="the champion's share of right answers (the bundled model scores about 0.97)",
    )
    p.add_argument("--label-share", type=float, default=d.label_share)
    p.add_argument(
        "--keys",
        type=int,
        default=d.keys,
        help="routing keys the requests carry (sticky routing; default 0: none)",
    )
    p.add_argument("--key-skew", type=float, default=d.key_skew, help="Zipf exponent of keys")
    p.add_argument(
        "--key-spread",
        type=float,
        default=d.key_spread,
        help="how much keys differ in errors, latency and classes (0: alike)",
    )
    p.add_argument("--hide-keys", action="store_true", help="judge the batches without their keys")
    p.add_argument("--json", action="store_true", help="one JSON object on the last line")
    return p


def _table(summaries: Sequence[Summary]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="canary simulation (simulated seconds)")
    for col in (
        "scenario",
        "judge",
        "runs",
        "rollback",
        "promote",
        "inconcl.",
        "t p50",
        "t p95",
        "canary req p50",
        "canary req p95",
        "excess err p50",
        "excess err p95",
    ):
        table.add_column(col, justify="left" if col in ("scenario", "judge") else "right")
    for s in summaries:
        table.add_row(
            s.scenario,
            s.judge,
            str(s.runs),
            f"{s.rollback_rate:.1%}",
            f"{s.promote_rate:.1%}",
            f"{s.inconclusive_rate:.1%}",
            f"{s.seconds_to_decision['p50']:.0f}",
            f"{s.seconds_to_decision['p95']:.0f}",
            f"{s.canary_requests['p50']:.0f}",
            f"{s.canary_requests['p95']:.0f}",
            f"{s.excess_errors['p50']:.0f}",
            f"{s.excess_errors['p95']:.0f}",
        )
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)  # piped: don't squeeze the table into 80 columns
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        configs = [
            SimConfig(
                scenario=scenario,
                judge=judge,
                runs=args.runs,
                seed=args.seed,
                rate=args.rate,
                steps=args.steps,
                step_seconds=args.step_seconds,
                max_seconds=args.max_seconds,
                look_seconds=args.look_seconds,
                peer_interval=args.peer_interval,
                champion_error_rate=args.champion_error_rate,
                effect=args.effect,
                champion_accuracy=args.champion_accuracy,
                label_share=args.label_share,
                keys=args.keys,
                key_skew=args.key_skew,
                key_spread=args.key_spread,
                hide_keys=args.hide_keys,
            )
            for scenario in args.scenario
            for judge in args.judge
        ]
    except ValueError as exc:
        print(f"ballast canary simulate: {exc}", file=sys.stderr)
        return 2

    from rich.console import Console
    from rich.progress import Progress, TaskID

    summaries: list[Summary] = []
    # Progress goes to stderr so stdout stays the table and the JSON line.
    with Progress(transient=True, console=Console(stderr=True)) as bar:
        for cfg in configs:
            task = bar.add_task(f"{cfg.scenario} / {cfg.judge}", total=cfg.runs)

            def advance(done: int, task: TaskID = task) -> None:
                bar.update(task, completed=done)

            summary, _ = simulate(cfg, progress=advance)
            summaries.append(summary)
    _table(summaries)
    if args.json:
        docs = [asdict(s) for s in summaries]
        print(json.dumps(docs[0] if len(docs) == 1 else {"results": docs}))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
