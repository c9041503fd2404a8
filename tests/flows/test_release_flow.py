"""The release flow end to end under Prefect, against a real gateway process and MLflow store.

Tests in this module run in order and share one state: release 1 becomes champion, later releases
are judged against it.
"""

from __future__ import annotations

import hashlib
import io
import re
from pathlib import Path

import pytest

from ballast.audit import Anchor, verify_chain
from ballast.audit import read as read_audit
from ballast.crypto import encrypt_stream
from ballast.data import bundled_frame
from ballast.errors import (
    ConfigError,
    CostGateFailed,
    DecryptionError,
    KeyNotFoundError,
    QualityGateFailed,
    ValidationFailed,
)
from ballast.gateway_client import GatewayClient
from ballast.ingest import dataset_identity
from ballast.keys import LocalKeyring
from ballast.release import ALIAS_CANDIDATE, ALIAS_CHAMPION, ALIAS_PREVIOUS, TAG_STATUS
from ballast.settings import Settings, get_settings
from flows.release import release_flow
from model_registry import Registry
from tests.flows.conftest import next_distinct_release

pytestmark = pytest.mark.flow


def _registry(s: Settings) -> Registry:
    return Registry(s.tracking_uri, s.artifact_root)


def _deployment(s: Settings):  # type: ignore[no-untyped-def]
    with GatewayClient(s.gateway_url, s.admin_token()) as gw:
        return gw.get_deployment()


def _state(s: Settings) -> tuple[list[tuple[str, tuple[str, ...]]], object]:
    """Everything a failed run must leave untouched: versions with aliases, and the live deployment."""
    versions = [
        (v.version, tuple(sorted(v.aliases))) for v in _registry(s).list_versions(s.model_name)
    ]
    return versions, _deployment(s)


def test_first_release_is_promoted_and_served(release_env: Settings) -> None:
    s = release_env
    report = release_flow()
    assert report.outcome == "promoted", report
    reg = _registry(s)
    champion = reg.get_by_alias(s.model_name, ALIAS_CHAMPION)
    assert champion is not None and champion.version == report.version
    assert reg.get_by_alias(s.model_name, ALIAS_CANDIDATE) is None
    assert (
        champion.tags["ballast.dataset_sha256"]
        and champion.tags["ballast.backend"] == "onnxruntime"
    )
    cipher_sha = hashlib.sha256(Path(s.default_dataset_uri).read_bytes()).hexdigest()
    assert champion.tags["ballast.dataset_ciphertext_sha256"] == cipher_sha
    assert champion.tags["ballast.validation_artifact_id"], (
        "lineage must name the validation report"
    )
    dep = _deployment(s)
    assert dep is not None and dep.champion is not None and dep.champion.version == report.version
    assert dep.canary is None
    entries = read_audit(s.audit_log)
    decisions = [e["action"] for e in entries if e["action"] != "deployment"]
    assert decisions[-3:] == ["register", "approve", "promote"], decisions
    # Every traffic change was audited, ending with the candidate alone.
    changes = [e for e in entries if e["action"] == "deployment"]
    assert changes and changes[-1]["version"] == report.version and changes[-1]["canary"] is None
    assert changes[-1]["why"] == f"canary of {report.version}"


def test_the_champion_carries_signed_custody_and_a_typed_approval(release_env: Settings) -> None:
    from ballast.manifest import SignedManifest, verify_manifest

    s = release_env
    reg = _registry(s)
    champion = reg.get_by_alias(s.model_name, ALIAS_CHAMPION)
    assert champion is not None
    local = reg.download(s.model_name, champion.version)
    manifest = verify_manifest(SignedManifest.read(local), s.signing_key_path, local)
    assert manifest.dataset_ciphertext_sha256 == champion.tags["ballast.dataset_ciphertext_sha256"]
    assert manifest.validation_artifact_id == champion.tags["ballast.validation_artifact_id"]
    assert manifest.content_key == champion.tags["ballast.content_key"]
    # The signing key is wrapped by the key provider: no private key in the clear on disk.
    key_file = s.signing_key_path.read_text()
    assert "PRIVATE KEY" not in key_file and "ballast-wrapped-ed25519/1" in key_file
    approval = reg.get_approval(s.model_name, champion.version)
    assert approval is not None and approval.status == "approved" and approval.by == "policy:auto"
    # The registry holds the files: no run leaves its build and staging folders behind.
    staging = s.state_dir / "staging"
    assert not staging.exists() or list(staging.iterdir()) == [], list(staging.iterdir())


def test_rerunning_the_champions_release_changes_nothing(release_env: Settings) -> None:
    s = release_env
    before = _state(s)
    report = release_flow()  # same data, code and parameters as the champion
    assert report.outcome == "unchanged", report
    assert _state(s) == before, "no second version, no alias or traffic moved"


