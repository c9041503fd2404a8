"""The canary controller: shift traffic step by step, judge each step, promote or roll back.

This is the one place that changes live traffic. Every exit path leaves the gateway in a known
state: a rollback verdict sets champion-only, a promotion sets candidate-only, and any exception
(``KeyboardInterrupt`` included) restores the deployment that was in force before the canary
began, then re-raises. The one exception: a deployment someone else set while the canary ran
(a forced rollback) stops the canary (:class:`CanaryPreempted`) and is left in force.
Registry alias moves are the caller's (see :mod:`ballast.decisions`).

With a :class:`~ballast.judge.StreamJudge` (the sequential judge) the controller also feeds the
judge every batch of traffic as it arrives and asks it after each batch, so a step ends as soon
as the judge decides; :func:`step_action` says what happens after each verdict (the canary
simulator in :mod:`ballast.simulate` follows the same rule on simulated time).
"""

from __future__ import annotations

import logging
import math
import secrets
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, suppress
from dataclasses import dataclass, field
from typing import Literal, NoReturn, Protocol

import numpy as np

from ballast.decisions import validate_steps
from ballast.errors import GatewayError
from ballast.gateway_client import GatewayHTTPError
from ballast.judge import (
    UNKNOWN_VERSION,
    Judge,
    Observation,
    StreamJudge,
    Verdict,
    VersionStats,
    is_ready,
)
from ballast.loadgen import VersionCounts, run_load
from ballast.serving import Deployment, VersionSpec

__all__ = [
    "CanaryLeaseLost",
    "CanaryPreempted",
    "CanaryResult",
    "DeploymentAdmin",
    "LoadFn",
    "ShadowPolicy",
    "ShadowStats",
    "StepAction",
    "StepRecord",
    "UnattributedPolicy",
    "http_load",
    "judge_shadow",
    "judge_unattributed",
    "live_traffic",
    "run_canary",
    "step_action",
]

logger = logging.getLogger(__name__)

# Drives traffic for one step at the given canary weight (percent); returns what it observed.
LoadFn = Callable[[int], list[Observation]]

StepAction = Literal["stay", "advance", "end"]


def step_action(verdict: Verdict, *, next_weight: int | None, step_done: bool) -> StepAction:
    """What a controller does after a verdict from a stream judge (pure).

    * "rollback" or "promote": end the canary.
    * "continue" at the last step: stay (keep watching until the judge decides or time is up).
    * "continue" before the step's minimum (samples or seconds) is done: stay.
    * "continue" with the minimum done: advance, except into 100 %, which waits until the judge
      says the canary is clearly good enough (:func:`~ballast.judge.is_ready`): at 100 % the
      champion serves nothing, so there is nothing left to compare against.
    """
    if verdict.decision != "continue":
        return "end"
    if next_weight is None or not step_done:
        return "stay"
    if next_weight >= 100 and not is_ready(verdict):
        return "stay"
    return "advance"


class DeploymentAdmin(Protocol):
    """The part of the gateway's admin API the controller needs (``GatewayClient`` has it)."""

    def get_deployment(self) -> Deployment | None: ...

    def set_deployment(
        self, dep: Deployment, *, expect: Sequence[Deployment | None] = ()
    ) -> Deployment:
        """Apply ``dep``; with ``expect``, only while one of those is in force (else a
        :class:`~ballast.gateway_client.GatewayHTTPError` with status 412)."""
        ...


@dataclass(frozen=True, slots=True)
class StepRecord:
    """One canary step: the weight, what the judge said, and how much traffic it saw.

    ``seconds`` is measured from the start of the canary to this step's verdict. ``counts`` are
    this step's observations per version; ``baseline_n`` and ``canary_n`` are cumulative, which is
    what the judge saw.
    """

    index: int
    weight: int
    verdict: Verdict
    seconds: float
    step_seconds: float
    counts: Mapping[str, int]
    baseline_n: int
    canary_n: int


@dataclass(frozen=True, slots=True)
class CanaryResult:
    """How a canary ended. ``final_deployment`` is what the gateway confirmed it now serves."""

    decision: Literal["promote", "rollback"]
    candidate: str
    champion: str | None
    reasons: tuple[str, ...]
    steps: tuple[StepRecord, ...]
    seconds_to_decision: float
    final_deployment: Deployment
    evidence: Mapping[str, float] = field(default_factory=dict)

    @property
    def promoted(self) -> bool:
        return self.decision == "promote"


class CanaryLeaseLost(RuntimeError):
    """The gateway could not be told the canary is still watched: the trial's lease may have run
    out and the gateway gone back to the champion alone, so this canary cannot go on."""


class CanaryPreempted(CanaryLeaseLost):
    """Someone else changed the gateway's deployment while the canary ran (a forced rollback, an
    operator, another release's canary): their change stands, and this canary stops without
    sending anything more. ``live`` is the deployment found (None: unknown or nothing).
    ``raced``: the canary's first change was refused (412) because another change landed
    after its look; nothing of it was applied, so it may begin again from a new look."""

    def __init__(
        self, message: str, *, live: Deployment | None = None, raced: bool = False
    ) -> None:
        super().__init__(message)
        self.live = live
        self.raced = raced


def another_trial_took_over(exc: CanaryPreempted, candidate: str, now: float) -> bool:
    """The canary of ``candidate`` was stopped by another trial now in force (a canary or shadow
    of another version, leased or not), not by a person settling the gateway: that release's
    turn, after which this one may try again. A rollback, a champion changed, or a trial of this
    very version (its own, left by a lease that ran out) is an answer, not a turn."""
    live = exc.live
    if not trial_in_force(live, now):
        return False
    assert live is not None
    return candidate not in {v.version for v in (live.canary, live.shadow) if v is not None}


def _plain(dep: Deployment) -> Deployment:
    """``dep`` without its lease stamp, paths as content addresses: what a comparison of the
    live deployment with one this canary sent must look at (a registry-backed gateway answers
    with its own copies' paths, not the ones the controller sent)."""
    if dep.lease_expires_at is not None:
        dep = dep.model_copy(update={"lease_expires_at": None})
    return dep.content()


