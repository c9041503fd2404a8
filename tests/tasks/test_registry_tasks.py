"""Registry and rollback tasks called via ``.fn()``: idempotent registration, candidates closed
without touching the champion, verification before serving, and rollback to `previous`."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prefect.exceptions import FlowPauseTimeout

import tasks.approval
import tasks.registry
from ballast.audit import read as read_audit
from ballast.compile import compile_model
from ballast.data import bundled_csv_bytes, bundled_spec
from ballast.errors import ApprovalRejected, IntegrityError, RegistryError
from ballast.hashing import sha256_file
from ballast.manifest import SIGNED_MANIFEST_NAME, SignedManifest, verify_manifest
from ballast.release import ALIAS_CANDIDATE, ALIAS_CHAMPION, ALIAS_PREVIOUS, TAG_STATUS
from ballast.settings import Settings, get_settings
from ballast.training import train
from ballast.validation import validate_bytes
from model_registry import Registry
from tasks.approval import ApprovalForm, prior_decision_of, request_approval
from tasks.canary import version_spec
from tasks.registry import close_candidate, record_promotion, register_candidate, stage_artifacts
from tasks.rollback import rollback_to_previous


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One trained and compiled model, shared: compiling costs seconds."""
    out = tmp_path_factory.mktemp("built")
    ds = validate_bytes(bundled_csv_bytes(), bundled_spec())
    trained = train(
        ds, hidden=16, epochs=3, learning_rate=3e-3, batch_size=64, seed=1, device="cpu"
    )
    compiled = compile_model(
        trained.model,
        trained.split.x_train[:8],
        trained.split.x_test,
        out / "build",
        rtol_fp32=1e-4,
        max_batch=64,
        bench_batches=(1,),
        bench_min_time_s=0.01,
    )
    return {"ds": ds, "trained": trained, "compiled": compiled}


def _register(
    built: dict[str, Any], s: Settings, run_id: str, tmp: Path, release: str | None = None
) -> Any:
    """Register the shared build from flow run ``run_id``. ``release`` stands for different
    training inputs (another content key); by default every run registers the same release."""
    trained = built["trained"]
    if release is not None:
        key = hashlib.sha256(f"{trained.checkpoint_key}/{release}".encode()).hexdigest()
        trained = dataclasses.replace(trained, checkpoint_key=key)
    return register_candidate.fn(
        built["ds"], trained, built["compiled"], tmp / run_id, flow_run_id=run_id
    )


def test_the_same_release_registers_one_version_whichever_run_registers_it(
    built: dict[str, Any], settings: Settings, tmp_path: Path
) -> None:
    first = _register(built, settings, "run-a", tmp_path)
    again = _register(built, settings, "run-a", tmp_path)  # a retried run
    rerun = _register(built, settings, "run-b", tmp_path)  # a new run of the same release
    reg = Registry(settings.tracking_uri, settings.artifact_root)
    assert again.version == first.version == rerun.version
    assert [v.version for v in reg.list_versions(settings.model_name)] == [first.version]
    info = reg.get_version(settings.model_name, first.version)
    assert ALIAS_CANDIDATE in info.aliases and len(info.tags["ballast.content_key"]) == 64
    approval = reg.get_approval(settings.model_name, first.version)
    assert approval is not None and approval.status == "pending"
    other = _register(built, settings, "run-c", tmp_path, release="retrained")
    assert other.version != first.version


def test_staging_copies_and_signs_the_files_the_compiled_artefact_needs_beside_it(
    built: dict[str, Any], settings: Settings, tmp_path: Path
) -> None:
    # Given an artefact whose loader needs a file beside it (TensorRT: model.engine.json)
    build = tmp_path / "build"
    build.mkdir()
    artefact = Path(shutil.copy2(built["compiled"].path, build))
    companion = build / f"{artefact.name}.json"
    companion.write_text('{"needed": "by the loader"}\n')
    compiled = dataclasses.replace(built["compiled"], path=artefact, companions=(companion,))
    # When it is staged for registration
    out = stage_artifacts(tmp_path / "staged", built["ds"], built["trained"], compiled)
    # Then the companion sits beside the artefact and the signed manifest covers it
    assert (out / companion.name).read_bytes() == companion.read_bytes()
    manifest = verify_manifest(SignedManifest.read(out), settings.signing_key_path, out)
    assert manifest.file(companion.name).sha256 == sha256_file(companion), "companion not signed"
    assert manifest.file(artefact.name).sha256 == compiled.sha256


