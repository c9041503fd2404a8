"""The champion watchdog's decision: pure functions over the gateway's statistics, no I/O.

``flows/watchdog.py`` runs every few minutes. Each run reads the gateway's ``/admin/stats``
(cumulative counters per loaded version, and the latency percentiles of its recent requests),
turns the difference from the last run's counters into one :class:`Observation` (a *window*),
and asks :func:`decide` what it means, given the detector state persisted since the last run
(:mod:`ballast.anomaly`). :func:`plan_response` then says what to do about it.

Metrics per window: the champion's error rate (5xx / requests in the window), its p99 latency
(the gateway's percentile over its last ``window`` requests: not exactly this window's, see
:func:`observe`), and the share of each predicted class (each version's ``classes`` in the same
``/admin/stats`` answer, so from the same replica and load as the request counts; a gateway
that does not report them gets no class window, and drift is not watched here).

Statuses: ``healthy``; ``breach`` (a metric's detector breached: evidence names it);
``insufficient_data`` (too few requests, the first look, or a baseline still warming up: nothing
can be judged, nothing is wrong); ``unavailable`` (no live statistics for the champion: the
gateway is down or does not serve the registry's champion). Unavailable is alert-worthy but
never a reason to roll back: with nothing measured there is nothing to say the previous
version would do better, and a rollback cannot bring a dead gateway back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from ballast.anomaly import (
    DetectorPolicy,
    DetectorState,
    MetricSpec,
    MetricState,
    MetricVerdict,
    update_metric,
)

__all__ = [
    "ERROR_RATE",
    "LATENCY_P99",
    "SHARE_PREFIX",
    "Observation",
    "Response",
    "WatchdogDecision",
    "WatchdogPolicy",
    "decide",
    "merge_pod_stats",
    "observe",
    "observe_replicas",
    "plan_response",
    "unavailable",
]

ERROR_RATE = "error_rate"
LATENCY_P99 = "latency_p99_ms"
SHARE_PREFIX = "class_share:"  # + the class label

WatchdogStatus = Literal["healthy", "breach", "insufficient_data", "unavailable"]
Action = Literal["none", "rollback", "alert"]

# The key under which a replica-less answer's counters are kept.
_ANY_REPLICA = "_"


@dataclass(frozen=True, slots=True)
class WatchdogPolicy:
    """What the watchdog watches and when it acts (knobs with defaults; flow parameters override).

    ``error_rate_ceiling``: an error rate above it in ``detector.hard_consecutive`` windows in a
    row breaches whatever the baseline (a new champion has none for its first hour).
    ``rollback``: False makes breaches alert only (a dry run of a new policy).
    """

    detector: DetectorPolicy = field(default_factory=DetectorPolicy)
    error_rate_ceiling: float | None = 0.05
    latency_p99_ceiling_ms: float | None = None
    error_abs_floor: float = 0.002  # 0.2 points: below that an error-rate move is not news
    latency_rel_floor: float = 0.05  # 5 % of the level: p99 of a couple of thousand requests
    latency_abs_floor_ms: float = 0.5
    share_abs_floor: float = 0.01
    max_classes: int = 20
    rollback: bool = True

    def __post_init__(self) -> None:
        # A ceiling of 5 (meant as 5 %) never trips; a negative one breaches every window and
        # rolls back a healthy champion.
        if self.error_rate_ceiling is not None and not 0 < self.error_rate_ceiling <= 1:
            raise ValueError(
                f"error_rate_ceiling is a fraction in (0, 1], got {self.error_rate_ceiling}"
            )
        if self.latency_p99_ceiling_ms is not None and not self.latency_p99_ceiling_ms > 0:
            raise ValueError(
                f"latency_p99_ceiling_ms must be > 0, got {self.latency_p99_ceiling_ms}"
            )

    def spec(self, metric: str) -> MetricSpec:
        if metric == ERROR_RATE:
            return MetricSpec(
                ERROR_RATE,
                "rate",
                "up",
                abs_floor=self.error_abs_floor,
                hard_ceiling=self.error_rate_ceiling,
            )
        if metric == LATENCY_P99:
            return MetricSpec(
                LATENCY_P99,
                "value",
                "up",
                abs_floor=self.latency_abs_floor_ms,
                rel_floor=self.latency_rel_floor,
                hard_ceiling=self.latency_p99_ceiling_ms,
            )
        if metric.startswith(SHARE_PREFIX):
            return MetricSpec(metric, "share", "both", abs_floor=self.share_abs_floor)
        raise ValueError(f"unknown metric {metric!r}")


@dataclass(frozen=True, slots=True)
class Observation:
    """One window of the champion's live traffic, or why there is none.

    ``snapshot``: the cumulative counters to difference the next window against (per replica).
    ``first``: no earlier counters to compare with, so this run only records them.
    """

    model: str
    version: str | None
    available: bool = True
    reason: str = ""
    requests: int = 0
    errors: int = 0
    latency_p99_ms: float | None = None
    latency_count: int = 0
    latency_window: int = 0  # requests the gateway's percentile covers
    class_counts: Mapping[str, int] | None = None
    replica: str | None = None
    canary_active: bool = False  # a trial is in force: a canary at any weight, or a shadow
    first: bool = False
    snapshot: dict[str, Any] | None = None

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.requests if self.requests > 0 else None


def unavailable(model: str, version: str | None, reason: str) -> Observation:
    return Observation(model=model, version=version, available=False, reason=reason)


def _int(d: Mapping[str, Any], key: str) -> int:
    v = d.get(key)
    return int(v) if isinstance(v, int | float) else 0


# Replicas whose counters the watchdog's state keeps (see observe).
SNAPSHOT_REPLICAS = 64


def observe(
    stats: Mapping[str, Any],
    *,
    model: str,
    version: str,
    last_snapshot: Mapping[str, Any] | None,
    replica: str | None = None,
    keep: int = SNAPSHOT_REPLICAS,
) -> Observation:
    """The window since ``last_snapshot`` for the champion ``version`` from ``/admin/stats``.

    Counters are per replica (each gateway worker process counts its own), so the snapshot keeps
    one entry per replica, and a window is only taken against the same replica's earlier
    counters. A version reloaded since (``loaded_at`` moved) or counters that went backwards
    without a load time to tell (a restart of a gateway that reports none) start over from zero;
    counters behind the last ones of the same load are an older look at the replica (a peer's
    board entry) and count nothing. The p99 is the gateway's over its last ``window`` requests: at
    low traffic it spans more than this window, so ``latency_count`` is the number of this
    window's requests in it (what the detector's minimum-count rule looks at).

    Class counts (the version's ``classes``: rows answered per predicted class) are kept with
    the request counts of the same replica and differenced under the same rules; a gateway that
    does not report them (an older one) gives no class window, so drift is not watched.
    """
    if stats.get("model") != model:
        return unavailable(
            model, version, f"the gateway serves {stats.get('model')!r}, not {model!r}"
        )
    versions = stats.get("versions")
    v = versions.get(version) if isinstance(versions, Mapping) else None
    if not isinstance(v, Mapping):
        return unavailable(model, version, f"the gateway does not serve the champion {version}")
    key = replica or _ANY_REPLICA
    old_all = dict(last_snapshot.get("replicas", {})) if last_snapshot else {}
    now_requests, now_errors = _int(v, "requests"), _int(v, "errors")
    current: dict[str, Any] = {
        "version": version,
        "loaded_at": v.get("loaded_at"),
        "requests": now_requests,
        "errors": now_errors,
    }
    now_classes = _counts(v.get("classes"))
    if now_classes is not None:
        current["classes"] = now_classes
    # Only the champion's counters, the most recently seen replicas last and at most
    # SNAPSHOT_REPLICAS of them: replica ids are host-pid, and every restart added an entry
    # that was read and rewritten every run for ever.
    old = old_all.get(key)
    same_load = (
        isinstance(old, Mapping)
        and old.get("version") == version  # another version's counters are no older look
        and old.get("loaded_at") == current["loaded_at"]
    )
    # Counters behind those last read for the same load of the same replica: not a restart (a
    # restart loads again, with a new load time) but an older look at it, a peer's entry on the
    # board (up to a heartbeat old) after that replica itself answered the last run. Two runs
    # within a heartbeat did that; it counted the replica's whole history as one window.
    stale = (
        same_load
        and current["loaded_at"] is not None
        and isinstance(old, Mapping)
        and now_requests < _int(old, "requests")
    )
    kept = {
        k: e
        for k, e in old_all.items()
        if k != key and isinstance(e, Mapping) and e.get("version") == version
    }
    kept[key] = old if stale and isinstance(old, Mapping) else current
    snapshot: dict[str, Any] = {"replicas": dict(list(kept.items())[-keep:])}
    canary_active = _trial_in_force(stats)
    if not isinstance(old, Mapping) or old.get("version") != version:
        return Observation(
            model=model,
            version=version,
            replica=replica,
            canary_active=canary_active,
            first=True,
            reason="first look at this version on this replica: counters recorded",
            snapshot=snapshot,
        )
    classes: dict[str, int] | None
    if stale:  # nothing new from this replica in this window
        requests, errors = 0, 0
        classes = None if now_classes is None else {}
    elif same_load and now_requests >= _int(old, "requests"):
        requests = now_requests - _int(old, "requests")
        errors = max(0, now_errors - _int(old, "errors"))
        classes = _diff(now_classes, _counts(old.get("classes")))
    else:  # reloaded or restarted since: everything counted so far is from this window
        requests, errors = now_requests, now_errors
        classes = now_classes
    lat = v.get("latency_ms")
    p99 = lat.get("p99") if isinstance(lat, Mapping) else None
    return Observation(
        model=model,
        version=version,
        requests=requests,
        errors=errors,
        latency_p99_ms=float(p99) if isinstance(p99, int | float) else None,
        latency_count=min(requests, _int(v, "window")),
        latency_window=_int(v, "window"),
        class_counts=classes,
        replica=replica,
        canary_active=canary_active,
        snapshot=snapshot,
    )


def observe_replicas(
    stats: Mapping[str, Any],
    *,
    model: str,
    version: str,
    last_snapshot: Mapping[str, Any] | None,
    min_count: int = 1,
) -> Observation:
    """One window over every replica ``/admin/stats`` reports: the answering replica's counters
    and those its peers last put on the board (``replicas``), each differenced against its own
    earlier counters (:func:`observe`) and then added up.

    From one replica's answer alone, a replica failing every request was one window in K: the
    healthy replicas' windows reset the hard ceiling's run and wore its CUSUM down (with four
    replicas a quarter of all traffic failing went unhandled for over an hour). The p99 is the
    highest of the replicas' (percentiles do not add) among those with ``min_count`` requests in
    the window (the detector's minimum: a quiet replica's p99 would leave latency unjudged on
    every run), with that replica's counts; the busiest replica's when none has that many.
    """
    me = stats.get("replica")
    parts: list[tuple[str | None, Mapping[str, Any]]] = [(None if me is None else str(me), stats)]
    peers = stats.get("replicas")
    for peer in peers if isinstance(peers, list) else []:
        if (
            isinstance(peer, Mapping)
            and isinstance(peer.get("replica"), str)
            and peer["replica"] != me
        ):
            parts.append((peer["replica"], {**stats, "versions": peer.get("versions")}))
    snapshot: dict[str, Any] | None = None if last_snapshot is None else dict(last_snapshot)
    seen: list[Observation] = []
    # Room for every replica of this answer: trimmed to SNAPSHOT_REPLICAS while a run reads
    # more, each observe evicted a replica not yet read, which then read as new and evicted the
    # next: every run a first look, for ever.
    keep = max(SNAPSHOT_REPLICAS, len(parts))
    for i, (rid, part) in enumerate(parts):
        obs = observe(
            part, model=model, version=version, last_snapshot=snapshot, replica=rid, keep=keep
        )
        if not obs.available:
            if i == 0:
                return obs  # the answering replica does not serve the champion: as before
            continue  # a peer between deployments: its counters wait for the next run
        snapshot = obs.snapshot
        seen.append(obs)
    if len(seen) == 1:
        return seen[0]
    windows = [o for o in seen if not o.first]
    canary_active = any(o.canary_active for o in seen)
    if not windows:
        return replace(seen[0], snapshot=snapshot, canary_active=canary_active)
    classes: dict[str, int] | None = {}
    for o in windows:
        if o.class_counts is None or classes is None:
            classes = None
            continue
        for k, n in o.class_counts.items():
            classes[k] = classes.get(k, 0) + n
    timed = [o for o in windows if o.latency_p99_ms is not None and o.latency_count > 0]
    enough = [o for o in timed if o.latency_count >= min_count]
    if enough:
        tail: Observation | None = max(enough, key=lambda o: o.latency_p99_ms or 0.0)
    else:
        tail = max(timed, key=lambda o: o.latency_count) if timed else None
    return Observation(
        model=model,
        version=version,
        requests=sum(o.requests for o in windows),
        errors=sum(o.errors for o in windows),
        latency_p99_ms=None if tail is None else tail.latency_p99_ms,
        latency_count=0 if tail is None else tail.latency_count,
        latency_window=0 if tail is None else tail.latency_window,
        class_counts=classes,
        replica=f"{len(windows)} replicas",
        canary_active=canary_active,
        snapshot=snapshot,
    )


def merge_pod_stats(
    answers: Sequence[Mapping[str, Any]], *, model: str, version: str | None = None
) -> dict[str, Any]:
    """One ``/admin/stats`` answer standing for several pods' (:func:`observe_replicas` reads it).

    Replicas share a board only within a pod (a folder of their own), so a Kubernetes gateway's
    answer covers one pod: each watchdog run saw whichever pod its connection reached, and a
    pod failing every request was judged in about one run in N. Here every pod's own counters
    and its board's entries go into one answer's ``replicas``, each replica once (its own
    answer before a peer's board entry of it: the board is up to a heartbeat old; two addresses
    reaching one pod give the same replicas). The base (whose model-level fields stand) is the
    first answer serving ``version`` of ``model``, else the first serving ``model``: a pod still
    on another version first in the list made the whole run "unavailable", and the pods that
    serve the champion went unjudged. An answer serving another model adds nothing. A trial in
    force on any pod counts as in force (a pod can be a poll behind).
    """
    serving = [a for a in answers if a.get("model") == model]
    if not serving:
        return dict(answers[0]) if answers else {}

    def serves(answer: Mapping[str, Any]) -> bool:
        versions = answer.get("versions")
        return isinstance(versions, Mapping) and version in versions

    serving.sort(key=lambda a: not serves(a))  # stable: the resolver's order otherwise
    merged = dict(serving[0])
    own: dict[str, Mapping[str, Any]] = {}
    for answer in serving:
        rid = answer.get("replica")
        if isinstance(rid, str) and rid not in own:
            own[rid] = {"replica": rid, "versions": answer.get("versions")}
    peers: dict[str, Mapping[str, Any]] = {}
    for answer in serving:
        board = answer.get("replicas")
        for entry in board if isinstance(board, list) else []:
            rid = entry.get("replica") if isinstance(entry, Mapping) else None
            if isinstance(rid, str) and rid not in own and rid not in peers:
                peers[rid] = entry
    me = merged.get("replica")
    merged["replicas"] = [e for rid, e in {**own, **peers}.items() if rid != me]
    for key in ("canary_weight", "shadow_fraction"):
        values = [a.get(key) for a in serving]
        numbers = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
        if numbers:
            merged[key] = max(numbers)
    return merged


def _trial_in_force(stats: Mapping[str, Any]) -> bool:
    """Whether ``/admin/stats`` shows a trial (``Deployment.has_trial``): a canary at any weight
    or a shadow. A canary's shadow phase runs at weight 0, so the weight alone misses it, and a
    rollback then would be undone by the canary's next step or lease renewal."""
    weight, fraction = stats.get("canary_weight"), stats.get("shadow_fraction")
    if isinstance(weight, int | float) and weight > 0:
        return True
    if isinstance(fraction, int | float) and fraction > 0:
        return True
    versions = stats.get("versions")
    return isinstance(versions, Mapping) and any(
        isinstance(v, Mapping) and v.get("role") in ("canary", "shadow") for v in versions.values()
    )


def _counts(raw: Any) -> dict[str, int] | None:
    """Per-class counts from ``/admin/stats`` or a snapshot; None when absent or malformed."""
    if not isinstance(raw, Mapping):
        return None
    if not all(isinstance(n, int | float) for n in raw.values()):
        return None
    return {str(k): int(n) for k, n in raw.items()}


def _diff(now: dict[str, int] | None, before: dict[str, int] | None) -> dict[str, int] | None:
    """This window's class counts against the same replica's and the same load's earlier ones:
    None when either is unknown (a gateway without them) or when they went backwards (they
    cannot, within one load: nothing is guessed from inconsistent counters)."""
    if now is None or before is None:
        return None
    if any(n < before.get(k, 0) for k, n in now.items()) or any(k not in now for k in before):
        return None
    return {k: n - before.get(k, 0) for k, n in now.items()}


@dataclass(frozen=True, slots=True)
class WatchdogDecision:
    """The verdict of one run, its evidence and the detector state to persist."""

    status: WatchdogStatus
    model: str
    version: str | None
    verdicts: tuple[MetricVerdict, ...]
    reasons: tuple[str, ...]
    state: DetectorState
    observation: Observation

    @property
    def healthy(self) -> bool:
        """What the heartbeat reports: nothing found wrong (too little data is not wrong)."""
        return self.status in ("healthy", "insufficient_data")

    @property
    def culprit(self) -> MetricVerdict | None:
        """The breached metric furthest past its threshold, if any."""
        breached = [v for v in self.verdicts if v.breached]
        if not breached:
            return None
        return max(breached, key=lambda v: v.severity)

    def summary(self) -> str:
        """One line for logs and the heartbeat's detail (at most 1000 characters)."""
        head = f"{self.status} model={self.model} version={self.version}"
        if self.observation.replica:
            head += f" replica={self.observation.replica}"
        text = head + (": " + "; ".join(self.reasons) if self.reasons else "")
        return text[:1000]

    def evidence(self) -> dict[str, Any]:
        """Plain data for the audit log and events."""
        obs = self.observation
        culprit = self.culprit
        return {
            "status": self.status,
            "model": self.model,
            "version": self.version,
            "replica": obs.replica,
            "metric": culprit.metric if culprit else None,
            "reasons": list(self.reasons),
            "window": {
                "requests": obs.requests,
                "errors": obs.errors,
                "error_rate": obs.error_rate,
                "latency_p99_ms": obs.latency_p99_ms,
                "class_counts": dict(obs.class_counts) if obs.class_counts is not None else None,
            },
            "metrics": [v.to_dict() for v in self.verdicts],
            "checks": self.state.checks,
        }

    def to_markdown(self) -> str:
        obs = self.observation
        culprit = self.culprit
        lines = [
            f"# Champion watchdog: {self.status}",
            "",
            f"- model: `{self.model}`, version: `{self.version}`, replica: `{obs.replica or '-'}`",
        ]
        if culprit is not None:
            lines.append(f"- metric that broke: **{culprit.metric}** ({culprit.reason})")
        if obs.available and not obs.first:
            rate = "-" if obs.error_rate is None else f"{obs.error_rate:.4f}"
            p99 = "-" if obs.latency_p99_ms is None else f"{obs.latency_p99_ms:.2f} ms"
            lines.append(
                f"- window: {obs.requests} requests, {obs.errors} errors (rate {rate}), p99 {p99}"
            )
        if obs.canary_active:
            lines.append("- a canary (or its shadow phase) is in progress")
        lines += ["", *(f"- {r}" for r in self.reasons)]
        if self.verdicts:
            lines += [
                "",
                "| metric | status | value | baseline | scale | z | CUSUM | threshold | requests |",
                "|---|---|---|---|---|---|---|---|---|",
            ]
            for v in self.verdicts:
                lines.append(
                    f"| {v.metric} | {v.status} | {_num(v.value)} | {_num(v.baseline)} "
                    f"| {_num(v.scale)} | {_num(v.z)} | {v.cusum:.2f} | {_num(v.threshold)} "
                    f"| {v.count} |"
                )
        return "\n".join(lines) + "\n"


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


def _windows(
    obs: Observation, policy: WatchdogPolicy
) -> list[tuple[str, float | None, int, float]]:
    """(metric, value, count, overlap with the previous window) for this window."""
    overlap = 1.0 - obs.latency_count / obs.latency_window if obs.latency_window > 0 else 0.0
    out: list[tuple[str, float | None, int, float]] = [
        (ERROR_RATE, obs.error_rate, obs.requests, 0.0),
        (LATENCY_P99, obs.latency_p99_ms, obs.latency_count, overlap),
    ]
    if obs.class_counts is not None:
        total = sum(obs.class_counts.values())
        for label in sorted(obs.class_counts)[: policy.max_classes]:
            share = obs.class_counts[label] / total if total else None
            out.append((SHARE_PREFIX + label, share, total, 0.0))
    return out


def decide(obs: Observation, state: DetectorState, policy: WatchdogPolicy) -> WatchdogDecision:
    """Update the detectors with ``obs`` and judge the champion. Pure: returns the new state."""
    if not obs.available:
        return WatchdogDecision(
            "unavailable", obs.model, obs.version, (), (obs.reason,), state, obs
        )
    reasons: list[str] = []
    if state.version != obs.version:
        if state.version is not None:
            reasons.append(f"baseline reset: the champion changed from {state.version}")
        state = DetectorState(model=obs.model, version=obs.version, snapshot=state.snapshot)
    checks = state.checks + 1
    if obs.first:
        new = replace(state, snapshot=obs.snapshot, checks=checks)
        return WatchdogDecision(
            "insufficient_data", obs.model, obs.version, (), (*reasons, obs.reason), new, obs
        )
    metrics = dict(state.metrics)
    verdicts: list[MetricVerdict] = []
    for name, value, count, overlap in _windows(obs, policy):
        new_metric, verdict = update_metric(
            metrics.get(name, MetricState()),
            policy.spec(name),
            value,
            count,
            policy.detector,
            overlap,
        )
        metrics[name] = new_metric
        verdicts.append(verdict)
    new = replace(state, snapshot=obs.snapshot, metrics=metrics, checks=checks)
    breached = [v for v in verdicts if v.breached]
    status: WatchdogStatus
    if breached:
        status = "breach"
        reasons += [v.reason for v in breached]
    elif any(v.status == "ok" for v in verdicts):
        status = "healthy"
    else:
        status = "insufficient_data"
        reasons += [f"{v.metric}: {v.reason}" for v in verdicts if v.reason]
    return WatchdogDecision(
        status, obs.model, obs.version, tuple(verdicts), tuple(reasons), new, obs
    )


@dataclass(frozen=True, slots=True)
class Response:
    action: Action
    reason: str


def plan_response(
    decision: WatchdogDecision, *, previous: str | None, policy: WatchdogPolicy
) -> Response:
    """What to do: roll back only on a breach of the version still serving as champion, outside a
    trial (a canary at any weight or its shadow phase: the release flow owns the deployment
    then), when there is a ``previous`` version."""
    if decision.status in ("healthy", "insufficient_data"):
        return Response("none", decision.status)
    if decision.status == "unavailable":
        return Response(
            "alert", f"no live statistics ({decision.reasons[0]}): nothing to compare, no rollback"
        )
    if not policy.rollback:
        return Response("alert", "breach; rollback disabled by policy")
    if decision.observation.canary_active:
        return Response(
            "alert", "breach during a canary or shadow trial: the release flow owns the deployment"
        )
    if previous is None:
        return Response("alert", f"breach, but {decision.model} has no previous version")
    if previous == decision.version:
        return Response("alert", f"breach, but previous is the breaching version {previous}")
    return Response("rollback", f"breach of version {decision.version}: back to {previous}")


@dataclass(frozen=True, slots=True)
class AlertRecord:
    """The last alert reported without a rollback: which version, in which state, why, when."""

    version: str | None
    status: str
    reason: str
    at: float  # seconds since the epoch

    def to_dict(self) -> dict[str, object]:
        return {
            "version": self.version,
            "status": self.status,
            "reason": self.reason,
            "at": self.at,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> AlertRecord:
        version, status, reason, at = (data.get(k) for k in ("version", "status", "reason", "at"))
        if not (
            (version is None or isinstance(version, str))
            and isinstance(status, str)
            and isinstance(reason, str)
            and isinstance(at, int | float)
        ):
            raise ValueError(f"not an alert record: {dict(data)!r}")
        return cls(version, status, reason, float(at))


def repeats_alert(
    last: AlertRecord | None,
    decision: WatchdogDecision,
    response: Response,
    *,
    now: float,
    every_s: float,
) -> bool:
    """Whether this alert is the one already reported less than ``every_s`` ago: the same
    version, in the same state, for the same reason (a breach that cannot be rolled back, an
    unavailable champion). Such a run reports nothing new: its heartbeat keeps the alert
    firing in Prometheus, whose Alertmanager decides when to remind; before, every run (every
    5 min) wrote another audit entry, artifact and event. A rollback always reports."""
    return (
        response.action == "alert"
        and last is not None
        and last.version == decision.version
        and last.status == decision.status
        and last.reason == response.reason
        and 0 <= now - last.at < every_s
    )