def _describe(dep: Deployment | None) -> str:
    if dep is None:
        return "nothing deployed"
    parts = [f"champion {dep.champion.version if dep.champion else None}"]
    if dep.canary is not None:
        parts.append(f"canary {dep.canary.version} at {dep.canary_weight}%")
    if dep.shadow is not None:
        parts.append(f"shadow {dep.shadow.version}")
    return ", ".join(parts)


class _Lease:
    """The controller's hold on the gateway: sends its deployments, stamps and renews trial
    leases, and notices when the deployment in force is no longer one this canary sent.

    With ``seconds``, a deployment with a canary or shadow is sent with ``lease_expires_at = now
    + seconds`` and re-sent every ``seconds / 3`` while it is in force; anything else is sent as
    is and stops the renewals. Without ``seconds`` nothing is stamped or renewed.

    Every send after the first (a renewal or the controller's next step) reads the live
    deployment first. Anything but a deployment this canary sent means someone else changed it
    (:class:`CanaryPreempted`) or the gateway dropped the trial when its lease ran out
    (:class:`CanaryLeaseLost`); a renewal that failed until past the lease's validity is lost
    too. A lost lease stays lost: nothing more is sent (re-sending would revive a trial the
    gateway dropped, or undo the other party's change) and :meth:`check` raises.
    """

    def __init__(
        self,
        client: DeploymentAdmin,
        seconds: float | None,
        *,
        first_over: Deployment | None,
    ) -> None:
        self._client, self._seconds = client, seconds
        # The deployment the first change must replace (a compare-and-set: another run's change
        # since this canary looked fails it, 412; None: nothing deployed). Later
        # steps and renewals must replace one of this canary's own (``_stamped``), so a change
        # landing between their look (_verify_ours) and their PUT is not overwritten either.
        self._first_over = first_over
        self._lock = threading.Lock()
        self._current: Deployment | None = None  # the trial being renewed, unstamped
        self._sent: list[Deployment] = []  # every deployment this canary sent, unstamped
        # The latest deployments sent, as sent (lease stamps and all): what the gateway may hold
        # of ours (a PUT that timed out may have been applied, a replica may lag).
        self._stamped: deque[Deployment] = deque(maxlen=32)
        self._valid_until = math.inf
        self._error: BaseException | None = None  # the last failed renewal
        self._lost: CanaryLeaseLost | None = None  # sticky
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if seconds:
            self._thread = threading.Thread(
                target=self._renew_loop, name="canary-lease", daemon=True
            )
            self._thread.start()

    def get_deployment(self) -> Deployment | None:
        return self._client.get_deployment()

    def set_deployment(
        self, dep: Deployment, *, expect: Sequence[Deployment | None] = ()
    ) -> Deployment:
        if expect:
            raise ValueError("the lease sets the conditions of its changes itself")
        with self._lock:
            self._expire_if_due()
            if self._lost is not None:
                raise self._lost.with_traceback(None)
            if self._sent:
                self._verify_ours()
            self._current = dep if dep.has_trial() and self._seconds else None
            return self._send(dep)

    def promote(
        self, dep: Deployment, promotion: Callable[[], AbstractContextManager[object]]
    ) -> Deployment:
        """Send the promoted ``dep`` inside ``promotion`` (which moves the registry's aliases
        and undoes that if the block raises), with renewals held off throughout.

        A registry-backed gateway starts serving ``dep`` as soon as its replicas see the moved
        aliases, before this PUT: so ``dep`` counts as this canary's from the moment the
        aliases may move, and no renewal may send the trial back in between.
        """
        with self._lock:
            self._expire_if_due()
            if self._lost is not None:
                raise self._lost.with_traceback(None)
            if self._sent:
                self._verify_ours()  # before the aliases move: someone else's change stands
            self._current = None  # the trial ends here: nothing renews it any more
            plain = _plain(dep)
            if plain not in self._sent:  # replicas may serve it once any alias has moved
                self._sent.append(plain)
            with promotion():
                # Unconditional: a registry-backed gateway may serve ``dep`` already (the moved
                # aliases), and it was checked as ours just above.
                return self._send(dep, conditional=False)

    def _send(self, dep: Deployment, *, conditional: bool = True) -> Deployment:
        first = not self._sent
        plain = _plain(dep)
        if plain not in self._sent:
            # Recorded before the PUT: one that timed out may still have been applied.
            self._sent.append(plain)
        expect: tuple[Deployment | None, ...] = ()
        if conditional:
            expect = (self._first_over,) if first else tuple(self._stamped)
        stamped, expires = dep, math.inf
        if dep.has_trial() and self._seconds:
            expires = time.time() + self._seconds
            stamped = dep.model_copy(update={"lease_expires_at": expires})
        self._stamped.append(stamped)
        try:
            applied = self._client.set_deployment(stamped, expect=expect)
        except GatewayHTTPError as exc:
            if exc.status_code != 412 or not expect:
                raise
            self._lose_race(first)
        self._valid_until = expires
        if expires != math.inf:
            self._error = None
        return applied

    def _lose_race(self, first: bool) -> NoReturn:
        """A change refused by its If-Match (412): the deployment in force is no longer the one
        this canary looked at. Nothing of this change was applied."""
        if first:
            self._sent.clear()
            self._stamped.clear()
        try:
            live = self._client.get_deployment()
        except Exception:  # the 412 already says enough; whoever handles this reads again
            live = None
        if first:
            # Another change landed between this canary's look and its first change (another
            # release's canary that saw the same trial end): theirs stands.
            lost: CanaryLeaseLost = CanaryPreempted(
                f"the gateway's deployment changed after the canary looked ({_describe(live)});"
                " the canary did not start and sent nothing",
                live=live,
                raced=True,
            )
        elif live is not None and self._ours(live) and live.without_trial() == live:
            lost = CanaryLeaseLost(
                "the gateway dropped the canary's trial when its lease ran out "
                f"(it serves {_describe(live)})"
            )
        else:
            lost = CanaryPreempted(
                f"the gateway's deployment was changed by someone else ({_describe(live)}); "
                "the canary stops and leaves it in place",
                live=live,
            )
        self._lose(lost)
        assert self._lost is not None
        raise self._lost from None

    def _ours(self, live: Deployment | None) -> bool:
        """``live`` is a deployment this canary sent, or what the gateway left of one of its
        trials when the lease ran out."""
        if live is None:
            return False
        plain = _plain(live)
        return plain in self._sent or any(
            d.has_trial() and plain == d.without_trial() for d in self._sent
        )

    def _verify_ours(self) -> None:
        live = self._client.get_deployment()
        plain = None if live is None else _plain(live)
        if plain is not None and plain in self._sent:
            return  # what we sent (or, on a lagging replica, what we sent just before)
        if self._ours(live):
            if time.time() < self._valid_until:
                # The lease still holds, so the gateway has not dropped the trial: this is a
                # replica that has not caught up yet (each PUT waits only so long for all of
                # them). Going on re-sends the trial, as a renewal always did.
                return
            self._lose(
                CanaryLeaseLost(
                    "the canary's lease could not be renewed in time: the gateway dropped the "
                    f"trial and serves {_describe(live)}"
                )
            )
        else:
            self._lose(
                CanaryPreempted(
                    f"the gateway's deployment was changed by someone else ({_describe(live)}); "
                    "the canary stops and leaves it in place",
                    live=live,
                )
            )
        assert self._lost is not None
        raise self._lost

    def _lose(self, exc: CanaryLeaseLost) -> None:
        if self._lost is None:
            self._lost = exc
            self._current = None  # no renewal may revive the trial
            logger.warning("canary lease lost: %s", exc)

    def _expire_if_due(self) -> None:
        """A renewal failed and the lease has run out since: the gateway dropped the trial."""
        if self._error is not None and time.time() >= self._valid_until:
            lost = CanaryLeaseLost(
                f"the canary's lease could not be renewed ({self._error!r}) and has run out; "
                "the gateway dropped the trial"
            )
            lost.__cause__ = self._error
            self._lose(lost)

    def _renew_loop(self) -> None:
        assert self._seconds
        while not self._stop.wait(self._seconds / 3):
            with self._lock:
                self._expire_if_due()
                if self._current is None or self._lost is not None:
                    continue
                try:
                    self._verify_ours()
                    self._send(self._current)
                except CanaryLeaseLost:
                    pass  # recorded by _verify_ours; check() raises it
                except Exception as exc:  # the controller decides, via check()
                    self._error = exc
                    logger.warning("canary lease renewal failed: %r", exc)

    def check(self) -> None:
        """Raise :class:`CanaryLeaseLost` when the lease is lost or may run out unrenewed."""
        # Stop a renewal period before the lease runs out: the gateway may drop the trial then.
        due = self._seconds and time.time() >= self._valid_until - self._seconds / 3
        if self._lost is None and self._error is not None and due:
            lost = CanaryLeaseLost(
                f"the canary's lease could not be renewed ({self._error!r}); the gateway "
                "drops the trial when it runs out"
            )
            lost.__cause__ = self._error
            self._lose(lost)
        if self._lost is not None:
            raise self._lost.with_traceback(None)  # not the renewal thread's frames

    def restore(self, dep: Deployment) -> bool:
        """Send ``dep`` unless the live deployment is someone else's; True when it is in force.

        Renewals stop first. If the live deployment cannot be read, or there is none (a
        restarted gateway), ``dep`` is sent anyway: there is nobody's change to undo, and a
        canary must not leave its own trial behind.
        """
        with self._lock:
            self._current = None
            if isinstance(self._lost, CanaryPreempted):
                # Already seen: someone else's change is in force. A failed or empty read now
                # must not make this canary send its old deployment over theirs.
                return False
            try:
                live = self._client.get_deployment()
            except Exception as exc:
                logger.warning("canary restore: live deployment unreadable (%r), sending it", exc)
            else:
                # Sent even when the answer already shows ``dep``: that may be a replica that
                # never took the trial, while the others (and the desired state) still hold it.
                if live is not None and not self._ours(live) and _plain(live) != _plain(dep):
                    return False
            self._client.set_deployment(dep)
            return True

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)