def test_faulty_release_is_rolled_back_by_the_canary(release_env: Settings) -> None:
    s = release_env
    fault = "errors"
    reg = _registry(s)
    champion_before = reg.get_by_alias(s.model_name, ALIAS_CHAMPION)
    assert champion_before is not None
    report = release_flow(inject_fault=fault)
    assert report.outcome == "rolled_back", report
    assert report.canary_steps and report.canary_steps[-1]["decision"] == "rollback"
    after = reg.get_by_alias(s.model_name, ALIAS_CHAMPION)
    assert after is not None and after.version == champion_before.version, "champion must not move"
    assert report.version is not None
    bad = reg.get_version(s.model_name, report.version)
    assert bad.tags[TAG_STATUS] == "rolled_back" and ALIAS_CANDIDATE not in bad.aliases
    dep = _deployment(s)
    assert dep is not None and dep.canary is None and dep.canary_weight == 0
    assert dep.champion is not None and dep.champion.version == champion_before.version
    # The decision is published: a markdown artifact (reason, steps, evidence) and an event.
    markdown = _artifact_markdown(report.decision_artifact_id)
    assert f"version {report.version}: ROLLED BACK" in markdown
    assert "## Canary steps" in markdown and "| rollback |" in markdown
    assert report.reason.split(";")[0] in markdown
    # It says which replica failed the candidate's requests and why (the gateway's failure
    # lines over the canary).
    assert f"# Fault report: {s.model_name} version {report.version}" in markdown, markdown
    assert "failed requests** between" in markdown and "| injected_fault |" in markdown
    # with the audit log's anchor after the decision's entries, which the log still matches.
    found = re.search(r"Audit log anchor: `([^`]+)`", markdown)
    assert found is not None, markdown
    held = Anchor.parse(found.group(1))
    assert held.entries >= 2 and verify_chain(s.audit_log, [held]) == []
    assert read_audit(s.audit_log)[held.entries - 1]["action"] == "rolled_back"
    event = _event("ballast.release.rolled_back", report.version)
    assert event.payload["audit_anchor"] == held.text()
    assert event.payload["champion"] == champion_before.version
    assert event.payload["reasons"] and event.resource.id == (
        f"ballast.model.{s.model_name}.{report.version}"
    )


def _artifact_markdown(artifact_id: str | None) -> str:
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterId

    assert artifact_id
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(id=ArtifactFilterId(any_=[UUID(artifact_id)]))
        )
    assert len(found) == 1 and found[0].type == "markdown"
    return str(found[0].data)


def _event(name: str, version: str, timeout: float = 30.0):  # type: ignore[no-untyped-def]
    """The event ``name`` about ``version`` (events reach the API asynchronously: poll)."""
    import time

    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            page = client.read_events(EventFilter(event=EventNameFilter(name=[name])), limit=50)
            hits = [e for e in page.events if e.payload.get("version") == version]
            if hits:
                return hits[0]
            assert time.monotonic() < deadline, f"no event {name} for version {version}"
            time.sleep(0.5)


def test_a_model_worse_than_the_champion_stops_at_the_quality_gate(release_env: Settings) -> None:
    s = release_env
    before = _state(s)
    with pytest.raises(QualityGateFailed, match=r"\[quality\].*accuracy"):
        release_flow(inject_fault="bad-weights")
    assert _state(s) == before, "nothing may be registered, aliased or deployed"


