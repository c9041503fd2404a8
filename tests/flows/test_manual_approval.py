"""Manual approval: the run pauses with a typed form; a rejection changes nothing, an approval
continues to the canary. Answers arrive through Prefect's API as the UI would send them, or
through ``ballast approve`` run in-process. The run's starter is ``ops-starter`` (BALLAST_ACTOR);
alice, bob, carol and ops-starter hold the approver role."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
from prefect.client.schemas.objects import StateType
from prefect.concurrency.sync import concurrency
from prefect.flow_runs import resume_flow_run
from prefect.input.run_input import keyset_from_paused_state
from typer.testing import CliRunner

import tasks.approval as ta
from ballast.approval_signing import (
    approval_message,
    create_approver_key,
    load_approver_key,
    public_key_text,
    sign_approval,
    verify_approval,
)
from ballast.audit import read as read_audit
from ballast.audit import verify_chain
from ballast.cli_approve import approve_command
from ballast.release import ALIAS_CANDIDATE, ALIAS_CHAMPION, TAG_APPROVAL, TAG_STATUS
from ballast.settings import Settings, get_settings
from flows.release import release_flow
from model_registry import Registry
from tasks.approval import TAG_APPROVAL_BY, TAG_APPROVAL_REASON, TAG_APPROVAL_STARTED_BY
from tasks.common import _one_slot
from tests.flows.conftest import next_distinct_release

pytestmark = pytest.mark.flow

STARTER = "ops-starter"


@pytest.fixture(scope="module")
def approval_env(release_env: Settings) -> Iterator[Settings]:
    """release_env plus approvers and a known starter (the flow runs in this process)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BALLAST_APPROVERS", f'["alice", "bob", "carol", "{STARTER}"]')
        mp.setenv("BALLAST_ACTOR", STARTER)
        get_settings.cache_clear()
        yield get_settings()
    get_settings.cache_clear()


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


def _form_description(run_id: Any) -> str:
    """The markdown Prefect shows above the paused run's form."""
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(run_id).state
        assert state is not None
        key = keyset_from_paused_state(state)["description"]
        value = client.read_flow_run_input(key=key, flow_run_id=run_id)
    return str(json.loads(value)) if value.startswith('"') else value