class CanaryTurnTimeout(GatewayError):
    """Another trial stayed in force on the gateway longer than this canary would wait for it."""


def _settled(dep: Deployment | None, now: float) -> Deployment | None:
    """``dep`` as the gateway serves it once its lease checks ran: a trial whose lease ran out
    (its controller died) is gone, the champion alone remains."""
    if dep is not None and dep.has_trial() and dep.lease_expired(now):
        return dep.without_trial()
    return dep


def trial_in_force(dep: Deployment | None, now: float) -> bool:
    """A canary or shadow is on the gateway and no lease has ended it: another release's canary
    (which renews its lease while it runs), or an operator's trial (no lease)."""
    return dep is not None and dep.has_trial() and not dep.lease_expired(now)


def wait_for_turn(
    client: DeploymentAdmin,
    timeout_s: float,
    *,
    poll_s: float = 1.0,
    on_wait: Callable[[Deployment], None] | None = None,
) -> Deployment | None:
    """Wait until no trial is in force on the gateway; return its deployment then.

    Release runs of different deployments (a person's release, the nightly retrain) may reach
    their canaries at once; the later one waits here for the first to end, instead of sending
    its trial over it. A trial whose lease ran out (its controller died) is over: the champion
    alone is returned, which is what every replica serves at its next lease check. Raises
    :class:`CanaryTurnTimeout` after ``timeout_s``, having sent nothing.

    Two runs that look in the same instant may both go on: the one that finds the other's trial
    when its canary begins, or at its next change, stops with :class:`CanaryPreempted`, leaving
    that trial in place (:func:`another_trial_took_over` says so; the release task then waits
    here again and starts over). Traffic is never split three ways.
    """
    deadline = time.monotonic() + timeout_s
    waited = False
    while True:
        live = client.get_deployment()
        now = time.time()
        if not trial_in_force(live, now):
            return _settled(live, now)
        assert live is not None
        left = deadline - time.monotonic()
        if left <= 0:
            raise CanaryTurnTimeout(
                f"a trial stayed in force for over {timeout_s:g} s ({_describe(live)}); this "
                "canary did not start and sent nothing"
            )
        if not waited and on_wait is not None:
            on_wait(live)
        waited = True
        time.sleep(min(poll_s, left))


