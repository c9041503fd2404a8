"""Manual approval: the run pauses with a typed form; a rejection changes nothing, an approval
continues to the canary. Answers arrive through Prefect's API as the UI would send them."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
from prefect.client.schemas.objects import StateType
from prefect.flow_runs import resume_flow_run

from ballast.audit import read as read_audit
from ballast.release import ALIAS_CANDIDATE, ALIAS_CHAMPION, TAG_STATUS
from ballast.settings import Settings
from flows.release import release_flow
from model_registry import Registry

pytestmark = pytest.mark.flow


def _paused_run_id(timeout: float = 120.0) -> Any:
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            runs = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED]))
                )
            )
            if runs:
                return runs[0].id
            time.sleep(0.5)
    raise AssertionError("no flow run paused for approval within the bound")


def _run_in_thread(**kwargs: Any) -> tuple[threading.Thread, dict[str, Any]]:
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["report"] = release_flow(approval_policy="manual", **kwargs)
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, box


def test_manual_policy_pauses_and_a_rejection_changes_nothing(release_env: Settings) -> None:
    s = release_env
    reg = Registry(s.tracking_uri, s.artifact_root)
    champion_before = reg.get_by_alias(s.model_name, ALIAS_CHAMPION)
    thread, box = _run_in_thread()
    run_id = _paused_run_id()
    resume_flow_run(run_id, run_input={"approve": False, "approver": "bob", "reason": "not today"})
    thread.join(timeout=120)
    assert not thread.is_alive(), "the flow did not finish after the answer"
    assert "error" not in box, box.get("error")
    report = box["report"]
    assert report.outcome == "rejected" and report.reason == "not today"
    version = reg.get_version(s.model_name, report.version)
    assert version.tags[TAG_STATUS] == "rejected"
    assert ALIAS_CANDIDATE not in version.aliases
    after = reg.get_by_alias(s.model_name, ALIAS_CHAMPION)
    assert (after and after.version) == (champion_before and champion_before.version)
    last = read_audit(s.audit_log)[-2]  # the reject entry, then the candidate's closing entry
    assert (
        last["action"] == "reject" and last["approver"] == "bob" and last["reason"] == "not today"
    )


def test_manual_approval_continues_to_the_canary(release_env: Settings) -> None:
    s = release_env
    thread, box = _run_in_thread()
    run_id = _paused_run_id()
    resume_flow_run(
        run_id, run_input={"approve": True, "approver": "alice", "reason": "looks good"}
    )
    thread.join(timeout=180)
    assert not thread.is_alive() and "error" not in box, box.get("error")
    assert box["report"].outcome == "promoted"
    reg = Registry(s.tracking_uri, s.artifact_root)
    assert reg.get_by_alias(s.model_name, ALIAS_CHAMPION).version == box["report"].version  # type: ignore[union-attr]