def _wait_for(what: str, cond: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def _state(run_id: Any) -> StateType | None:
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(run_id).state
    return state.type if state else None


def _run_in_thread(**kwargs: Any) -> tuple[threading.Thread, dict[str, Any]]:
    next_distinct_release()  # each test's run is its own release, not a rerun of the last
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["report"] = release_flow(approval_policy="manual", **kwargs)
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, box


def test_manual_policy_pauses_and_a_rejection_changes_nothing(approval_env: Settings) -> None:
    s = approval_env
    reg = Registry(s.tracking_uri, s.artifact_root)
    champion_before = reg.get_by_alias(s.model_name, ALIAS_CHAMPION)
    thread, box = _run_in_thread()
    run_id = _paused_run_id()
    # The form the approver sees carries the evidence, section by section.
    description = _form_description(run_id)
    for section in (
        "### Checks",
        "### Data checks",
        "### Evaluation against the champion",
        "### Parity (compiled vs eager)",
        "### Benchmark",
        "### Training and evaluation",
    ):
        assert section in description, (section, description)
    assert "| quality_gate | pass |" in description
    assert "no champion yet: first release" in description  # this module starts empty
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
    # The run ends as it returned: Completed. Before, Prefect's server refused the move out of
    # a pause past its deadline, and the run ended Failed ("never resumed").
    assert _state(run_id) == StateType.COMPLETED
    last = read_audit(s.audit_log)[-2]  # the reject entry, then the candidate's closing entry
    assert (
        last["action"] == "reject" and last["approver"] == "bob" and last["reason"] == "not today"
    )


def test_manual_approval_continues_to_the_canary(approval_env: Settings) -> None:
    s = approval_env
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


def test_refused_answers_keep_the_run_waiting_until_an_approver_answers_by_cli(
    approval_env: Settings,
) -> None:
    s = approval_env
    app = typer.Typer()
    app.command("approve")(approve_command)
    app.command("noop")(lambda: None)  # two commands, so "approve" stays a subcommand
    thread, box = _run_in_thread()
    run_id = _paused_run_id()
    refused_before = sum(e["action"] == "approval_refused" for e in read_audit(s.audit_log))

    # The starter holds the role but may not approve their own run: refused, the run waits again.
    resume_flow_run(run_id, run_input={"approve": True, "approver": STARTER, "reason": "mine"})
    _wait_for(
        "the refusal in the audit log",
        lambda: (
            sum(e["action"] == "approval_refused" for e in read_audit(s.audit_log)) > refused_before
        ),
    )
    _wait_for("the run to pause again", lambda: _state(run_id) == StateType.PAUSED)
    refused = [e for e in read_audit(s.audit_log) if e["action"] == "approval_refused"][-1]
    assert refused["approver"] == STARTER and "started this run" in refused["reason"]

    # No role: refused locally by the CLI, nothing is sent, the run stays paused.
    local = CliRunner().invoke(app, ["approve", str(run_id), "--as", "mallory", "--reason", "x"])
    assert local.exit_code == 2 and "approver role" in local.output, local.output
    assert _state(run_id) == StateType.PAUSED
    # The starter through the CLI: refused there too (the run's form names the starter), not
    # "sent" and then refused by the run.
    refusals = len(_refusals(s))
    own = CliRunner().invoke(app, ["approve", str(run_id), "--as", STARTER, "--reason", "mine"])
    said = " ".join(own.output.split())
    assert own.exit_code == 2 and "started this run" in said and "sent" not in said, said
    assert len(_refusals(s)) == refusals + 1 and _refusals(s)[-1]["where"] == "cli"
    assert _state(run_id) == StateType.PAUSED

    # An approver rejects through the CLI: the run ends rejected, recorded on the version.
    sent = CliRunner().invoke(
        app, ["approve", str(run_id), "--as", "carol", "--reject", "--reason", "too thin"]
    )
    assert sent.exit_code == 0, sent.output
    thread.join(timeout=120)
    # The CLI said which release it answered before sending anything.
    said = " ".join(sent.output.split())  # rich wraps lines at the terminal's width
    assert f"asks approval of version {box['report'].version}" in said, said
    assert not thread.is_alive() and "error" not in box, box.get("error")
    report = box["report"]
    assert report.outcome == "rejected" and report.reason == "too thin"
    tags = Registry(s.tracking_uri, s.artifact_root).get_version(s.model_name, report.version).tags
    assert tags[TAG_APPROVAL] == "rejected" and tags[TAG_APPROVAL_BY] == "carol"
    approval = Registry(s.tracking_uri, s.artifact_root).get_approval(s.model_name, report.version)
    assert approval is not None and (approval.status, approval.by) == ("rejected", "carol")
    assert approval.reason == "too thin" and approval.at.tzinfo is not None
    assert tags[TAG_APPROVAL_REASON] == "too thin" and tags[TAG_APPROVAL_STARTED_BY] == STARTER
    assert verify_chain(s.audit_log) == [], "the flows' audit entries must chain"


def test_an_approval_given_after_the_champion_moved_is_not_applied(
    approval_env: Settings,
) -> None:
    s = approval_env
    reg = Registry(s.tracking_uri, s.artifact_root)
    if reg.get_by_alias(s.model_name, ALIAS_CHAMPION) is None:
        next_distinct_release()
        assert release_flow(approval_policy="auto").outcome == "promoted"
    champion = reg.get_by_alias(s.model_name, ALIAS_CHAMPION)
    assert champion is not None
    thread, box = _run_in_thread()
    run_id = _paused_run_id()
    # The evidence weighed the candidate against this champion; a rollback with no previous
    # version (here: the alias removed) changes that while the approval waits.
    reg.delete_alias(s.model_name, ALIAS_CHAMPION)
    try:
        resume_flow_run(run_id, run_input={"approve": True, "approver": "alice", "reason": "ok"})
        thread.join(timeout=120)
    finally:
        reg.set_alias(s.model_name, ALIAS_CHAMPION, champion.version)
    assert not thread.is_alive()
    assert "lost its alias" in str(box.get("error")), box
    stale = [e for e in read_audit(s.audit_log) if e["action"] == "approval_stale"][-1]
    assert stale["approver"] == "alice" and champion.version in stale["stale"]
    # Nothing was decided: the version is still pending, so a rerun asks again.
    assert reg.get_approval(s.model_name, stale["version"]).status == "pending"  # type: ignore[union-attr]


@pytest.fixture
def short_timeout(approval_env: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    monkeypatch.setenv("BALLAST_APPROVAL_TIMEOUT_S", "3")
    get_settings.cache_clear()
    yield get_settings()
    get_settings.cache_clear()  # before monkeypatch restores the module's environment


def test_a_timed_out_approval_is_a_rejection_that_changes_nothing(
    short_timeout: Settings,
) -> None:
    s = short_timeout
    reg = Registry(s.tracking_uri, s.artifact_root)
    champion_before = reg.get_by_alias(s.model_name, ALIAS_CHAMPION)
    thread, box = _run_in_thread()
    run_id = _paused_run_id()
    # A refused answer does not extend the wait: the deadline counts from the first pause.
    resume_flow_run(run_id, run_input={"approve": True, "approver": "mallory", "reason": "pls"})
    thread.join(timeout=120)
    assert not thread.is_alive() and "error" not in box, box.get("error")
    report = box["report"]
    assert report.outcome == "rejected" and report.reason == "approval timed out"
    version = reg.get_version(s.model_name, report.version)
    approval = reg.get_approval(s.model_name, report.version)
    assert approval is not None and approval.status == "rejected" and approval.by == "timeout"
    assert version.tags[TAG_STATUS] == "rejected"
    after = reg.get_by_alias(s.model_name, ALIAS_CHAMPION)
    assert (after and after.version) == (champion_before and champion_before.version)
    # The run ends as it returned: Completed. Before, Prefect's server refused the move out of
    # a pause past its deadline, and the run ended Failed ("never resumed").
    assert _state(run_id) == StateType.COMPLETED


@pytest.fixture
def dave_signs(
    approval_env: Settings,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Path]:
    """dave holds the approver role with a registered approval key (yielded: his key file)."""
    folder = tmp_path_factory.mktemp("dave")
    key_file = folder / "dave.pem"
    key = create_approver_key(key_file)
    roles = folder / "roles.json"
    roles.write_text(
        json.dumps({"dave": {"roles": ["approver"], "approval_key": public_key_text(key)}})
    )
    roles.chmod(0o600)
    monkeypatch.setenv("BALLAST_ROLES_FILE", str(roles))
    get_settings.cache_clear()
    yield key_file
    get_settings.cache_clear()  # before monkeypatch restores the module's environment


def _refusals(s: Settings) -> list[dict[str, Any]]:
    return [e for e in read_audit(s.audit_log) if e["action"] == "approval_refused"]


def _pause_key(run_id: Any) -> str:
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(run_id).state
    assert state is not None and state.state_details.pause_key is not None
    return state.state_details.pause_key


def _signed(run_id: Any, key: Ed25519PrivateKey, pause_key: str, approver: str) -> dict[str, Any]:
    """An approving answer by ``approver`` signed with ``key`` for the pause ``pause_key``."""
    msg = approval_message(
        flow_run_id=str(run_id), pause_key=pause_key, approve=True, approver=approver, reason="ok"
    )
    return {
        "approve": True,
        "approver": approver,
        "reason": "ok",
        "signature": sign_approval(key, msg),
    }


def _expect_refusal(s: Settings, run_id: Any, run_input: dict[str, Any], why: str) -> None:
    before = len(_refusals(s))
    resume_flow_run(run_id, run_input=run_input)
    _wait_for("the refusal in the audit log", lambda: len(_refusals(s)) > before)
    _wait_for("the run to pause again", lambda: _state(run_id) == StateType.PAUSED)
    refused = _refusals(s)[-1]
    assert refused["approver"] == run_input["approver"] and why in refused["reason"], refused


def test_a_registered_approver_must_sign_and_a_signature_fits_one_pause_only(
    dave_signs: Path,
) -> None:
    s = get_settings()
    app = typer.Typer()
    app.command("approve")(approve_command)
    app.command("noop")(lambda: None)
    thread, box = _run_in_thread()
    run_id = _paused_run_id()

    def answer_and_expect_refusal(run_input: dict[str, Any], why: str) -> None:
        _expect_refusal(s, run_id, run_input, why)

    def signed(key: Ed25519PrivateKey, pause_key: str) -> dict[str, Any]:
        return _signed(run_id, key, pause_key, "dave")

    first_pause = _pause_key(run_id)  # approval-<version>-1-<question>
    # Typing dave's name is no longer enough: anyone could.
    answer_and_expect_refusal(
        {"approve": True, "approver": "dave", "reason": "ok"}, "must be signed"
    )
    # Signed with another key: refused.
    answer_and_expect_refusal(
        signed(Ed25519PrivateKey.generate(), _pause_key(run_id)), "does not match"
    )
    # dave's real signature, but for the first pause: not replayable on the third.
    answer_and_expect_refusal(signed(load_approver_key(dave_signs), first_pause), "does not match")
    # Through the CLI without the key: refused locally, nothing sent.
    local = CliRunner().invoke(app, ["approve", str(run_id), "--as", "dave", "--reason", "ok"])
    assert local.exit_code == 2 and "registered approval key" in local.output, local.output
    # With it: signed for this pause, accepted.
    sent = CliRunner().invoke(
        app,
        [
            "approve",
            str(run_id),
            "--as",
            "dave",
            "--reject",
            "--reason",
            "signed no",
            "--key",
            str(dave_signs),
        ],
    )
    assert sent.exit_code == 0, sent.output
    thread.join(timeout=120)
    assert not thread.is_alive() and "error" not in box, box.get("error")
    report = box["report"]
    assert report.outcome == "rejected" and report.reason == "signed no"
    decided = [e for e in read_audit(s.audit_log) if e["action"] == "reject"][-1]
    assert decided["approver"] == "dave" and decided["signed"] is True
    # The entry holds what the signature covered: anyone with the key can check it again.
    proof = decided["signed_by"]
    assert proof["flow_run_id"] == str(run_id) and proof["pause_key"] != first_pause
    assert proof["pause_key"].rsplit("-", 2)[0] == first_pause.rsplit("-", 2)[0]  # same version
    again = approval_message(
        flow_run_id=proof["flow_run_id"],
        pause_key=proof["pause_key"],
        approve=False,
        approver="dave",
        reason="signed no",
    )
    assert verify_approval(load_approver_key(dave_signs).public_key(), again, proof["signature"])
    assert proof["approval_key"] == public_key_text(load_approver_key(dave_signs))
    assert verify_chain(s.audit_log) == []


def _rewrite(path: Path, document: object) -> None:
    """Replace the roles file as an operator would: a new file, owner-only, renamed over it."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(json.dumps(document))
    tmp.chmod(0o600)
    tmp.replace(path)


def test_a_key_replaced_or_a_role_revoked_during_the_pause_binds_the_next_answer(
    dave_signs: Path, tmp_path: Path
) -> None:
    s = get_settings()
    assert s.roles_file is not None
    thread, box = _run_in_thread()
    run_id = _paused_run_id()
    old_key = load_approver_key(dave_signs)
    # While the run waits, dave's key leaks and is replaced in the roles file:
    new_key = create_approver_key(tmp_path / "dave-new.pem")
    _rewrite(
        s.roles_file,
        {"dave": {"roles": ["approver"], "approval_key": public_key_text(new_key)}},
    )
    # then an answer signed with the leaked key is refused, though it was valid at the pause,
    _expect_refusal(
        s, run_id, _signed(run_id, old_key, _pause_key(run_id), "dave"), "does not match"
    )
    # and once dave's approver role is revoked, even his new key does not make him one.
    _rewrite(s.roles_file, {"dave": {"roles": [], "approval_key": public_key_text(new_key)}})
    _expect_refusal(
        s, run_id, _signed(run_id, new_key, _pause_key(run_id), "dave"), "approver role"
    )
    # A roles file that cannot be trusted now refuses every answer instead of using an old copy,
    s.roles_file.chmod(0o644)
    _expect_refusal(
        s,
        run_id,
        {"approve": False, "approver": "alice", "reason": "no"},
        "roles file cannot be read now",
    )
    # and once it can, an approver's answer decides.
    s.roles_file.chmod(0o600)
    resume_flow_run(run_id, run_input={"approve": False, "approver": "alice", "reason": "no"})
    thread.join(timeout=120)
    assert not thread.is_alive() and "error" not in box, box.get("error")
    assert box["report"].outcome == "rejected" and box["report"].reason == "no"


def test_a_decision_waits_for_the_server_lock_another_machines_run_holds(
    approval_env: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A run on another machine shares no flock with this one, only the Prefect server: the
    # test holds the model's one-slot limit there (no file lock), as that run would.
    s = approval_env
    reg = Registry(s.tracking_uri, s.artifact_root)
    monkeypatch.setattr(ta, "DECIDING_TIMEOUT_S", 2.0)
    name = ta.approval_lock_name(s.model_name)
    _one_slot(name)
    thread, box = _run_in_thread()
    run_id = _paused_run_id()
    with concurrency(name, occupy=1, timeout_seconds=10, strict=True, lease_duration=60):
        resume_flow_run(run_id, run_input={"approve": True, "approver": "alice", "reason": "ok"})
        thread.join(timeout=120)
        assert not thread.is_alive()
    assert "another run held" in str(box.get("error")), box
    held_out = [e for e in read_audit(s.audit_log) if e["action"] == "approval_superseded"][-1]
    assert (held_out["approver"], held_out["approve"]) == ("alice", True)
    # Nothing was decided: still pending, so a rerun asks again.
    assert reg.get_approval(s.model_name, held_out["version"]).status == "pending"  # type: ignore[union-attr]
    with get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name(name)
    assert (limit.limit, limit.active, limit.active_slots) == (1, True, 0)  # released


def test_the_approval_lock_is_put_back_to_one_slot(approval_env: Settings) -> None:
    # An operator who widened or switched off the limit would let two decisions in at once.
    name = ta.approval_lock_name("a model/with odd%name")
    assert name.startswith("ballast-approval-a-model-with-odd-name-"), name
    assert name != ta.approval_lock_name("a model/with odd&name")
    _one_slot(name)
    with get_client(sync_client=True) as client:
        client.update_global_concurrency_limit(
            name, GlobalConcurrencyLimitUpdate(limit=3, active=False)
        )
    _one_slot(name)
    _one_slot(name)  # existing and right: left as it is
    with get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name(name)
    assert (limit.limit, limit.active) == (1, True)