@dataclass(frozen=True, slots=True)
class UnattributedPolicy:
    """How many of a step's requests may go unanswered by any version (client timeout,
    connection reset: no version header) before the canary is rolled back.

    Judges compare versions, so they only see answered requests: a canary that hangs on some
    requests would otherwise be judged on the ones it answered, and promoted. These failures
    cannot be pinned on either version; while a trial is on they are held against it (rolling
    back is the safe side). Rolled back when at least ``min_failures`` requests of the step, and
    more than ``max_share`` of them, went unanswered.
    """

    max_share: float = 0.01
    min_failures: int = 2

    def __post_init__(self) -> None:
        if not 0 <= self.max_share <= 1 or self.min_failures < 1:
            raise ValueError("max_share must lie in [0, 1] and min_failures be at least 1")


def judge_unattributed(
    step: list[Observation], weight: int, policy: UnattributedPolicy
) -> Verdict | None:
    """Pure: a "rollback" verdict when too many of ``step`` got no answer from any version."""
    blind = sum(1 for o in step if o.version == UNKNOWN_VERSION and not o.ok)
    share = blind / len(step) if step else 0.0
    if blind < policy.min_failures or share <= policy.max_share:
        return None
    evidence = {
        "unattributed_failures": float(blind),
        "unattributed_share": share,
        "max_unattributed_share": policy.max_share,
    }
    why = (
        f"{blind} of {len(step)} requests at {weight}% got no answer from any version "
        f"({share:.1%} > {policy.max_share:.1%}: timeouts or dropped connections); they cannot "
        "be pinned on a version, so the trial is not trusted"
    )
    return Verdict("rollback", (why,), evidence)


@dataclass(frozen=True, slots=True)
class ShadowPolicy:
    """The optional shadow phase before any user sees the candidate's answers.

    For ``seconds`` the candidate gets a mirrored ``fraction`` of requests (answers discarded,
    compared with the champion's). It is rolled back when more than ``max_failed_share`` of the
    mirrored requests failed on it, or when its predicted class differs from the champion's on
    more than ``max_disagreement`` of at least ``min_rows`` compared rows.
    """

    seconds: float
    fraction: float = 1.0
    max_disagreement: float = 0.05
    min_rows: int = 50
    max_failed_share: float = 0.01

    def __post_init__(self) -> None:
        if not self.seconds > 0 or not 0 < self.fraction <= 1 or self.min_rows < 1:
            raise ValueError("shadow seconds > 0, fraction in (0, 1] and min_rows >= 1 needed")


def _count(value: object) -> int:
    """A count from a JSON report: a number, else 0."""
    return int(value) if isinstance(value, int | float) else 0


@dataclass(frozen=True, slots=True)
class ShadowStats:
    """What the gateway measured of its shadow (``GET /admin/shadow``)."""

    mirrored: int
    rows_compared: int
    rows_agreeing: int
    failed: int

    @classmethod
    def from_report(cls, report: Mapping[str, object]) -> ShadowStats:
        keys = ("mirrored", "rows_compared", "rows_agreeing", "failed")
        return cls(*(_count(report.get(k)) for k in keys))

    @classmethod
    def merged(cls, reports: Iterable[Mapping[str, object]]) -> ShadowStats:
        """The counts of every replica any of ``reports`` covered, each counted once.

        Behind a Kubernetes Service each poll reaches one pod, whose report adds up its own
        workers only (``by_replica``). A replica's counts only grow while its shadow stays, so
        its largest ones seen are its latest. Reports without ``by_replica`` (an older gateway)
        count as a whole, the last one read.
        """
        latest: dict[str, tuple[int, ...]] = {}
        whole: ShadowStats | None = None
        for report in reports:
            by = report.get("by_replica")
            if not isinstance(by, Mapping):
                whole = cls.from_report(report)
                continue
            for replica, counts in by.items():
                if not isinstance(counts, Mapping):
                    continue
                # The gateway's per-replica names (infra/gateway/app.py shadow_report).
                mine = tuple(_count(counts.get(k)) for k in ("mirrored", "rows", "agree", "failed"))
                if str(replica) not in latest or mine > latest[str(replica)]:
                    latest[str(replica)] = mine
        if not latest:
            return whole or cls(0, 0, 0, 0)
        return cls(*(sum(col) for col in zip(*latest.values(), strict=True)))


def read_shadow(
    fetch: Callable[[], Mapping[str, object]], *, max_polls: int = 8, settle: int = 2
) -> ShadowStats:
    """Poll ``GET /admin/shadow`` until ``settle`` polls in a row bring no replica not seen
    before (at most ``max_polls``), and add up every replica's counts once (:meth:`merged`).
    One gateway's first report covers all its replicas: three polls then."""
    reports: list[Mapping[str, object]] = []
    seen: set[str] = set()
    quiet = 0
    for _ in range(max_polls):
        report = fetch()
        reports.append(report)
        by = report.get("by_replica")
        new = set(map(str, by)) - seen if isinstance(by, Mapping) else set()
        seen |= new
        quiet = 0 if new else quiet + 1
        if quiet >= settle:
            break
    return ShadowStats.merged(reports)


def read_pods_shadow(
    urls: Sequence[str], fetch: Callable[[str], Mapping[str, object]], *, shadow: str | None = None
) -> ShadowStats:
    """``GET /admin/shadow`` of every pod in ``urls`` once (``fetch(url)``), added up, each
    replica once (:meth:`ShadowStats.merged`): a pod's report covers its replicas, where
    :func:`read_shadow` reaches pods at random through a Service. With ``shadow``, a pod
    mirroring to another version (or none) adds nothing. A pod that does not answer is left out
    (logged); none answering raises the last pod's error."""
    if not urls:
        raise GatewayError("no gateway pod to read")
    reports: list[Mapping[str, object]] = []
    failed: GatewayError | None = None
    answered = 0
    for url in urls:
        try:
            report = fetch(url)
        except GatewayError as exc:
            failed = exc
            logger.warning("stage=canary pod's shadow counts not read: %s", exc)
            continue
        answered += 1
        if shadow is None or report.get("shadow") == shadow:
            reports.append(report)
    if failed is not None and not answered:
        raise failed
    return ShadowStats.merged(reports)