def test_a_metric_the_hold_out_cannot_define_is_left_out_of_the_manifest(
    built: dict[str, Any], settings: Settings, tmp_path: Path
) -> None:
    # evaluate() gives ROC AUC as NaN when the hold-out holds one class; staging failed on it
    # with an untyped pydantic error.
    trained = built["trained"]
    trained = dataclasses.replace(trained, metrics={**trained.metrics, "roc_auc": float("nan")})
    out = stage_artifacts(tmp_path / "staged", built["ds"], trained, built["compiled"])
    manifest = verify_manifest(SignedManifest.read(out), settings.signing_key_path, out)
    assert "roc_auc" not in manifest.metrics
    assert manifest.metrics["accuracy"] == trained.metrics["accuracy"]


def test_closing_a_candidate_tags_it_and_leaves_the_champion_alone(
    built: dict[str, Any], settings: Settings, tmp_path: Path
) -> None:
    reg = Registry(settings.tracking_uri, settings.artifact_root)
    champ = _register(built, settings, "run-1", tmp_path, release="one")
    reg.promote(settings.model_name, champ.version)
    cand = _register(built, settings, "run-2", tmp_path, release="two")
    close_candidate.fn(
        cand.version, status="rolled_back", verdict="rollback", reason="x", evidence={}
    )
    closed = reg.get_version(settings.model_name, cand.version)
    assert closed.tags[TAG_STATUS] == "rolled_back" and ALIAS_CANDIDATE not in closed.aliases
    assert reg.get_by_alias(settings.model_name, ALIAS_CHAMPION).version == champ.version  # type: ignore[union-attr]


