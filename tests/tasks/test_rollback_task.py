"""tasks/rollback.py via ``.fn()`` against FAKES of the gateway and the registry (tests/tasks/fakes.py):
the refusal while a trial is in force; the registry moves first, and whichever side fails,
the other is put back."""

from __future__ import annotations

import time
from typing import Any

import pytest

import tasks.rollback as tr
from ballast.audit import read as read_audit
from ballast.errors import GatewayError, RegistryError
from ballast.serving import Deployment
from ballast.settings import Settings
from tests.tasks.fakes import FakeGateway, FakeRegistry, spec


def _wire(monkeypatch: pytest.MonkeyPatch, gateway: FakeGateway, reg: FakeRegistry) -> None:
    monkeypatch.setattr(tr, "GatewayClient", gateway)
    monkeypatch.setattr(tr, "registry", lambda s=None: reg)
    monkeypatch.setattr(tr, "version_spec", lambda reg, s, info: spec(info.version))


def _audited_rollbacks(s: Settings) -> list[dict[str, object]]:
    if not s.audit_log.exists():
        return []
    return [e for e in read_audit(s.audit_log) if e["action"] == "rollback"]


def _trials(model: str) -> dict[str, Deployment]:
    return {
        "shadow": Deployment(
            model=model, champion=spec("3"), shadow=spec("4"), shadow_fraction=1.0
        ),
        "canary-at-10": Deployment(
            model=model, champion=spec("3"), canary=spec("4"), canary_weight=10
        ),
        "leased-canary": Deployment(
            model=model,
            champion=spec("3"),
            canary=spec("4"),
            canary_weight=50,
            lease_expires_at=time.time() + 60,
        ),
    }


@pytest.mark.parametrize("trial", ["shadow", "canary-at-10", "leased-canary"])
def test_a_rollback_is_refused_while_a_trial_is_in_force_and_moves_nothing(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, trial: str
) -> None:
    # Given a canary (or its shadow phase) in force on the gateway,
    live = _trials(settings.model_name)[trial]
    gateway = FakeGateway(live)
    reg = FakeRegistry({"champion": "3", "previous": "2"})
    _wire(monkeypatch, gateway, reg)
    # when the watchdog (or a person, without --force) asks for a rollback,
    with pytest.raises(tr.TrialInForce, match="trial") as info:
        tr.rollback_to_previous.fn(why="watchdog")
    # then nothing moves: the release flow owns the deployment until the trial ends.
    assert info.value.stage == "rollback"
    assert gateway.sets == [] and gateway.current == live
    assert reg.aliases == {"champion": "3", "previous": "2"}
    assert _audited_rollbacks(settings) == []