def judge_shadow(stats: ShadowStats, policy: ShadowPolicy) -> Verdict:
    """Pure: "rollback" on failures or disagreement, else "continue" (on to the weight steps).

    Too few compared rows is "continue" with a reason saying so: the weight steps that follow
    judge the candidate on live answers anyway; the shadow phase only stops the obvious.
    """
    failed_share = stats.failed / stats.mirrored if stats.mirrored else 0.0
    disagreement = 1.0 - stats.rows_agreeing / stats.rows_compared if stats.rows_compared else 0.0
    evidence = {
        "shadow_mirrored": float(stats.mirrored),
        "shadow_rows_compared": float(stats.rows_compared),
        "shadow_failed": float(stats.failed),
        "shadow_failed_share": failed_share,
        "shadow_max_failed_share": policy.max_failed_share,
        "shadow_disagreement": disagreement,
        "shadow_max_disagreement": policy.max_disagreement,
    }
    if stats.mirrored and failed_share > policy.max_failed_share:
        why = f"shadow failed {stats.failed} of {stats.mirrored} mirrored requests"
        return Verdict("rollback", (why,), evidence)
    if stats.rows_compared < policy.min_rows:
        why = f"shadow inconclusive: {stats.rows_compared} rows compared (< {policy.min_rows})"
        return Verdict("continue", (why,), evidence)
    # In counts, not rates: 1 - 95/100 is a hair above 0.05 in floating point.
    if stats.rows_compared - stats.rows_agreeing > policy.max_disagreement * stats.rows_compared:
        why = (
            f"shadow disagrees with the champion on {disagreement:.1%} of "
            f"{stats.rows_compared} rows (> {policy.max_disagreement:.1%})"
        )
        return Verdict("rollback", (why,), evidence)
    why = f"shadow agrees on {1 - disagreement:.1%} of {stats.rows_compared} rows"
    return Verdict("continue", (why,), evidence)


def http_load(
    base_url: str,
    model: str,
    rows: np.ndarray,
    labels: np.ndarray | None = None,
    *,
    candidate_version: str,
    min_samples: int,
    max_seconds: float,
    concurrency: int = 8,
    timeout: float = 5.0,
) -> LoadFn:
    """The default :data:`LoadFn`: real requests via :func:`~ballast.loadgen.run_load`.

    Each call sends until the candidate answered ``min_samples`` times or ``max_seconds``
    elapse. The request budget scales with the weight (about four times the expected number
    needed to reach ``min_samples`` at that share, plus a floor) so a step is bounded in count
    as well as in time.
    """

    def enough(counts: Mapping[str, VersionCounts]) -> bool:
        seen = counts.get(candidate_version)
        return seen is not None and seen.n >= min_samples

    def load(weight: int) -> list[Observation]:
        budget = 4 * math.ceil(min_samples * 100 / max(weight, 1)) + 100
        return run_load(
            base_url,
            model,
            rows,
            labels,
            concurrency=concurrency,
            max_requests=budget,
            # At weight 0 (the shadow phase) the candidate answers nothing, so nothing can end
            # the call early: come back every second and let the caller's clock decide.
            max_seconds=max_seconds if weight > 0 else min(max_seconds, 1.0),
            stop_when=enough,
            timeout=timeout,
        )

    return load


# Consecutive failed reads of /admin/observations a live-traffic canary rides out.
_MAX_POLL_FAILURES = 5
# At most this many polls between tries of a pod that failed (live_traffic with pods).
_MAX_POD_BACKOFF = 16