def test_a_model_costing_many_times_the_champion_to_serve_stops_at_the_cost_gate(
    release_env: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = release_env
    before = _state(s)
    # Hidden layers 16x wider: hundreds of times the compute per row. The quality gate is
    # opened wide so that only the cost gate can stop it.
    monkeypatch.setenv("BALLAST_HIDDEN", str(16 * s.hidden))
    monkeypatch.setenv("BALLAST_QUALITY_MAX_DROP", "1")
    get_settings.cache_clear()
    try:
        with pytest.raises(
            CostGateFailed, match=r"^\[cost\] serving cost [0-9.]+x champion"
        ) as info:
            release_flow()
    finally:
        monkeypatch.delenv("BALLAST_HIDDEN")
        monkeypatch.delenv("BALLAST_QUALITY_MAX_DROP")
        get_settings.cache_clear()
    decision = info.value.decision
    assert decision.compared and set(decision.ratios) == set(s.bench_batches), decision
    assert decision.worst[1] > 2.0, decision
    assert _state(s) == before, "nothing may be registered, aliased or deployed"


def test_healthy_second_release_goes_through_the_canary_and_old_champion_becomes_previous(
    release_env: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ballast.settings import get_settings

    s = release_env
    reg = _registry(s)
    old = reg.get_by_alias(s.model_name, ALIAS_CHAMPION)
    assert old is not None
    # A release of its own (not a rerun of the champion), with a shadow phase first: mirrored
    # traffic only, then the weight steps.
    next_distinct_release()
    monkeypatch.setenv("BALLAST_CANARY_SHADOW_SECONDS", "1.5")
    get_settings.cache_clear()
    try:
        report = release_flow()
    finally:
        monkeypatch.delenv("BALLAST_CANARY_SHADOW_SECONDS")
        get_settings.cache_clear()
    assert report.outcome == "promoted", report
    # Compared with the champion's cost side by side: the same architecture, about 1x.
    cost = {k: v for k, v in report.metrics.items() if k.startswith("cost_vs_champion_b")}
    assert set(cost) == {f"cost_vs_champion_b{b}" for b in s.bench_batches}, report.metrics
    assert all(0.5 < r < 2.0 for r in cost.values()), cost
    assert [st["weight"] for st in report.canary_steps] == [0, *s.canary_steps]
    shadow = report.canary_steps[0]
    assert shadow["canary_n"] >= s.canary_min_samples, shadow  # rows the shadow answered
    assert "shadow agrees" in shadow["reasons"][0], shadow
    shadowed = [e for e in read_audit(s.audit_log) if e["action"] == "deployment" and e["shadow"]]
    assert shadowed and shadowed[-1]["shadow"] == report.version
    assert reg.get_by_alias(s.model_name, ALIAS_PREVIOUS).version == old.version  # type: ignore[union-attr]
    assert reg.get_by_alias(s.model_name, ALIAS_CHAMPION).version == report.version  # type: ignore[union-attr]


def _write(s: Settings, data: bytes, provider: LocalKeyring | None = None) -> str:
    path = s.state_dir / "datasets" / f"case-{len(data)}-{id(provider)}.enc"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        encrypt_stream(
            io.BytesIO(data),
            fh,
            provider or LocalKeyring(s.keyring_path),
            dataset_identity(s.dataset_name),
        )
    return str(path)


def test_dataset_failing_validation_stops_the_run_and_changes_nothing(
    release_env: Settings,
) -> None:
    s = release_env
    before = _state(s)
    frame = bundled_frame()
    frame.loc[0:40, "mean_radius"] = -5.0
    buf = io.StringIO()
    frame.to_csv(buf, index=False)
    with pytest.raises(ValidationFailed, match=r"\[validate\].*mean_radius"):
        release_flow(dataset_uri=_write(s, buf.getvalue().encode()))
    assert _state(s) == before


def test_a_run_asking_for_auto_approval_outside_dev_is_refused_before_it_ingests(
    release_env: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = release_env
    before = _state(s)
    monkeypatch.setenv("BALLAST_ENVIRONMENT", "prod")
    get_settings.cache_clear()
    try:
        # A dataset that does not exist: had the run ingested, it would fail on that instead.
        with pytest.raises(ConfigError, match="dev only"):
            release_flow(dataset_uri=str(s.state_dir / "missing.csv.enc"), approval_policy="auto")
    finally:
        monkeypatch.delenv("BALLAST_ENVIRONMENT")
        get_settings.cache_clear()
    assert _state(s) == before


@pytest.mark.parametrize(
    ("env", "kwargs", "match"),
    [
        # A manual release nobody may approve: before, it trained, compiled and registered,
        # then waited out the approval timeout (an hour) for an answer nobody could give.
        ({"BALLAST_APPROVERS": "[]"}, {"approval_policy": "manual"}, "nobody holds the approver"),
        # A rehearsed fault fails real users' requests at the canary weight.
        (
            {"BALLAST_ENVIRONMENT": "prod", "BALLAST_APPROVERS": '["alice"]'},
            {"approval_policy": "manual", "inject_fault": "errors"},
            "prod refuses it",
        ),
    ],
    ids=["manual-without-approvers", "fault-in-prod"],
)
def test_a_run_that_cannot_end_well_is_refused_before_it_ingests(
    release_env: Settings,
    monkeypatch: pytest.MonkeyPatch,
    env: dict[str, str],
    kwargs: dict[str, str],
    match: str,
) -> None:
    s = release_env
    before = _state(s)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    try:
        with pytest.raises(ConfigError, match=match):
            release_flow(dataset_uri=str(s.state_dir / "missing.csv.enc"), **kwargs)
    finally:
        for name in env:
            monkeypatch.delenv(name)
        get_settings.cache_clear()
    assert _state(s) == before


def test_tampered_ciphertext_stops_the_run_and_changes_nothing(release_env: Settings) -> None:
    s = release_env
    before = _state(s)
    good = s.default_dataset_uri
    data = bytearray(Path(good).read_bytes())
    data[len(data) // 2] ^= 0x01
    bad = s.state_dir / "datasets" / "tampered.enc"
    bad.write_bytes(bytes(data))
    with pytest.raises(DecryptionError, match=r"\[decrypt\]"):
        release_flow(dataset_uri=str(bad))
    assert _state(s) == before


def test_dataset_under_an_unknown_key_stops_the_run_naming_the_key(
    release_env: Settings, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    s = release_env
    before = _state(s)
    other = LocalKeyring(tmp_path / "other-keyring.json")
    other_id = other.create_key()
    from ballast.data import bundled_csv_bytes

    uri = _write(s, bundled_csv_bytes(), other)
    with pytest.raises(KeyNotFoundError, match=other_id):
        release_flow(dataset_uri=uri)
    assert _state(s) == before


def test_rollback_flow_returns_to_previous_and_the_gateway_follows(release_env: Settings) -> None:
    from flows.rollback import rollback_flow

    s = release_env
    reg = _registry(s)
    previous = reg.get_by_alias(s.model_name, ALIAS_PREVIOUS)
    assert previous is not None, "an earlier test promoted two versions"
    replaced_version = reg.get_by_alias(s.model_name, ALIAS_CHAMPION).version  # type: ignore[union-attr]
    assert rollback_flow() == previous.version
    assert reg.get_by_alias(s.model_name, ALIAS_CHAMPION).version == previous.version  # type: ignore[union-attr]
    dep = _deployment(s)
    assert dep is not None and dep.champion is not None and dep.champion.version == previous.version
    last = read_audit(s.audit_log)[-1]
    assert last["action"] == "rollback" and last["gateway_updated"] is True
    event = _event("ballast.release.rolled_back", replaced_version)
    assert event.payload["champion"] == previous.version


def test_rollback_with_the_gateway_down_reaches_a_gateway_started_later(
    release_env: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Aliases move and the desired-state file says the restored champion, so a gateway that
    starts afterwards serves it (not the version rolled away from)."""
    import json

    from ballast.gateway_process import GatewayProcess
    from ballast.settings import get_settings
    from tasks.rollback import desired_state_file, rollback_to_previous
    from tests.conftest import free_port

    s = release_env
    reg = _registry(s)
    champion = reg.get_by_alias(s.model_name, ALIAS_CHAMPION)
    assert champion is not None
    other = max(
        (
            v
            for v in reg.list_versions(s.model_name)
            # Once champion: still tagged so, or rolled back from by an earlier test.
            if v.tags.get(TAG_STATUS) in ("champion", "rolled_back")
            and v.version != champion.version
        ),
        key=lambda v: int(v.version),
    )
    reg.promote(s.model_name, other.version)  # champion: other; previous: the one serving now
    revision = json.loads(desired_state_file(s).read_text())["revision"]
    monkeypatch.setenv("BALLAST_GATEWAY_PORT", str(free_port()))  # nothing listens there
    get_settings.cache_clear()
    try:
        down = get_settings()
        assert rollback_to_previous.fn().restored == champion.version
        assert reg.get_by_alias(s.model_name, ALIAS_CHAMPION).version == champion.version  # type: ignore[union-attr]
        doc = json.loads(desired_state_file(s).read_text())
        assert doc["revision"] == revision + 1
        assert doc["deployment"]["champion"]["version"] == champion.version
        last = read_audit(s.audit_log)[-1]
        assert last["action"] == "rollback" and last["gateway_updated"] is False
        assert last["desired_state_written"] is True
        with (
            GatewayProcess.start(down, log_path=s.state_dir / "gateway-later.log") as later,
            GatewayClient(later.url, down.admin_token()) as gw,
        ):
            dep = gw.get_deployment()
        assert dep is not None and dep.champion is not None
        assert dep.champion.version == champion.version
    finally:
        get_settings.cache_clear()


def test_sequential_judge_rolls_back_a_faulty_release_in_the_flow(
    release_env: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ballast.settings import get_settings

    monkeypatch.setenv("BALLAST_JUDGE_KIND", "sequential")
    get_settings.cache_clear()
    try:
        s = get_settings()
        assert s.judge_kind == "sequential"
        champion = _registry(s).get_by_alias(s.model_name, ALIAS_CHAMPION)
        report = release_flow(inject_fault="errors")
        assert report.outcome == "rolled_back", report
        assert any("error" in r for r in report.reason.split(";")), report.reason
        after = _registry(s).get_by_alias(s.model_name, ALIAS_CHAMPION)
        assert after is not None and champion is not None and after.version == champion.version
    finally:
        monkeypatch.delenv("BALLAST_JUDGE_KIND")
        get_settings.cache_clear()
