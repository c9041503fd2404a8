"""The approval step against another run of the same release, and after an earlier timeout.

The registry here is a FAKE (an in-memory stand-in for the facade's get_version / set_tags /
set_approval, nothing else); the real registry's approval record is tested in
tests/unit/test_registry.py. The gateway, where one is needed, is a real gateway process. The human's answer is handed in by replacing the wait for it.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

import tasks.approval as ta
from ballast.audit import read as read_audit
from ballast.errors import ApprovalRejected
from ballast.gateway_client import GatewayClient
from ballast.gateway_process import GatewayProcess
from ballast.serving import Deployment
from ballast.settings import Settings
from infra.gateway.testing import build_mlp_onnx, spec_for
from model_registry import ApprovalRecord, ModelVersionInfo


class FakeRegistry:
    def __init__(self, tags: dict[str, str], champion: str | None = None) -> None:
        self.tags = dict(tags)
        self.champion = champion

    def get_by_alias(self, model: str, alias: str) -> ModelVersionInfo | None:
        assert alias == "champion"
        if self.champion is None:
            return None
        return ModelVersionInfo(model, self.champion, ("champion",), {}, None, "", 0)

    def get_version(self, model: str, version: str) -> ModelVersionInfo:
        return ModelVersionInfo(model, version, (), dict(self.tags), None, "", 0)

    def set_tags(self, model: str, version: str, tags: dict[str, str]) -> None:
        self.tags.update(tags)

    def set_approval(self, model: str, version: str, record: ApprovalRecord) -> None:
        self.tags.update(record.as_tags())


def _request(model: str = "m", policy: str = "manual", champion: str | None = None) -> Any:
    """request_approval of version 5 with one passed check."""
    return ta.request_approval(
        model=model,
        version="5",
        checks={"parity": True},
        metrics={},
        policy=policy,
        compared_champion=champion,
    )


def _answer(approve: bool, approver: str, reason: str) -> Any:
    return ta.ApprovalForm(approve=approve, approver=approver, reason=reason)


def _ask(
    monkeypatch: pytest.MonkeyPatch,
    reg: FakeRegistry,
    during_wait: Any,
    answer: Any,
    compared_champion: str | None = None,
) -> Any:
    monkeypatch.setattr(ta, "registry", lambda *a: reg)

    def wait(**kwargs: Any) -> Any:
        during_wait()
        return None if answer is None else (answer, {})  # (the answer, its unsigned proof)

    monkeypatch.setattr(ta, "_wait_for_valid_answer", wait)
    return ta.request_approval(
        model="m",
        version="5",
        checks={"parity": True},
        metrics={},
        policy="manual",
        compared_champion=compared_champion,
    )


def test_an_answer_after_another_run_decided_is_recorded_not_applied(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    reg = FakeRegistry({"ballast.status": "candidate", "ballast.approval": "pending"})

    def nightly_auto_approves() -> None:
        at = datetime.now(UTC)
        reg.set_approval(
            "m", "5", ApprovalRecord(status="approved", by="policy:auto", at=at, reason="ok")
        )

    # Before: bob's rejection overwrote the approval a trial was running under.
    with pytest.raises(ApprovalRejected, match=r"approved by policy:auto \(another run\)"):
        _ask(monkeypatch, reg, nightly_auto_approves, _answer(False, "bob", "too thin"))
    assert (reg.tags["ballast.approval"], reg.tags["ballast.approval.by"]) == (
        "approved",
        "policy:auto",
    )
    last = read_audit(settings.audit_log)[-1]
    assert last["action"] == "approval_superseded"
    assert (last["approver"], last["approve"], last["reason"]) == ("bob", False, "too thin")


def test_an_approval_after_an_earlier_timeout_reopens_the_candidate(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The earlier ask timed out and closed the candidate; a rerun of the release asks again.
    reg = FakeRegistry(
        {
            "ballast.status": "rejected",
            "ballast.verdict": "rejected",
            "ballast.approval": "rejected",
            "ballast.approval.by": "timeout",
        }
    )
    approved, by, _ = _ask(monkeypatch, reg, lambda: None, _answer(True, "alice", "fine"))
    assert (approved, by) == (True, "alice")
    # Before: status and verdict stayed "rejected", and a canary that crashed left the version
    # blocked for good as "its verdict is rejected", though alice approved it.
    assert reg.tags["ballast.status"] == "candidate" and reg.tags["ballast.verdict"] == ""
    assert ta.prior_decision_of(reg.get_version("m", "5")) is None


@pytest.mark.parametrize(
    ("compared", "after", "says"),
    [
        ("3", "4", "moved from version 3 to 4"),
        (None, "4", "version 4 became the champion"),
        ("3", None, "lost its alias"),
    ],
)
def test_an_approval_given_after_the_champion_moved_is_recorded_not_applied(
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    compared: str | None,
    after: str | None,
    says: str,
) -> None:
    # The approver weighed the candidate against one champion; another release (or a
    # rollback) moved the alias while the approval waited.
    reg = FakeRegistry({"ballast.status": "candidate", "ballast.approval": "pending"}, compared)

    def another_release_promotes() -> None:
        reg.champion = after

    with pytest.raises(ApprovalRejected, match=says):
        _ask(monkeypatch, reg, another_release_promotes, _answer(True, "bob", "ok"), compared)
    assert reg.tags["ballast.approval"] == "pending"  # undecided: a rerun asks again
    last = read_audit(settings.audit_log)[-1]
    assert last["action"] == "approval_stale" and says in last["stale"]
    assert (last["approver"], last["reason"]) == ("bob", "ok")


def test_a_rejection_stands_whatever_the_champion_did(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    reg = FakeRegistry({"ballast.status": "candidate", "ballast.approval": "pending"}, "3")

    def another_release_promotes() -> None:
        reg.champion = "4"

    approved = _ask(monkeypatch, reg, another_release_promotes, _answer(False, "bob", "no"), "3")
    assert approved == (False, "bob", "no")
    assert reg.tags["ballast.approval"] == "rejected"


def test_an_approval_against_the_same_champion_is_applied(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    reg = FakeRegistry({"ballast.status": "candidate", "ballast.approval": "pending"}, "3")
    assert _ask(monkeypatch, reg, lambda: None, _answer(True, "bob", "ok"), "3")[0] is True
    assert reg.tags["ballast.approval"] == "approved"


def test_nobody_is_asked_when_the_champion_moved_before_the_approval(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    reg = FakeRegistry({"ballast.status": "candidate", "ballast.approval": "pending"}, "4")
    asked: list[object] = []
    monkeypatch.setattr(ta, "registry", lambda *a: reg)
    monkeypatch.setattr(ta, "_wait_for_valid_answer", lambda **kw: asked.append(kw))
    with pytest.raises(ApprovalRejected, match="not put to approval: the champion moved"):
        ta.request_approval(
            model="m",
            version="5",
            checks={"parity": True},
            metrics={},
            policy="manual",
            compared_champion="3",
        )
    assert asked == [] and reg.tags["ballast.approval"] == "pending"


def test_a_pause_key_names_the_version_the_attempt_and_the_champion_compared_against(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A rerun of a flow run meets the pause keys of its earlier run (Prefect hands back an
    # answer stored under the same key): only the same question may find the same key.
    monkeypatch.setenv("BALLAST_APPROVERS", '["alice"]')
    from ballast.settings import get_settings

    get_settings.cache_clear()
    keys: list[str] = []

    def pause(**kwargs: Any) -> Any:
        keys.append(kwargs["key"])
        return _answer(True, "alice", "ok")

    monkeypatch.setattr(ta, "pause_flow_run", pause)

    def key_for(champion: str | None) -> str:
        ta._wait_for_valid_answer(
            model="m", version="5", form=None, started_by="bob", compared_champion=champion
        )
        return keys[-1]

    three, again, four, none = key_for("3"), key_for("3"), key_for("4"), key_for(None)
    assert three == again and three.startswith("approval-5-1-")
    assert len({three, four, none}) == 3
    get_settings.cache_clear()


_APPROVED = {
    "ballast.status": "candidate",
    "ballast.approval": "approved",
    "ballast.approval.by": "policy:auto",
}


def test_a_rejection_is_not_written_over_the_approval_a_registry_trial_runs_under(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The nightly run approved version 5 and its canary runs on a registry-backed gateway (the
    # weight tag); a person's release of the same content asks again and bob rejects.
    reg = FakeRegistry({**_APPROVED, "ballast.canary_weight": "25"})
    # Before: the rejection was written and the flow closed the candidate under the trial.
    with pytest.raises(ApprovalRejected, match=r"on trial.*rollback --force"):
        _ask(monkeypatch, reg, lambda: None, _answer(False, "bob", "no"))
    assert (reg.tags["ballast.approval"], reg.tags["ballast.approval.by"]) == (
        "approved",
        "policy:auto",
    )
    last = read_audit(settings.audit_log)[-1]
    assert (last["action"], last["approver"], last["decided_by"]) == (
        "approval_superseded",
        "bob",
        "policy:auto",
    )


@pytest.fixture
def gateway_serving_5_as_canary(settings: Settings, tmp_path: Path) -> Iterator[GatewayClient]:
    """A real gateway process: version 3 of `settings.model_name` champion, 5 its canary."""
    three = spec_for(build_mlp_onnx(tmp_path / "three.onnx", seed=3), "3")
    five = spec_for(build_mlp_onnx(tmp_path / "five.onnx", seed=5), "5")
    with (
        GatewayProcess.start(
            settings, log_path=tmp_path / "gw.log", timeout=30, exit_with_parent=True
        ),
        GatewayClient(settings.gateway_url, settings.admin_token()) as client,
    ):
        client.set_deployment(
            Deployment(model=settings.model_name, champion=three, canary=five, canary_weight=25)
        )
        yield client


def test_a_rejection_is_not_written_over_the_approval_a_gateway_trial_runs_under(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, gateway_serving_5_as_canary: GatewayClient
) -> None:
    reg = FakeRegistry(dict(_APPROVED))  # a file-backed gateway puts no tags on the version
    monkeypatch.setattr(ta, "registry", lambda *a: reg)
    monkeypatch.setattr(
        ta, "_wait_for_valid_answer", lambda **kw: (_answer(False, "bob", "no"), {})
    )
    with pytest.raises(ApprovalRejected, match="is on trial on the gateway"):
        _request(settings.model_name)
    assert reg.tags["ballast.approval"] == "approved"
    # The trial ended (the canary left the gateway): the same answer is a rejection like any.
    dep = gateway_serving_5_as_canary.get_deployment()
    assert dep is not None
    gateway_serving_5_as_canary.set_deployment(dep.without_trial())
    approved, by, _ = _request(settings.model_name)
    assert (approved, by, reg.tags["ballast.approval"]) == (False, "bob", "rejected")


def test_an_approved_version_no_gateway_serves_takes_a_rejection(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Approved by a run that died before its canary; nothing listens at the gateway's address.
    reg = FakeRegistry(dict(_APPROVED))
    approved, _, _ = _ask(monkeypatch, reg, lambda: None, _answer(False, "bob", "changed my mind"))
    assert not approved and reg.tags["ballast.approval"] == "rejected"


def test_an_answer_to_a_version_a_canary_decided_meanwhile_is_in_the_audit_log(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Bob was asked about version 5 while another run's canary, running on an earlier approval
    # of it, ended in a rollback: the approval tags did not change, the verdict did.
    reg = FakeRegistry(dict(_APPROVED))

    def canary_rolls_back() -> None:
        reg.tags.update({"ballast.status": "rolled_back", "ballast.verdict": "rollback"})

    with pytest.raises(ApprovalRejected, match="decided while this answer waited"):
        _ask(monkeypatch, reg, canary_rolls_back, _answer(True, "bob", "ship it"))
    # Before: refused without a trace of bob's answer anywhere.
    last = read_audit(settings.audit_log)[-1]
    assert (last["action"], last["approver"], last["approve"]) == (
        "approval_superseded",
        "bob",
        True,
    )
    assert "rollback" in last["decided"]


def test_two_runs_deciding_one_version_at_once_write_one_decision(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Run B decides while run A is between its last look and its last write (B starts inside
    # A's first registry write). Before: both passed the look and both wrote; the registry
    # kept A's rejection while B went on to the canary on its approval.
    reg = FakeRegistry({"ballast.status": "candidate", "ballast.approval": "pending"})
    monkeypatch.setattr(ta, "DECIDING_TIMEOUT_S", 0.3, raising=False)
    monkeypatch.setattr(ta, "registry", lambda *a: reg)
    monkeypatch.setattr(
        ta, "_wait_for_valid_answer", lambda **kw: (_answer(False, "bob", "thin"), {})
    )
    run_b: list[object] = []
    first_write = reg.set_tags

    def set_tags(model: str, version: str, tags: dict[str, str]) -> None:
        if not run_b:
            run_b.append("started")
            try:
                run_b.append(_request(policy="auto"))
            except ApprovalRejected as exc:
                run_b.append(exc)
        first_write(model, version, tags)

    monkeypatch.setattr(reg, "set_tags", set_tags)
    approved, by, _ = _request()
    assert (approved, by) == (False, "bob")
    _, b = run_b
    assert isinstance(b, ApprovalRejected) and "another run held" in str(b), b
    held_out = [e for e in read_audit(settings.audit_log) if e["action"] == "approval_superseded"]
    assert [(e["approver"], e["approve"]) for e in held_out] == [("policy:auto", True)]
    assert (reg.tags["ballast.approval"], reg.tags["ballast.approval.by"]) == ("rejected", "bob")
    decisions = [e for e in read_audit(settings.audit_log) if e["action"] in ("approve", "reject")]
    assert [(e["action"], e["approver"]) for e in decisions] == [("reject", "bob")]