def live_traffic(
    base_url: str,
    token: str,
    *,
    candidate_version: str,
    min_samples: int,
    max_seconds: float,
    poll_s: float = 0.25,
    pods: Callable[[], list[str]] | None = None,
    model: str | None = None,
) -> LoadFn:
    """A :data:`LoadFn` that sends nothing: it reads what real clients got from every replica
    (``GET /admin/observations``) since the last look.

    Each poll opens a new connection, so with several replicas on one port the kernel spreads
    the polls and every replica is read in turn; each keeps its own cursor.

    ``pods`` gives the URL of every pod of a gateway whose pods share no port (Kubernetes: a
    headless Service's addresses, :func:`~ballast.gateway_client.pod_urls`), asked again every
    step: each poll then reads every pod, where ``base_url`` (a Service) reaches one pod a poll
    at random. A pod that does not answer is tried again after 2, 4, ... (at most 16) polls and
    logged once a step. With ``model``, a replica serving another model adds nothing (pods
    found by a name that also covers another model's gateway).

    A replica seen for the first time (or restarted) is read from that moment on. Only answers
    routed at the step's own weight count (each observation carries the weight it was served
    under). A call returns once the candidate answered ``min_samples`` times or ``max_seconds``
    pass (1 s at weight 0, the shadow phase). Labels are unknown here, so judges see errors and
    latency, not accuracy.
    """
    from ballast.gateway_client import GatewayClient

    cursors: dict[str, int] = {}
    started_of: dict[str, float] = {}

    failures = [0]

    def read(url: str, weight: int) -> list[Observation]:
        with GatewayClient(url, token) as gw:
            page = gw.observations(cursors)
        served = page.get("model")
        if model is not None and isinstance(served, str) and served != model:
            return []
        replica, started = str(page["replica"]), float(page["started"])
        known = started_of.get(replica) == started
        started_of[replica] = started
        cursors[replica] = int(page["next"])
        if not known:
            return []  # start watching this replica from now
        # Only answers routed at this step's weight: a replica read late in the last step (or
        # in the shadow phase) still holds answers served under the weight before, which would
        # count for this step and be judged as if served at this one.
        return [
            Observation(
                version=str(v),
                ok=bool(ok),
                latency_s=float(t),
                # The routing key's pseudonym (sticky traffic), from gateways that report it.
                key=str(served[1]) if len(served) > 1 and served[1] is not None else None,
            )
            for _, v, _, ok, t, *served in page["observations"]
            if not served or served[0] == weight
        ]

    urls = [base_url]
    reported: set[str] = set()  # pods whose failed read was logged this step
    # Pods that failed: url -> (failures in a row, poll number before which it is not tried).
    # A deleted pod's address can hold each read for the client's whole timeout until the next
    # step looks the pods up again; retried after 2, 4, ... up to 16 polls, it holds few.
    backoff: dict[str, tuple[int, int]] = {}
    polls = [0]

    def poll(weight: int) -> list[Observation]:
        out: list[Observation] = []
        failed: GatewayError | None = None
        answered = 0
        polls[0] += 1
        # Every pod when all are waiting out a failure: a gateway gone must still end the
        # canary after _MAX_POLL_FAILURES polls.
        due = [u for u in urls if polls[0] >= backoff.get(u, (0, 0))[1]] or urls
        for url in due:
            fails = backoff.get(url, (0, 0))[0]
            try:
                out.extend(read(url, weight))
            except GatewayError as exc:
                failed = exc
                if len(urls) > 1:
                    backoff[url] = (fails + 1, polls[0] + min(2 ** (fails + 1), _MAX_POD_BACKOFF))
                    if url not in reported:
                        reported.add(url)
                        logger.warning("stage=canary pod not read (tried again later): %s", exc)
            else:
                answered += 1
                backoff.pop(url, None)
        if failed is not None and not answered:
            # One replica's hiccup (a 503, a stall) loses nothing: the next poll reads on from
            # the same cursors. Only a gateway gone (every pod of it) for several polls in a
            # row ends the canary.
            failures[0] += 1
            if failures[0] > _MAX_POLL_FAILURES:
                raise failed
            return out
        failures[0] = 0
        return out

    def load(weight: int) -> list[Observation]:
        deadline = time.monotonic() + (max_seconds if weight > 0 else min(max_seconds, 1.0))
        if pods is not None:
            # Pods come and go (an autoscaler, a rollout): asked again every step. A failed
            # lookup keeps the last known pods; the polls then say whether they answer.
            with suppress(GatewayError):
                urls[:] = pods() or urls
            reported.clear()
            backoff.clear()
        out: list[Observation] = []
        while True:
            out.extend(poll(weight))
            have = sum(1 for o in out if o.version == candidate_version)
            if have >= min_samples or time.monotonic() >= deadline:
                return out
            time.sleep(poll_s)

    return load


def _serves(dep: Deployment, champion: VersionSpec) -> bool:
    return dep.champion is not None and dep.champion.content() == champion.content()


def _await_champion(
    client: DeploymentAdmin,
    live: Deployment,
    champion: VersionSpec,
    settle_s: float,
    *,
    poll_s: float = 0.5,
) -> Deployment | None:
    """The live deployment once it serves ``champion``, the one the release read as champion
    (None if the gateway serves nothing by then: the canary sets it up from scratch).

    Waits up to ``settle_s`` (a replica still converging on a recent change); after that, a
    gateway serving another champion means someone changed it since the release read the
    registry (a rollback, by a person or the watchdog). Going on would send ``champion`` back
    to the gateway in the first step, undoing their change, and would judge the candidate
    against a version they took out of service: :class:`CanaryPreempted`, with nothing sent.
    """
    deadline = time.monotonic() + settle_s
    current: Deployment | None = live
    while current is not None and not _serves(current, champion):
        if time.monotonic() >= deadline:
            raise CanaryPreempted(
                f"the gateway serves {_describe(current)}, not champion {champion.version} "
                "that this release read from the registry: someone changed the champion since "
                "(a rollback?). The canary did not start and sent nothing; run the release again.",
                live=current,
            )
        time.sleep(poll_s)
        current = _settled(client.get_deployment(), time.time())
    return current


@contextmanager
def _restore_on_failure(lease: _Lease, model: str, before: Deployment | None) -> Iterator[None]:
    """On any exception, put back the deployment read before the canary, then re-raise.

    Only over a deployment this canary put there: one someone else set meanwhile (a forced
    rollback) is theirs and stays.
    """
    try:
        yield
    except BaseException as exc:
        # Nothing deployed before means nothing should be served after.
        restore = before if before is not None else Deployment(model=model)
        try:
            restored = lease.restore(restore)
        except Exception as restore_exc:
            # The original failure stays the one raised; the restore failure rides along.
            exc.add_note(f"restoring the pre-canary deployment failed too: {restore_exc!r}")
            logger.error("canary aborted (%r) and the restore failed: %r", exc, restore_exc)
        else:
            if restored:
                logger.warning("canary aborted (%r): pre-canary deployment restored", exc)
            else:
                exc.add_note("the pre-canary deployment was not restored: someone else's is live")
                logger.warning("canary aborted (%r): someone else's deployment left live", exc)
        raise


def _no_check() -> None:
    return None


def _drive_step(
    load: LoadFn,
    weight: int,
    candidate: str,
    min_samples: int,
    step_max_seconds: float,
    check: Callable[[], None] = _no_check,
) -> list[Observation]:
    """Call ``load`` until the candidate has ``min_samples`` answers in this step or time is up."""
    deadline = time.monotonic() + step_max_seconds
    out: list[Observation] = []
    while True:
        batch = load(weight)
        check()
        out.extend(batch)
        have = sum(1 for o in out if o.version == candidate)
        # An empty batch means the load has nothing more to give: don't spin until the deadline.
        if have >= min_samples or not batch or time.monotonic() >= deadline:
            return out


@dataclass(slots=True)
class _StreamStep:
    observations: list[Observation]
    verdict: Verdict
    baseline: VersionStats | None
    canary: VersionStats