def test_registering_and_closing_move_the_candidate_alias_under_the_serving_lock(
    built: dict[str, Any], settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each look at the aliases and the alias write it decides, under the model's serving lock
    # (a gateway's trial lease cannot land in between).
    held = [False]
    writes: list[tuple[str, str, bool]] = []
    take = Registry.serving_lock

    @contextlib.contextmanager
    def lock(self: Registry, name: str) -> Iterator[None]:
        with take(self, name):
            held[0] = True
            try:
                yield
            finally:
                held[0] = False

    monkeypatch.setattr(Registry, "serving_lock", lock)
    for method in ("set_alias", "delete_alias"):
        original = getattr(Registry, method)

        def recording(self: Registry, *args: Any, _f: Any = original, _m: str = method) -> Any:
            writes.append((_m, args[1], held[0]))
            return _f(self, *args)

        monkeypatch.setattr(Registry, method, recording)
    cand = _register(built, settings, "run-1", tmp_path, release="one")
    close_candidate.fn(
        cand.version, status="rolled_back", verdict="rollback", reason="x", evidence={}
    )
    assert writes == [("set_alias", ALIAS_CANDIDATE, True), ("delete_alias", ALIAS_CANDIDATE, True)]


def test_a_tampered_artefact_is_refused_before_it_can_serve(
    built: dict[str, Any], settings: Settings, tmp_path: Path
) -> None:
    reg = Registry(settings.tracking_uri, settings.artifact_root)
    info = _register(built, settings, "run-t", tmp_path)
    spec = version_spec(reg, settings, info)  # verifies
    assert Path(spec.artifact_path).is_file() and len(spec.sha256) == 64
    artefact = Path(spec.artifact_path)
    backup = artefact.read_bytes()
    artefact.write_bytes(backup[:-1] + bytes([backup[-1] ^ 1]))
    try:
        with pytest.raises(IntegrityError, match="content changed"):
            version_spec(reg, settings, info)
    finally:
        artefact.write_bytes(backup)


@pytest.mark.parametrize("which", ["path", "onnx_path"])
def test_an_artefact_changed_after_compile_is_never_signed_or_registered(
    built: dict[str, Any], settings: Settings, tmp_path: Path, which: str
) -> None:
    # Its compile-time hash (checked for parity, put in the tags) no longer names its bytes.
    build = tmp_path / "build"
    build.mkdir()
    compiled = built["compiled"]
    changed = {
        name: Path(shutil.copy2(getattr(compiled, name), build)) for name in ("path", "onnx_path")
    }
    data = changed[which].read_bytes()
    changed[which].write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size, one bit
    compiled = dataclasses.replace(compiled, **changed)
    with pytest.raises(IntegrityError, match="changed between compile and registration") as info:
        register_candidate.fn(
            built["ds"], built["trained"], compiled, tmp_path / "stage", flow_run_id="run-x"
        )
    assert info.value.stage == "register"
    assert not (tmp_path / "stage" / SIGNED_MANIFEST_NAME).exists(), "nothing signed"
    reg = Registry(settings.tracking_uri, settings.artifact_root)
    assert reg.list_versions(settings.model_name) == [], "nothing registered"


def test_rollback_moves_champion_back_to_previous_without_a_gateway(
    built: dict[str, Any], settings: Settings, tmp_path: Path
) -> None:
    reg = Registry(settings.tracking_uri, settings.artifact_root)
    with pytest.raises(RegistryError, match="no 'previous'"):
        rollback_to_previous.fn()
    v1 = _register(built, settings, "r1", tmp_path, release="one")
    reg.promote(settings.model_name, v1.version)
    v2 = _register(built, settings, "r2", tmp_path, release="two")
    reg.promote(settings.model_name, v2.version)
    assert reg.get_by_alias(settings.model_name, ALIAS_PREVIOUS).version == v1.version  # type: ignore[union-attr]
    assert rollback_to_previous.fn().restored == v1.version
    assert reg.get_by_alias(settings.model_name, ALIAS_CHAMPION).version == v1.version  # type: ignore[union-attr]


def _fail_once(monkeypatch: pytest.MonkeyPatch, owner: object, attr: str) -> None:
    """``owner.attr`` raises once (a transient store or disk error), then works again."""
    real = getattr(owner, attr)
    calls: list[int] = []

    def flaky(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise RegistryError(f"{attr}: transient (database is locked)")
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, attr, flaky)


def _register_entries(s: Settings, version: str) -> list[dict[str, Any]]:
    return [
        e for e in read_audit(s.audit_log) if e["action"] == "register" and e["version"] == version
    ]


@pytest.mark.parametrize(
    ("owner", "attr"),
    [(Registry, "set_approval"), (Registry, "set_alias"), (tasks.registry, "record")],
    ids=["approval", "candidate-alias", "audit"],
)
def test_a_retry_after_a_failure_past_registration_finishes_the_registration(
    built: dict[str, Any],
    settings: Settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    owner: object,
    attr: str,
) -> None:
    monkeypatch.setattr(tasks.registry, "code_identity", lambda: "pinned-code")
    # Given a step after register_version fails once,
    _fail_once(monkeypatch, owner, attr)
    with pytest.raises(RegistryError, match="transient"):
        _register(built, settings, "run-r", tmp_path)
    # when Prefect retries the task (same flow run),
    info = _register(built, settings, "run-r", tmp_path)
    # then the one version is a whole candidate: pending approval, alias, one audit entry.
    reg = Registry(settings.tracking_uri, settings.artifact_root)
    assert [v.version for v in reg.list_versions(settings.model_name)] == [info.version]
    assert ALIAS_CANDIDATE in info.aliases, f"retry returned a version without the alias: {info}"
    approval = reg.get_approval(settings.model_name, info.version)
    assert approval is not None and approval.status == "pending", f"no pending record: {approval}"
    entries = _register_entries(settings, info.version)
    assert len(entries) == 1, f"want one 'register' audit entry, got {entries}"
    assert entries[0]["tags"]["ballast.flow_run_id"] == "run-r", entries
    # And a further retry repeats nothing.
    again = _register(built, settings, "run-r", tmp_path)
    assert reg.get_approval(settings.model_name, again.version) == approval
    assert len(_register_entries(settings, info.version)) == 1, "register audited twice"


def test_two_runs_registering_the_same_release_at_once_keep_one_version(
    built: dict[str, Any], settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Run b looked for the release before run a's version existed (both found nothing), so
    # both registered. Before: two versions of one release, each a candidate in turn.
    monkeypatch.setattr(tasks.registry, "code_identity", lambda: "pinned-code")
    first = _register(built, settings, "run-a", tmp_path)
    real = Registry.find_by_tag
    calls = {"n": 0}

    def blind_before_registering(self: Registry, name: str, key: str, value: str) -> Any:
        calls["n"] += 1
        return [] if calls["n"] <= 2 else real(self, name, key, value)  # the two look-ups

    monkeypatch.setattr(Registry, "find_by_tag", blind_before_registering)
    second = _register(built, settings, "run-b", tmp_path)
    monkeypatch.setattr(Registry, "find_by_tag", real)
    reg = Registry(settings.tracking_uri, settings.artifact_root)
    assert second.version == first.version
    assert [v.version for v in reg.list_versions(settings.model_name)] == [first.version]
    assert ALIAS_CANDIDATE in reg.get_version(settings.model_name, first.version).aliases
    assert len(_register_entries(settings, first.version)) == 1
    dropped = [
        e for e in read_audit(settings.audit_log) if e["action"] == "register_duplicate_dropped"
    ]
    assert len(dropped) == 1 and dropped[0]["kept"] == first.version
    assert int(dropped[0]["version"]) > int(first.version)


def test_a_retry_after_a_failed_discard_still_keeps_the_first_version(
    built: dict[str, Any], settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Review finding: the duplicate's delete failed (a connection reset), Prefect retried the
    # task, and the retry found the duplicate by its own flow-run tag and finished it.
    from mlflow import MlflowClient

    monkeypatch.setattr(tasks.registry, "code_identity", lambda: "pinned-code")
    first = _register(built, settings, "run-a", tmp_path)
    real_find, real_delete = Registry.find_by_tag, MlflowClient.delete_model_version
    calls = {"n": 0}

    def blind_before_registering(self: Registry, name: str, key: str, value: str) -> Any:
        calls["n"] += 1
        return [] if calls["n"] <= 2 else real_find(self, name, key, value)

    def reset(self: MlflowClient, name: str, version: str) -> None:
        raise ConnectionResetError("connection reset by peer")

    monkeypatch.setattr(Registry, "find_by_tag", blind_before_registering)
    monkeypatch.setattr(MlflowClient, "delete_model_version", reset)
    with pytest.raises(RegistryError, match="discarding version"):
        _register(built, settings, "run-b", tmp_path)
    reg = Registry(settings.tracking_uri, settings.artifact_root)
    (dup,) = [v for v in reg.list_versions(settings.model_name) if v.version != first.version]
    assert reg._client.get_run(str(dup.run_id)).info.status != "FAILED", "still listed"
    monkeypatch.setattr(Registry, "find_by_tag", real_find)
    monkeypatch.setattr(MlflowClient, "delete_model_version", real_delete)
    retried = _register(built, settings, "run-b", tmp_path)  # Prefect's retry
    assert retried.version == first.version
    assert [v.version for v in reg.list_versions(settings.model_name)] == [first.version]
    assert ALIAS_CANDIDATE in reg.get_version(settings.model_name, first.version).aliases


def test_reusing_a_decided_version_never_marks_it_candidate_again(
    built: dict[str, Any], settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The content key includes uncommitted edits: pin the code so edits elsewhere in the
    # working tree while this runs cannot turn "the same release" into a new one.
    monkeypatch.setattr(tasks.registry, "code_identity", lambda: "pinned-code")
    reg = Registry(settings.tracking_uri, settings.artifact_root)
    champ = _register(built, settings, "run-1", tmp_path, release="one")
    reg.promote(settings.model_name, champ.version)
    record_promotion.fn(champ.version, {})
    closed = _register(built, settings, "run-2", tmp_path, release="two")
    close_candidate.fn(
        closed.version, status="rejected", verdict="rejected", reason="no", evidence={}
    )
    # Given a champion and a rejected version, when a new run registers the same releases,
    again_champ = _register(built, settings, "run-3", tmp_path, release="one")
    again_closed = _register(built, settings, "run-4", tmp_path, release="two")
    # then each is reused as it stands: no candidate alias, no second register entry.
    assert again_champ.version == champ.version and again_closed.version == closed.version
    assert ALIAS_CHAMPION in again_champ.aliases and ALIAS_CANDIDATE not in again_champ.aliases
    assert ALIAS_CANDIDATE not in again_closed.aliases
    assert reg.get_by_alias(settings.model_name, ALIAS_CANDIDATE) is None
    assert again_closed.tags[TAG_STATUS] == "rejected"
    for version in (champ.version, closed.version):
        assert len(_register_entries(settings, version)) == 1, f"version {version} re-audited"


# -- approval of a version its release registered again --------------------------------------


def _answers(monkeypatch: pytest.MonkeyPatch, *answers: ApprovalForm | None) -> list[str]:
    """Stand-in for ``pause_flow_run`` (needs a running flow): hands out ``answers`` in turn
    (None: the pause times out). Returns the pause keys asked for."""
    keys: list[str] = []
    queue = list(answers)

    def pause(*, wait_for_input: Any, timeout: int, poll_interval: float, key: str) -> Any:
        keys.append(key)
        answer = queue.pop(0)
        if answer is None:
            raise FlowPauseTimeout("no answer")
        return answer

    monkeypatch.setattr(tasks.approval, "pause_flow_run", pause)
    return keys


def _approve(s: Settings, version: str, policy: str) -> tuple[bool, str, str]:
    champion = Registry(s.tracking_uri, s.artifact_root).get_by_alias(s.model_name, ALIAS_CHAMPION)
    return request_approval(
        model=s.model_name,
        version=version,
        checks={"parity": True},
        metrics={"accuracy": 0.97},
        policy=policy,
        compared_champion=None if champion is None else champion.version,
    )


@pytest.fixture
def approvers(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setenv("BALLAST_APPROVERS", '["bob"]')
    monkeypatch.setenv("BALLAST_ACTOR", "carol")  # who started the run
    get_settings.cache_clear()
    return get_settings()


def test_a_rejected_release_run_again_is_never_approved_again(
    built: dict[str, Any], approvers: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = approvers
    # Given a version a person rejected ...
    info = _register(built, s, "run-a", tmp_path)
    _answers(monkeypatch, ApprovalForm(approve=False, approver="bob", reason="not this one"))
    assert _approve(s, info.version, "manual") == (False, "bob", "not this one")
    close_candidate.fn(
        info.version, status="rejected", verdict="rejected", reason="bob", evidence={}
    )

    # ... when the same release runs again (a nightly auto run), it finds that decision ...
    again = _register(built, s, "run-b", tmp_path)
    assert again.version == info.version
    assert prior_decision_of(again) == "its approval was rejected by bob"

    # ... and approving it anyway is refused before anyone is asked, changing nothing.
    with pytest.raises(ApprovalRejected, match="decided before"):
        _approve(s, info.version, "auto")
    record_ = Registry(s.tracking_uri, s.artifact_root).get_approval(s.model_name, info.version)
    assert record_ is not None and (record_.status, record_.by) == ("rejected", "bob")
    assert [e["action"] for e in read_audit(s.audit_log)].count("approve") == 0


def test_a_release_whose_approval_timed_out_may_be_asked_again(
    built: dict[str, Any], approvers: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = approvers
    info = _register(built, s, "run-a", tmp_path)
    _answers(monkeypatch, None)
    assert _approve(s, info.version, "manual") == (False, "timeout", "approval timed out")
    close_candidate.fn(
        info.version, status="rejected", verdict="rejected", reason="timeout", evidence={}
    )

    # Nobody decided: the next run of the same release asks again.
    again = _register(built, s, "run-b", tmp_path)
    assert prior_decision_of(again) is None
    assert _approve(s, info.version, "auto")[:2] == (True, "policy:auto")


def test_an_answer_without_a_reason_is_refused_and_the_run_asks_again(
    built: dict[str, Any], approvers: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = approvers
    info = _register(built, s, "run-a", tmp_path)
    keys = _answers(
        monkeypatch,
        ApprovalForm(approve=True, approver="bob", reason="   "),
        ApprovalForm(approve=True, approver="  bob\n", reason=" looks good "),
    )

    # Recorded trimmed, after one refusal that is audited.
    assert _approve(s, info.version, "manual") == (True, "bob", "looks good")
    assert len(keys) == 2 and keys[0] != keys[1]
    refused = [e for e in read_audit(s.audit_log) if e["action"] == "approval_refused"]
    assert [e["reason"] for e in refused] == ["an answer needs a reason"]


def test_a_failed_registry_write_leaves_the_decision_audited_and_the_status_pending(
    built: dict[str, Any], approvers: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = approvers
    info = _register(built, s, "run-a", tmp_path)

    def unreachable(*args: Any, **kwargs: Any) -> None:
        raise RegistryError("tracking server unreachable")

    monkeypatch.setattr(Registry, "set_tags", unreachable)
    with pytest.raises(RegistryError, match="unreachable"):
        _approve(s, info.version, "auto")

    # The audit log holds the decision and the failed write; the registry no new status.
    actions = [e["action"] for e in read_audit(s.audit_log)]
    assert actions[-2:] == ["approve", "approval_write_failed"]
    monkeypatch.undo()
    record_ = Registry(s.tracking_uri, s.artifact_root).get_approval(s.model_name, info.version)
    assert record_ is not None and record_.status == "pending"


@pytest.mark.parametrize(
    ("tags", "moves"),
    [
        ({"ballast.canary_weight": "25", "ballast.lease_expires_at": "none"}, False),
        ({"ballast.canary_weight": "25"}, False),  # leased in an hour: still on trial
        ({"ballast.canary_weight": "25", "ballast.lease_expires_at": "1.0"}, True),  # ran out
        ({"ballast.canary_weight": "0"}, True),  # its trial ended
    ],
)
def test_a_new_version_leaves_the_candidate_alias_to_a_version_on_trial(
    built: dict[str, Any],
    settings: Settings,
    tmp_path: Path,
    tags: dict[str, str],
    moves: bool,
) -> None:
    # On a registry-backed gateway the canary follows the candidate alias: a registration that
    # moved it would end another run's trial at once.
    reg = Registry(settings.tracking_uri, settings.artifact_root)
    on_trial = _register(built, settings, "run-a", tmp_path)
    if "ballast.lease_expires_at" not in tags and tags["ballast.canary_weight"] != "0":
        tags = {**tags, "ballast.lease_expires_at": repr(time.time() + 3600)}
    reg.set_tags(settings.model_name, on_trial.version, tags)
    newer = _register(built, settings, "run-b", tmp_path, release="retrained")
    named = reg.get_by_alias(settings.model_name, ALIAS_CANDIDATE)
    assert named is not None
    assert named.version == (newer.version if moves else on_trial.version)


def test_holds_trial_reads_the_gateways_tags() -> None:
    from ballast.release import holds_trial

    assert holds_trial({"ballast.canary_weight": "10"}, 0.0)
    assert not holds_trial({}, 0.0)
    assert not holds_trial({"ballast.canary_weight": "10", "ballast.lease_expires_at": "5"}, 6.0)
    assert not holds_trial({"ballast.canary_weight": "ten"}, 0.0)
    assert holds_trial({"ballast.shadow_fraction": "0.5"}, 0.0)  # a shadow phase is a trial
    assert not holds_trial({"ballast.shadow_fraction": "0.0"}, 0.0)


def test_a_new_version_leaves_the_candidate_alias_to_a_canary_named_shadow_too(
    built: dict[str, Any], settings: Settings, tmp_path: Path
) -> None:
    # Between trial_aliases and the shadow phase's first PUT no share is set yet; the shadow
    # alias naming the candidate says the trial has begun.
    reg = Registry(settings.tracking_uri, settings.artifact_root)
    on_trial = _register(built, settings, "run-a", tmp_path)
    reg.set_alias(settings.model_name, "shadow", on_trial.version)
    _register(built, settings, "run-b", tmp_path, release="retrained")
    named = reg.get_by_alias(settings.model_name, ALIAS_CANDIDATE)
    assert named is not None and named.version == on_trial.version