def test_a_forced_rollback_replaces_the_trial(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    gateway = FakeGateway(_trials(settings.model_name)["canary-at-10"])
    reg = FakeRegistry({"champion": "3", "previous": "2"})
    _wire(monkeypatch, gateway, reg)
    assert tr.rollback_to_previous.fn(force=True).restored == "2"
    assert gateway.current == Deployment(model=settings.model_name, champion=spec("2"))
    assert reg.aliases == {"champion": "2"}
    (entry,) = _audited_rollbacks(settings)
    assert entry["forced"] is True


def test_a_trial_whose_lease_ran_out_does_not_block_a_rollback(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The controller died; every replica drops the trial at its next lease check anyway.
    dead = Deployment(
        model=settings.model_name,
        champion=spec("3"),
        canary=spec("4"),
        canary_weight=25,
        lease_expires_at=time.time() - 1,
    )
    gateway = FakeGateway(dead)
    reg = FakeRegistry({"champion": "3", "previous": "2"})
    _wire(monkeypatch, gateway, reg)
    assert tr.rollback_to_previous.fn().restored == "2"
    assert gateway.current == Deployment(model=settings.model_name, champion=spec("2"))


def test_a_rollback_moves_the_registry_before_the_gateway(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A registry-backed gateway takes only the version the champion alias names.
    gateway = FakeGateway(Deployment(model=settings.model_name, champion=spec("3")))
    reg = FakeRegistry({"champion": "3", "previous": "2"})
    _wire(monkeypatch, gateway, reg)
    gateway.watch(reg)
    # What moved, as read at the move (the flow's report names these, not an earlier read).
    assert tr.rollback_to_previous.fn() == tr.RolledBack(restored="2", replaced="3")
    assert [a["champion"] for a in gateway.aliases_at_put] == ["2"] and reg.log == ["rollback"]
    # The version rolled away from is decided, whatever its promotion tags say (a failed
    # record_promotion left them at "candidate", and a rerun offered it again).
    assert reg.tags["3"]["ballast.status"] == "rolled_back"
    assert reg.tags["3"]["ballast.verdict"] == "rollback"


def test_a_failed_registry_move_leaves_the_gateway_untouched(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a gateway that serves nothing yet,
    gateway = FakeGateway(None)
    reg = FakeRegistry({"champion": "3", "previous": "2"}, fail=True)
    _wire(monkeypatch, gateway, reg)
    # when the registry cannot move its aliases,
    with pytest.raises(RegistryError, match="unreachable"):
        tr.rollback_to_previous.fn()
    # then the gateway is never pointed at previous.
    assert gateway.sets == [] and gateway.current is None
    assert _audited_rollbacks(settings) == []


@pytest.mark.parametrize("also", ["nothing", "restore", "undo"])
def test_a_switch_the_gateway_refuses_undoes_the_registry_move(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, also: str
) -> None:
    # Given a gateway that refuses the switch to previous (and maybe the restore after it),
    before = Deployment(model=settings.model_name, champion=spec("3"))
    gateway = FakeGateway(before, refuse_sets={1, 2} if also == "restore" else {1})
    reg = FakeRegistry({"champion": "3", "previous": "2"}, fail_undo=also == "undo")
    _wire(monkeypatch, gateway, reg)
    with pytest.raises(GatewayError, match="refused") as info:
        tr.rollback_to_previous.fn()
    notes = getattr(info.value, "__notes__", [])
    # then the champion alias is put back (unless the undo failed too, which the error says),
    if also == "undo":
        assert any("undoing the alias move failed" in n for n in notes), notes
        assert reg.aliases == {"champion": "2"}
    else:
        assert reg.aliases == {"champion": "3", "previous": "2"}
        assert reg.log == ["rollback", "undo"]
    # and the gateway is sent what it served before (a refused PUT may still have applied).
    assert gateway.sets[-1] == before and gateway.current == before
    if also == "restore":
        assert any("restoring the deployment" in n and "refused" in n for n in notes), notes
    assert _audited_rollbacks(settings) == []


def test_a_promotion_after_the_rollback_was_decided_stops_it_before_anything_moves(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given champion 3 / previous 2, and another run's canary that promotes 4 while this
    # rollback verifies version 2 (after it read the aliases, before it moves them),
    before = Deployment(model=settings.model_name, champion=spec("3"))
    gateway = FakeGateway(before)
    reg = FakeRegistry({"champion": "3", "previous": "2"})
    _wire(monkeypatch, gateway, reg)

    def verify_while_another_run_promotes(r: object, s: object, info: Any) -> object:
        reg.promote(settings.model_name, "4")
        return spec(info.version)

    monkeypatch.setattr(tr, "version_spec", verify_while_another_run_promotes)
    # the rollback refuses: its `previous` (2) is no longer the registry's (3),
    with pytest.raises(RegistryError, match="aliases moved"):
        tr.rollback_to_previous.fn()
    # and neither side moved: the registry keeps the promotion, the gateway what it served.
    assert reg.aliases == {"champion": "4", "previous": "3"}
    assert gateway.sets == [] and gateway.current == before
    assert _audited_rollbacks(settings) == []


def test_a_rollback_for_a_judged_champion_refuses_once_another_is_champion(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The watchdog judged version 3; version 4 was promoted before its rollback ran. Before,
    # it rolled 4 back to 3, the version that breached.
    before = Deployment(model=settings.model_name, champion=spec("4"))
    gateway = FakeGateway(before)
    reg = FakeRegistry({"champion": "4", "previous": "3"})
    _wire(monkeypatch, gateway, reg)
    with pytest.raises(RegistryError, match="not the judged version 3"):
        tr.rollback_to_previous.fn(expect_champion="3")
    assert reg.aliases == {"champion": "4", "previous": "3"} and gateway.sets == []
    assert tr.rollback_to_previous.fn(expect_champion="4") == tr.RolledBack("3", "4")


def test_lease_renewals_are_not_audited_as_traffic_changes(settings: Settings) -> None:
    # Before: every renewal (each lease_s / 3) wrote a "deployment" entry like a real step.
    from ballast.audit import read as read_audit
    from tasks.common import AuditedAdmin

    gateway = FakeGateway(Deployment(model=settings.model_name, champion=spec("1")))
    gw = AuditedAdmin(gateway, settings.audit_log, why="canary of 2")
    trial = Deployment(
        model=settings.model_name, champion=spec("1"), canary=spec("2"), canary_weight=5
    )
    for stamp in (100.0, 110.0, 120.0):  # the step, then two renewals
        gw.set_deployment(trial.model_copy(update={"lease_expires_at": time.time() + stamp}))
    gw.set_deployment(trial.model_copy(update={"canary_weight": 25}))  # the next step
    entries = [e for e in read_audit(settings.audit_log) if e["action"] == "deployment"]
    assert [e["canary_weight"] for e in entries] == [5, 25]
    assert len(gateway.sets) == 4  # every renewal was still sent


@pytest.mark.parametrize("force", [False, True])
def test_a_rollback_of_a_model_the_gateway_does_not_serve_is_refused(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, force: bool
) -> None:
    # Before: `rollback(model_name=other)` replaced the model the gateway served, and its
    # clients met 404; --force is about trials, not about another model.
    live = Deployment(model=settings.model_name, champion=spec("3"))
    gateway = FakeGateway(live)
    reg = FakeRegistry({"champion": "7", "previous": "6"})
    _wire(monkeypatch, gateway, reg)
    with pytest.raises(GatewayError, match=r"serves model .* nothing was rolled back"):
        tr.rollback_to_previous.fn("other-model", force=force)
    assert gateway.sets == [] and gateway.current == live
    assert reg.aliases == {"champion": "7", "previous": "6"}
    assert _audited_rollbacks(settings) == []