def _drive_stream_step(
    judge: StreamJudge,
    load: LoadFn,
    *,
    weight: int,
    next_weight: int | None,
    champion: str | None,
    candidate: str,
    seen: list[Observation],
    min_samples: int,
    step_max_seconds: float,
    check: Callable[[], None] = _no_check,
) -> _StreamStep:
    """Feed each load batch to the judge and ask it at once; :func:`step_action` ends the step."""
    deadline = time.monotonic() + step_max_seconds
    out: list[Observation] = []
    while True:
        batch = load(weight)
        check()
        out.extend(batch)
        seen.extend(batch)
        judge.observe(batch, weight)
        baseline = VersionStats.from_observations(champion, seen) if champion else None
        canary = VersionStats.from_observations(candidate, seen)
        verdict = judge.judge(baseline, canary, weight)
        have = sum(1 for o in out if o.version == candidate)
        action = step_action(verdict, next_weight=next_weight, step_done=have >= min_samples)
        # An empty batch means the load has nothing more to give: don't spin until the deadline.
        if action != "stay" or not batch or time.monotonic() >= deadline:
            return _StreamStep(out, verdict, baseline, canary)


def _rolled_back(records: list[StepRecord]) -> bool:
    return bool(records) and records[-1].verdict.decision == "rollback"


def _step_deployment(
    model: str, champion: VersionSpec | None, candidate: VersionSpec, weight: int, key_salt: str
) -> Deployment:
    if champion is None:  # every key goes to the candidate: nothing to salt
        return Deployment(model=model, canary=candidate, canary_weight=100)
    return Deployment(
        model=model, champion=champion, canary=candidate, canary_weight=weight, key_salt=key_salt
    )


def _shadow_phase(
    admin: DeploymentAdmin,
    load: LoadFn,
    check: Callable[[], None],
    *,
    model: str,
    champion: VersionSpec,
    candidate: VersionSpec,
    policy: ShadowPolicy,
    reader: Callable[[], ShadowStats],
    started: float,
) -> StepRecord:
    """Mirror traffic to the candidate for ``policy.seconds`` from the moment the gateway serves
    the shadow, then judge what the gateway saw."""
    phase_started = time.monotonic()
    admin.set_deployment(
        Deployment(
            model=model, champion=champion, shadow=candidate, shadow_fraction=policy.fraction
        )
    )
    # From the answer, not the request: the change loads and warms the candidate on every
    # replica first. Counted from the request, a load slower than the phase (a big model, a
    # busy box) left no time for traffic and the shadow was judged on nothing.
    deadline = time.monotonic() + policy.seconds
    seen: list[Observation] = []
    while (left := deadline - time.monotonic()) > 0:
        batch = load(0)
        check()
        seen.extend(batch)
        if not batch:
            time.sleep(min(left, 0.1))  # no traffic to send: wait the phase out
    stats = reader()
    verdict = judge_shadow(stats, policy)
    now = time.monotonic()
    return StepRecord(
        index=0,
        weight=0,
        verdict=verdict,
        seconds=now - started,
        step_seconds=now - phase_started,
        counts=dict(Counter(o.version for o in seen)),
        baseline_n=len(seen),
        canary_n=stats.rows_compared,
    )


