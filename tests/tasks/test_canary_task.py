"""tasks/canary.py via ``.fn()`` against FAKES of the gateway and the registry
(tests/tasks/fakes.py): a promotion moves the registry first, and whichever side fails, the
other is put back."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import tasks.canary as tc
from ballast.errors import GatewayError, RegistryError
from ballast.judge import Observation, ThresholdJudge
from ballast.serving import Deployment
from ballast.settings import Settings
from tests.tasks.fakes import FakeGateway, FakeRegistry, spec

ROWS = np.zeros((1, 30), dtype=np.float32)
LABELS = np.zeros(1, dtype=np.int64)


def _wire(monkeypatch: pytest.MonkeyPatch, gateway: FakeGateway, reg: FakeRegistry) -> None:
    monkeypatch.setattr(tc, "GatewayClient", gateway)
    monkeypatch.setattr(tc, "registry", lambda s=None: reg)
    monkeypatch.setattr(tc, "version_spec", lambda reg, s, info: spec(info.version))
    monkeypatch.setattr(tc, "ensure_gateway", lambda s: None)
    monkeypatch.setattr(tc, "_judge", lambda s: ThresholdJudge(min_samples=10))

    def healthy(s: Settings, candidate: str, rows: object, labels: object) -> object:
        return lambda weight: [Observation(candidate, True, 0.001)] * s.canary_min_samples

    monkeypatch.setattr(tc, "_load", healthy)


def _candidate(version: str) -> object:
    from types import SimpleNamespace

    return SimpleNamespace(name="ignored", version=version, tags={})


def test_a_promotion_moves_the_registry_before_the_gateway(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A registry-backed gateway (Kubernetes) takes only the versions the aliases name: the
    # promoted deployment must find the aliases already moved.
    gateway = FakeGateway(Deployment(model=settings.model_name, champion=spec("1")))
    reg = FakeRegistry({"champion": "1", "candidate": "2"})
    _wire(monkeypatch, gateway, reg)
    gateway.watch(reg)
    outcome = tc.canary_release.fn(_candidate("2"), ROWS, LABELS)
    assert outcome.decision == "promote"
    assert gateway.current == Deployment(model=settings.model_name, champion=spec("2"))
    champions = [a.get("champion") for a in gateway.aliases_at_put]
    assert champions[-1] == "2" and set(champions[:-1]) == {"1"}
    assert reg.aliases == {"champion": "2", "previous": "1"} and reg.log == ["promote 2"]


def test_a_failed_promotion_of_a_first_release_leaves_nothing_served(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a first release (no champion, nothing deployed) that passes its canary,
    gateway = FakeGateway(None)
    reg = FakeRegistry({}, fail=True)
    _wire(monkeypatch, gateway, reg)
    # when the registry cannot promote it,
    with pytest.raises(RegistryError, match="unreachable"):
        tc.canary_release.fn(_candidate("1"), ROWS, LABELS)
    # then the gateway is never told it is the champion, and serves nothing again.
    assert not any(d.champion == spec("1") for d in gateway.sets), gateway.sets
    assert gateway.current == Deployment(model=settings.model_name), gateway.current


def test_a_promotion_the_gateway_refuses_is_undone_in_the_registry(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a canary that passes, and a gateway that refuses the promoted deployment (the PUT
    # after one per step),
    before = Deployment(model=settings.model_name, champion=spec("1"))
    gateway = FakeGateway(before, refuse_sets={len(settings.canary_steps) + 1})
    reg = FakeRegistry({"champion": "1", "candidate": "2"})
    _wire(monkeypatch, gateway, reg)
    with pytest.raises(GatewayError, match="refused"):
        tc.canary_release.fn(_candidate("2"), ROWS, LABELS)
    # then the alias move is undone, and the gateway serves the pre-canary deployment.
    assert reg.log == ["promote 2", "undo"]
    assert reg.aliases == {"champion": "1", "candidate": "2"}
    assert gateway.current == before and gateway.sets[-1] == before


@pytest.mark.parametrize("fails", ["restore", "undo"])
def test_a_failed_restore_or_undo_after_a_failed_promotion_rides_along_on_the_error(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, fails: str
) -> None:
    # trial, promotion refused, then the restore refused too (or the registry's undo fails)
    gateway = FakeGateway(None, refuse_sets={2, 3} if fails == "restore" else {2})
    reg = FakeRegistry({"candidate": "1"}, fail_undo=fails == "undo")
    _wire(monkeypatch, gateway, reg)
    with pytest.raises(GatewayError, match="refused") as info:
        tc.canary_release.fn(_candidate("1"), ROWS, LABELS)
    notes = getattr(info.value, "__notes__", [])
    if fails == "restore":
        assert gateway.sets[-1] == Deployment(model=settings.model_name), "the restore was tried"
        assert any("restoring the pre-canary deployment failed" in n for n in notes), notes
        assert reg.aliases == {"candidate": "1"}
    else:
        assert any("undoing the alias move failed" in n for n in notes), notes
        assert gateway.current == Deployment(model=settings.model_name)


def test_the_candidate_alias_names_the_version_on_trial(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a run whose candidate (2) waited for its turn while a later run registered 3,
    gateway = FakeGateway(Deployment(model=settings.model_name, champion=spec("1")))
    reg = FakeRegistry({"champion": "1", "candidate": "3"})
    _wire(monkeypatch, gateway, reg)
    gateway.watch(reg)
    tc.canary_release.fn(_candidate("2"), ROWS, LABELS)
    # then the alias named 2 before the first trial deployment went out.
    assert reg.log[0] == "candidate 2" and gateway.aliases_at_put[0]["candidate"] == "2"
    # and a traffic share an earlier trial left on 2 was cleared first (not brought back).
    assert reg.tags["2"] == {"ballast.canary_weight": "0", "ballast.lease_expires_at": "none"}
    # each under the model's serving lock (no gateway write lands between look and move).
    assert reg.serving_locks >= 1 and reg.unlocked_alias_writes == []


def _nightly_canary_of_3(settings: Settings, weight: int = 10) -> Deployment:
    """Another release's trial in force: the nightly run's canary of 3 over champion 1."""
    import time

    return Deployment(
        model=settings.model_name,
        champion=spec("1"),
        canary=spec("3"),
        canary_weight=weight,
        lease_expires_at=time.time() + 600,
    )


def _promote_3_on_a_look(
    monkeypatch: pytest.MonkeyPatch,
    gateway: FakeGateway,
    reg: FakeRegistry,
    look: int,
    *,
    while_in_force: Deployment | None = None,
) -> None:
    """The other canary promotes 3 (registry, then gateway) at our ``look``-th read of the
    gateway, counting only reads while ``while_in_force`` is live when it is given."""
    assert gateway.current is not None
    model = gateway.current.model
    reads = 0
    read = gateway.get_deployment

    def the_other_canary_ends(*_: object) -> Deployment | None:
        nonlocal reads
        if while_in_force is None or gateway.current == while_in_force:
            reads += 1
            if reads == look:
                reg.aliases = {"champion": "3", "previous": "1"}
                gateway.current = Deployment(model=model, champion=spec("3"))
        return read()

    monkeypatch.setattr(gateway, "get_deployment", the_other_canary_ends)


def _lands_before_our_first_put(
    monkeypatch: pytest.MonkeyPatch, gateway: FakeGateway, land: Callable[[], None]
) -> list[Deployment]:
    """``land`` (another party's change) happens between our look and our first PUT; returns
    the list our refused PUTs are recorded in."""
    put = gateway.set_deployment
    refused: list[Deployment] = []

    def racing_put(dep: Deployment, **kw: Any) -> Deployment:
        if not gateway.sets and not refused:
            land()
            try:
                return put(dep, **kw)
            except Exception:
                refused.append(dep)
                raise
        return put(dep, **kw)

    monkeypatch.setattr(gateway, "set_deployment", racing_put)
    return refused


def test_a_canary_waits_for_another_releases_trial_and_judges_against_the_champion_it_leaves(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given the nightly run's canary of 3 in force (leased), while this run's candidate is 4,
    gateway = FakeGateway(_nightly_canary_of_3(settings, weight=50))
    reg = FakeRegistry({"champion": "1", "candidate": "3"})
    _wire(monkeypatch, gateway, reg)
    _promote_3_on_a_look(monkeypatch, gateway, reg, 2)  # it ends after one look of ours
    outcome = tc.canary_release.fn(_candidate("4"), ROWS, LABELS)
    # then nothing was sent over its trial, and 4 was judged against 3, the new champion.
    assert gateway.sets[0].champion == spec("3") and gateway.sets[0].canary == spec("4")
    assert outcome.champion == "3" and outcome.decision == "promote"
    assert reg.log[0] == "candidate 4"  # the alias moved only once the turn came


def test_a_canary_whose_trial_another_release_overwrote_waits_its_turn_and_starts_again(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given two runs that saw the last trial end within a poll of each other: ours (4) sent
    # its first step, then the nightly run's canary of 3 was sent over it.
    gateway = FakeGateway(Deployment(model=settings.model_name, champion=spec("1")))
    reg = FakeRegistry({"champion": "1"})
    _wire(monkeypatch, gateway, reg)
    other = _nightly_canary_of_3(settings)
    put = gateway.set_deployment

    def overwritten_after_our_first_step(dep: Deployment, **kw: Any) -> Deployment:
        applied = put(dep, **kw)
        if len(gateway.sets) == 1:
            gateway.current = other  # the other run's PUT, not one of ours
        return applied

    monkeypatch.setattr(gateway, "set_deployment", overwritten_after_our_first_step)
    # seen by our lease check, then by our wait: then 3 is promoted
    _promote_3_on_a_look(monkeypatch, gateway, reg, 3, while_in_force=other)
    outcome = tc.canary_release.fn(_candidate("4"), ROWS, LABELS)

    # then ours stopped without touching the other's trial, waited for it to end and ran again,
    # judged against 3, the champion that canary left.
    assert gateway.sets[0].champion == spec("1") and gateway.sets[0].canary == spec("4")
    steps = [(d.champion, d.canary) for d in gateway.sets[1:-1]]
    assert steps and set(steps) == {(spec("3"), spec("4"))}, steps
    assert gateway.sets[-1].champion == spec("4") and gateway.sets[-1].canary is None
    assert outcome.champion == "3" and outcome.decision == "promote"


def test_a_trial_sent_between_our_look_and_our_first_step_is_never_overwritten(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given the nightly run's canary of 3 sent in the moment between our look (nothing in
    # force) and our first step: the window the first step's If-Match closes.
    gateway = FakeGateway(Deployment(model=settings.model_name, champion=spec("1")))
    reg = FakeRegistry({"champion": "1"})
    _wire(monkeypatch, gateway, reg)
    other = _nightly_canary_of_3(settings)

    def the_other_run_puts_first() -> None:
        gateway.current = other

    refused = _lands_before_our_first_put(monkeypatch, gateway, the_other_run_puts_first)
    _promote_3_on_a_look(monkeypatch, gateway, reg, 3, while_in_force=other)
    outcome = tc.canary_release.fn(_candidate("4"), ROWS, LABELS)

    # then our first step was refused (412) and changed nothing: the other trial stayed until
    # it ended; ours waited its turn and ran against 3.
    assert [(d.champion, d.canary) for d in refused] == [(spec("1"), spec("4"))]
    assert gateway.sets[0].champion == spec("3") and gateway.sets[0].canary == spec("4")
    assert outcome.champion == "3" and outcome.decision == "promote"


def test_a_promotion_landing_between_our_look_and_our_first_step_starts_ours_again(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given the previous run's promotion of 3 landing (registry, then gateway) after our look
    # but before our first step:
    gateway = FakeGateway(Deployment(model=settings.model_name, champion=spec("1")))
    reg = FakeRegistry({"champion": "1"})
    _wire(monkeypatch, gateway, reg)

    def the_promotion_lands() -> None:
        reg.aliases = {"champion": "3", "previous": "1"}
        gateway.current = Deployment(model=settings.model_name, champion=spec("3"))

    refused = _lands_before_our_first_put(monkeypatch, gateway, the_promotion_lands)
    outcome = tc.canary_release.fn(_candidate("4"), ROWS, LABELS)

    # then our step over 1 was refused and changed nothing (it would have brought 1 back),
    # and ours began again from a new look, against 3.
    assert [(d.champion, d.canary) for d in refused] == [(spec("1"), spec("4"))]
    assert all(d.champion in (spec("3"), spec("4")) for d in gateway.sets)
    assert outcome.champion == "3" and outcome.decision == "promote"


def test_a_rollback_during_the_canary_is_not_waited_out(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ballast.canary import CanaryPreempted

    gateway = FakeGateway(Deployment(model=settings.model_name, champion=spec("1")))
    reg = FakeRegistry({"champion": "1"})
    _wire(monkeypatch, gateway, reg)
    put = gateway.set_deployment
    rolled_back = Deployment(model=settings.model_name, champion=spec("0"))

    def rollback_after_our_first_step(dep: Deployment, **kw: Any) -> Deployment:
        applied = put(dep, **kw)
        if len(gateway.sets) == 1:
            gateway.current = rolled_back  # a person's forced rollback
        return applied

    monkeypatch.setattr(gateway, "set_deployment", rollback_after_our_first_step)
    with pytest.raises(CanaryPreempted, match="changed by someone else"):
        tc.canary_release.fn(_candidate("4"), ROWS, LABELS)
    assert len(gateway.sets) == 1 and gateway.current == rolled_back


def test_a_shadow_phase_names_its_version_shadow_for_the_trial_only(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A registry-backed gateway mirrors only to the version the shadow alias names.
    monkeypatch.setenv("BALLAST_CANARY_SHADOW_SECONDS", "0.2")
    from ballast.settings import get_settings

    get_settings.cache_clear()
    gateway = FakeGateway(Deployment(model=settings.model_name, champion=spec("1")))
    reg = FakeRegistry({"champion": "1", "candidate": "2"})
    _wire(monkeypatch, gateway, reg)
    gateway.watch(reg)
    tc.canary_release.fn(_candidate("2"), ROWS, LABELS)
    assert gateway.sets[0].shadow == spec("2")  # the shadow phase went first,
    assert gateway.aliases_at_put[0]["shadow"] == "2"  # with the alias in place,
    assert "shadow" not in reg.aliases and reg.log[-1] == "shadow deleted"  # removed after
    assert reg.tags["2"]["ballast.shadow_fraction"] == "0"