def run_canary(
    client: DeploymentAdmin,
    *,
    model: str,
    champion: VersionSpec | None,
    candidate: VersionSpec,
    steps: tuple[int, ...],
    judge: Judge,
    load: LoadFn,
    min_samples: int,
    step_max_seconds: float,
    on_step: Callable[[StepRecord], None] | None = None,
    lease_s: float | None = None,
    shadow: ShadowPolicy | None = None,
    shadow_reader: Callable[[], ShadowStats] | None = None,
    promote: Callable[[], AbstractContextManager[object]] | None = None,
    unattributed: UnattributedPolicy | None = None,
    champion_settle_s: float = 10.0,
) -> CanaryResult:
    """Run a progressive canary of ``candidate`` against ``champion`` and apply the outcome.

    Each step sets the canary weight, drives load (until the candidate has ``min_samples``
    answers in the step or ``step_max_seconds`` pass) and asks ``judge`` about everything seen
    since the canary began. "rollback" ends it at once with the champion alone; "continue" moves
    to the next weight; only a "promote" makes the candidate the champion (a judge answers it at
    100 %, or earlier when configured to promote early). A last step without a "promote" (too
    little evidence) rolls back: a canary that proved nothing is not promoted. With no champion
    (first release) the candidate takes 100 % at once and the judge works on absolute thresholds.

    A step whose time (or load) ran out before the candidate answered ``min_samples`` requests
    ends the canary as inconclusive unless the judge rolls back (or a stream judge promotes on
    evidence strong enough already): more traffic is never given on evidence nobody saw at
    that weight. Requests no version answered (timeouts, dropped connections) are held
    against the trial (:func:`judge_unattributed`, ``unattributed``): judges see only answers,
    so a canary that hangs on some requests would otherwise be judged on the rest.

    A :class:`~ballast.judge.StreamJudge` is started for this canary, sees every load batch and
    is asked after each one; a step then lasts until :func:`step_action` moves on (at least
    ``min_samples`` candidate answers, the judge's word before 100 %) or ``step_max_seconds``
    pass. A step before 100 % whose time runs out while the judge is not yet sure ends the canary
    as inconclusive (rolled back) instead of giving the candidate all traffic.

    With ``lease_s`` every trial deployment carries a lease renewed in the background: if this
    process dies (killed, machine lost, network cut), the gateway drops the trial by itself
    within ``lease_s`` and serves the champion alone; a lease that ran out unrenewed stops the
    canary (:class:`CanaryLeaseLost`) for good. Before each change (and each renewal) the live
    deployment is compared with what this canary sent: one changed by someone else stops the
    canary (:class:`CanaryPreempted`) and stays in force. With a ``shadow`` policy (and a champion)
    the candidate first gets mirrored traffic only; a shadow that fails or disagrees is rolled
    back before any user sees one of its answers (step 0, weight 0, in ``steps``).

    ``promote`` makes a promotion official where the source of truth is kept (the registry's
    aliases): it is entered before the gateway is sent the promoted deployment, since a
    registry-backed gateway accepts only the versions the aliases name, and it must undo itself
    when the block raises. Then the pre-canary deployment is restored, as after any failure.
    """
    if champion is not None and champion.version == candidate.version:
        raise ValueError(f"candidate {candidate.version} is already the champion")
    if min_samples < 1 or not step_max_seconds > 0:
        raise ValueError("min_samples must be >= 1 and step_max_seconds > 0")
    weights = validate_steps(steps) if champion is not None else (100,)

    # A dead controller's trial is never restored (the gateway refuses a lease that passed).
    before = _settled(client.get_deployment(), time.time())
    if trial_in_force(before, time.time()):
        # Another canary began since the caller's wait_for_turn (two runs saw the last one end
        # within a poll of each other): sending ours now would overwrite its trial.
        raise CanaryPreempted(
            f"another trial is in force ({_describe(before)}); the canary did not start and "
            "sent nothing",
            live=before,
        )
    if champion is not None and before is not None:
        before = _await_champion(client, before, champion, champion_settle_s)
    if shadow is not None and shadow_reader is None:
        raise ValueError("a shadow phase needs a shadow_reader")
    stream = judge if isinstance(judge, StreamJudge) else None
    blind_policy = unattributed or UnattributedPolicy()
    started = time.monotonic()
    records: list[StepRecord] = []
    seen: list[Observation] = []
    # A fresh draw of which routing keys go to the canary, per canary (see Deployment.key_salt).
    key_salt = secrets.token_hex(8)
    # Every change goes through the lease, leased or not: it notices a deployment someone else
    # changed meanwhile, so no step, promotion or restore undoes theirs.
    lease = _Lease(client, lease_s or None, first_over=before)
    admin: DeploymentAdmin = lease
    check = lease.check

    def note(record: StepRecord) -> None:
        records.append(record)
        logger.info(
            "canary %s step %d at %d%%: %s (%s) after %.1fs",
            candidate.version,
            record.index + 1,
            record.weight,
            record.verdict.decision,
            "; ".join(record.verdict.reasons),
            record.seconds,
        )
        if on_step is not None:
            on_step(record)

    try:
        with _restore_on_failure(lease, model, before):
            if shadow is not None and shadow_reader is not None and champion is not None:
                note(
                    _shadow_phase(
                        admin,
                        load,
                        check,
                        model=model,
                        champion=champion,
                        candidate=candidate,
                        policy=shadow,
                        reader=shadow_reader,
                        started=started,
                    )
                )
            if stream is not None:
                stream.start(champion.version if champion else None, candidate.version)
            offset = len(records)
            for index, weight in enumerate(weights if not _rolled_back(records) else ()):
                next_weight = weights[index + 1] if index + 1 < len(weights) else None
                step_started = time.monotonic()
                admin.set_deployment(_step_deployment(model, champion, candidate, weight, key_salt))
                if stream is None:
                    step_obs = _drive_step(
                        load, weight, candidate.version, min_samples, step_max_seconds, check
                    )
                    seen.extend(step_obs)
                    baseline = (
                        VersionStats.from_observations(champion.version, seen) if champion else None
                    )
                    canary_stats = VersionStats.from_observations(candidate.version, seen)
                    verdict = judge.judge(baseline, canary_stats, weight)
                else:
                    step = _drive_stream_step(
                        stream,
                        load,
                        weight=weight,
                        next_weight=next_weight,
                        champion=champion.version if champion else None,
                        candidate=candidate.version,
                        seen=seen,
                        min_samples=min_samples,
                        step_max_seconds=step_max_seconds,
                        check=check,
                    )
                    step_obs, verdict = step.observations, step.verdict
                    baseline, canary_stats = step.baseline, step.canary
                if verdict.decision != "rollback":
                    blind = judge_unattributed(step_obs, weight, blind_policy)
                    if blind is not None:
                        verdict = blind
                have = sum(1 for o in step_obs if o.version == candidate.version)
                # A stream judge may promote early on strong evidence; it may not advance on
                # too little.
                cut_short = verdict.decision == "continue" or (
                    stream is None and verdict.decision == "promote"
                )
                short = cut_short and have < min_samples
                if short:
                    # Out of time (or load) before the candidate answered enough: going on (or
                    # promoting) would give it more traffic on evidence nobody saw. The judge
                    # looks at every step so far; each step must show the candidate at its
                    # own weight. Inconclusive.
                    why = (
                        f"canary {candidate.version} answered {have} of {min_samples} requests "
                        f"in this step within {step_max_seconds:g} s"
                    )
                    verdict = Verdict("continue", (why,), verdict.evidence)
                now = time.monotonic()
                note(
                    StepRecord(
                        index=offset + index,
                        weight=weight,
                        verdict=verdict,
                        seconds=now - started,
                        step_seconds=now - step_started,
                        counts=dict(Counter(o.version for o in step_obs)),
                        baseline_n=baseline.n if baseline else 0,
                        canary_n=canary_stats.n,
                    )
                )
                if verdict.decision != "continue" or short:
                    break
                held = stream is not None and next_weight is not None
                if held and step_action(verdict, next_weight=next_weight, step_done=True) == "stay":
                    break  # held before 100 % and out of time: inconclusive

            last = records[-1]
            seconds_to_decision = last.seconds
            if last.verdict.decision == "promote":
                decision: Literal["promote", "rollback"] = "promote"
                reasons = last.verdict.reasons
                final = Deployment(model=model, champion=candidate)
            else:
                decision = "rollback"
                reasons = last.verdict.reasons
                if last.verdict.decision != "rollback":
                    reasons = (f"inconclusive at {last.weight}%", *reasons)
                # Champion alone at 100 % (or nothing served, on a first release).
                final = Deployment(model=model, champion=champion)
            if decision == "promote" and promote is not None:
                applied = lease.promote(final, promote)
            else:
                applied = admin.set_deployment(final)
    finally:
        lease.close()

    logger.info(
        "canary %s: %s after %.1fs (%s)",
        candidate.version,
        decision,
        seconds_to_decision,
        "; ".join(reasons),
    )
    return CanaryResult(
        decision=decision,
        candidate=candidate.version,
        champion=champion.version if champion else None,
        reasons=reasons,
        steps=tuple(records),
        seconds_to_decision=seconds_to_decision,
        final_deployment=applied,
        evidence=dict(last.verdict.evidence),
    )
