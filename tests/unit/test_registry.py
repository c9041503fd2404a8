"""The registry facade against a real MLflow sqlite store in a temporary folder (no mocks).

One store per module (creating the schema takes about 1.5 s); each test works on its own model
name, so tests stay independent.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient
from mlflow.entities import Run

import model_registry
from ballast.errors import IntegrityError, RegistryError
from ballast.manifest import SignedManifest, build_manifest, sign_manifest, verify_manifest
from model_registry import Registry, model_uri
from model_registry.registry import RUN_VERSION_TAG

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mlflow")


@pytest.fixture(scope="module")
def registry(store: Path) -> Registry:
    return Registry(f"sqlite:///{store / 'db' / 'mlflow.db'}", store / "artifacts")


@pytest.fixture
def client(registry: Registry) -> MlflowClient:
    # Only to inspect the store's state from the outside.
    return MlflowClient(tracking_uri=registry.tracking_uri, registry_uri=registry.tracking_uri)


@pytest.fixture
def name(request: pytest.FixtureRequest) -> str:
    return request.node.name.replace("_", "-")[:60]


def make_artifacts(root: Path, tag: str, key_path: Path | None = None) -> Path:
    d = root / f"artefacts-{tag}"
    d.mkdir(parents=True)
    (d / "model.ort.onnx").write_bytes(f"onnx {tag}".encode() * 50)
    (d / "state_dict.pt").write_bytes(f"weights {tag}".encode())
    if key_path is not None:
        manifest = build_manifest(
            d, model_name="m", dataset_sha256="cd" * 32, backend="onnxruntime", precision="fp32"
        )
        sign_manifest(manifest, key_path).write(d)
    return d


def register(
    registry: Registry, name: str, d: Path, **tags: str
) -> model_registry.ModelVersionInfo:
    return registry.register_version(
        name,
        artifact_dir=d,
        params={"hidden": 64, "lr": 0.003},
        metrics={"accuracy": 0.97},
        tags={"ballast.dataset": d.name, **tags},
    )


def runs_of(client: MlflowClient, registry: Registry, name: str) -> list[Run]:
    return client.search_runs(
        [registry.experiment_id], filter_string=f"tags.`ballast.model_name` = '{name}'"
    )


@pytest.fixture
def two_versions(registry: Registry, name: str, tmp_path: Path) -> str:
    register(registry, name, make_artifacts(tmp_path, "a"))
    register(registry, name, make_artifacts(tmp_path, "b"))
    return name


# --- the facade's surface --------------------------------------------------------------------


def test_public_surface_is_exactly_all() -> None:
    assert set(model_registry.__all__) == {
        "CANDIDATE",
        "CHAMPION",
        "PREVIOUS",
        "ApprovalRecord",
        "ApprovalStatus",
        "ModelVersionInfo",
        "PromotionResult",
        "Registry",
        "model_uri",
        "save_onnx_as_mlflow_model",
        "serving_lock_name",
    }
    public = {n for n in dir(model_registry) if not n.startswith("_")}
    assert public - {"registry", "types", "serving_peer", "write_lock"} == set(
        model_registry.__all__
    )


def test_importing_the_package_does_not_import_mlflow() -> None:
    code = "import sys, model_registry; assert 'mlflow' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_only_model_registry_imports_mlflow() -> None:
    offenders = []
    for pkg in ("ballast", "tasks", "flows", "infra", "benchmarks"):
        for path in (REPO / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module]
                if any(n == "mlflow" or n.startswith("mlflow.") for n in names):
                    offenders.append(str(path.relative_to(REPO)))
    assert offenders == [], f"only model_registry/ may import mlflow: {offenders}"


def test_model_uri_names_the_alias() -> None:
    assert model_uri("breast-cancer-mlp", "champion") == "models:/breast-cancer-mlp@champion"
    assert model_uri("m") == "models:/m@champion"


def test_registry_leaves_mlflows_global_tracking_uri_alone(store: Path) -> None:
    import mlflow

    before = mlflow.get_tracking_uri()
    Registry(f"sqlite:///{store / 'db' / 'mlflow.db'}", store / "artifacts")
    assert mlflow.get_tracking_uri() == before


# --- registering -------------------------------------------------------------------------------


def test_two_registrations_make_versions_1_and_2_with_runs_and_tags(
    registry: Registry, client: MlflowClient, name: str, tmp_path: Path, store: Path
) -> None:
    v1 = register(registry, name, make_artifacts(tmp_path, "a"))
    v2 = register(registry, name, make_artifacts(tmp_path, "b"), stage="candidate")

    assert (v1.version, v2.version) == ("1", "2")
    assert v2.tags == {"ballast.dataset": "artefacts-b", "stage": "candidate"}
    assert v2.aliases == () and v2.created_ms >= v1.created_ms
    assert v2.source.startswith((store / "artifacts").as_uri()), "artefacts under artifact_root"
    run = client.get_run(v2.run_id or "")
    assert run.info.status == "FINISHED"
    assert run.data.params == {"hidden": "64", "lr": "0.003"}
    assert run.data.metrics == {"accuracy": 0.97}
    assert run.data.tags[RUN_VERSION_TAG] == "2"
    assert [v.version for v in registry.list_versions(name)] == ["1", "2"]
    assert registry.get_version(name, 2) == v2


def test_per_epoch_series_are_logged_with_steps_beside_the_final_metrics(
    registry: Registry, client: MlflowClient, name: str, tmp_path: Path
) -> None:
    series = {"epoch_val_loss": [(1, 0.5), (2, 0.3), (3, 0.35)], "epoch_train_loss": [(1, 0.9)]}
    info = registry.register_version(
        name,
        artifact_dir=make_artifacts(tmp_path, "h"),
        params={"epochs": 3},
        metrics={"accuracy": 0.96, "val_loss": 0.3},
        tags={},
        metric_history=series,
    )
    points = client.get_metric_history(info.run_id or "", "epoch_val_loss")
    assert sorted((p.step, p.value) for p in points) == [(1, 0.5), (2, 0.3), (3, 0.35)]
    assert registry.metric_history(name, info.version, "epoch_val_loss") == series["epoch_val_loss"]
    assert registry.version_metrics(name, info.version) == {
        "accuracy": 0.96,
        "val_loss": 0.3,
        "epoch_val_loss": 0.35,  # a series reports its value at the highest step
        "epoch_train_loss": 0.9,
    }
    assert registry.metric_history(name, info.version, "missing") == []


def test_reading_metrics_of_an_unknown_version_is_a_registry_error(
    registry: Registry, two_versions: str
) -> None:
    with pytest.raises(RegistryError):
        registry.version_metrics(two_versions, 99)


def test_registering_a_version_takes_under_five_seconds(
    registry: Registry, name: str, tmp_path: Path
) -> None:
    register(registry, name, make_artifacts(tmp_path, "warm"))
    start = time.perf_counter()
    register(registry, name, make_artifacts(tmp_path, "timed"))
    assert time.perf_counter() - start < 5  # ~0.07 s here; MLflow model flavours take seconds


def test_missing_or_empty_artefact_folder_is_refused_before_any_run(
    registry: Registry, client: MlflowClient, name: str, tmp_path: Path
) -> None:
    (tmp_path / "empty").mkdir()
    for d in (tmp_path / "nope", tmp_path / "empty"):
        with pytest.raises(RegistryError, match="missing or empty"):
            register(registry, name, d)
    assert runs_of(client, registry, name) == []


def test_failed_first_registration_leaves_no_model_and_a_failed_run(
    registry: Registry, client: MlflowClient, name: str, tmp_path: Path
) -> None:
    # A tag key MLflow refuses: the failure comes after the run and its artefacts exist.
    with pytest.raises(RegistryError, match="while creating the model version"):
        register(registry, name, make_artifacts(tmp_path, "a"), **{"bad key!": "x"})

    assert registry.list_versions(name) == []
    assert client.search_registered_models(f"name='{name}'") == [], "model created by the call"
    (run,) = runs_of(client, registry, name)
    assert run.info.status == "FAILED"


def test_failed_registration_of_an_existing_model_keeps_what_was_there(
    registry: Registry, client: MlflowClient, two_versions: str, tmp_path: Path
) -> None:
    name = two_versions
    registry.set_alias(name, "champion", 1)
    with pytest.raises(RegistryError):
        register(registry, name, make_artifacts(tmp_path, "c"), **{"bad key!": "x"})

    assert [v.version for v in registry.list_versions(name)] == ["1", "2"]
    assert registry.get_by_alias(name, "champion") is not None
    statuses = sorted(r.info.status for r in runs_of(client, registry, name))
    assert statuses == ["FAILED", "FINISHED", "FINISHED"]


def test_failure_after_the_version_exists_deletes_that_version(
    registry: Registry,
    client: MlflowClient,
    name: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Forced: the store refuses to finish the run (as a lost connection would).
    real = registry._client.set_terminated

    def refuse_finish(run_id: str, status: str | None = None, end_time: int | None = None) -> None:
        if status == "FINISHED":
            raise ConnectionError("store went away")
        real(run_id, status, end_time)

    monkeypatch.setattr(registry._client, "set_terminated", refuse_finish)
    with pytest.raises(RegistryError, match="while finishing the run: store went away"):
        register(registry, name, make_artifacts(tmp_path, "a"))

    assert registry.list_versions(name) == []
    assert client.search_registered_models(f"name='{name}'") == []
    (run,) = runs_of(client, registry, name)
    assert run.info.status == "FAILED"


def test_a_stop_signal_after_the_version_exists_undoes_it_and_goes_on(
    registry: Registry,
    client: MlflowClient,
    name: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # SIGTERM reaches a Prefect task as TerminationSignal, a BaseException: no Exception handler
    # sees it, and the version stood with its run RUNNING, reused by a rerun.
    import signal

    from prefect.exceptions import TerminationSignal

    def stopped(*args: Any, **kwargs: Any) -> None:
        raise TerminationSignal(signal.SIGTERM)

    monkeypatch.setattr(registry._client, "set_tag", stopped)  # right after the version exists
    with pytest.raises(TerminationSignal):  # the stop goes on, not turned into an error
        register(registry, name, make_artifacts(tmp_path, "a"))
    assert registry.list_versions(name) == []
    assert client.search_registered_models(f"name='{name}'") == []
    (run,) = runs_of(client, registry, name)
    assert run.info.status == "FAILED"


def test_a_version_saved_by_a_create_call_that_then_failed_is_deleted_too(
    registry: Registry,
    client: MlflowClient,
    name: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The store saved the version, then the answer was lost (a 504, a read timeout): the
    # facade never learnt its number. Before, it stayed, complete with its tags, and a rerun
    # reused it as if it had been registered.
    real = registry._client.create_model_version

    def saved_then_lost(*args: Any, **kwargs: Any) -> Any:
        real(*args, **kwargs)
        raise ConnectionError("504 Gateway Timeout")

    monkeypatch.setattr(registry._client, "create_model_version", saved_then_lost)
    with pytest.raises(RegistryError, match="while creating the model version: 504"):
        register(registry, name, make_artifacts(tmp_path, "a"))
    assert registry.list_versions(name) == []


def test_discard_version_deletes_it_and_fails_its_run_but_never_one_with_an_alias(
    registry: Registry, client: MlflowClient, two_versions: str
) -> None:
    name = two_versions
    second = registry.get_version(name, "2")
    registry.set_alias(name, "candidate", "1")
    with pytest.raises(RegistryError, match="holds"):
        registry.discard_version(name, registry.get_version(name, "1"))
    registry.discard_version(name, second)
    assert [v.version for v in registry.list_versions(name)] == ["1"]
    assert client.get_run(str(second.run_id)).info.status == "FAILED"


def test_find_by_tag_finds_the_version_with_that_value(
    registry: Registry, two_versions: str
) -> None:
    (found,) = registry.find_by_tag(two_versions, "ballast.dataset", "artefacts-b")
    assert found.version == "2"
    assert registry.find_by_tag(two_versions, "ballast.dataset", "other") == []
    assert registry.find_by_tag("no-such-model", "ballast.dataset", "artefacts-b") == []


def test_set_tags_adds_and_overwrites_version_tags(registry: Registry, two_versions: str) -> None:
    registry.set_tags(two_versions, 1, {"approved_by": "alice", "ballast.dataset": "renamed"})
    tags = registry.get_version(two_versions, 1).tags
    assert tags == {"approved_by": "alice", "ballast.dataset": "renamed"}


def test_unknown_version_is_a_registry_error(registry: Registry, two_versions: str) -> None:
    with pytest.raises(RegistryError, match="not found"):
        registry.get_version(two_versions, 99)


# --- download ----------------------------------------------------------------------------------


def test_downloaded_files_verify_against_the_signed_manifest(
    registry: Registry, name: str, tmp_path: Path
) -> None:
    key = tmp_path / "keys" / "signing.pem"
    info = register(registry, name, make_artifacts(tmp_path, "a", key_path=key))

    in_store = registry.download(name, info.version)
    copied = registry.download(name, info.version, tmp_path / "dl")
    assert copied == tmp_path / "dl" / "model"
    for folder in (in_store, copied):
        manifest = verify_manifest(SignedManifest.read(folder), key, folder)
        assert {f.path for f in manifest.files} == {"model.ort.onnx", "state_dict.pt"}

    (copied / "state_dict.pt").write_bytes(b"tampered")
    with pytest.raises(IntegrityError, match=r"state_dict\.pt"):
        verify_manifest(SignedManifest.read(copied), key, copied)


def test_download_of_a_version_whose_files_vanished_is_a_registry_error(
    registry: Registry, name: str, tmp_path: Path
) -> None:
    info = register(registry, name, make_artifacts(tmp_path, "a"))
    shutil.rmtree(registry.download(name, info.version))
    with pytest.raises(RegistryError, match="artefacts missing"):
        registry.download(name, info.version)


# --- aliases, promotion, rollback --------------------------------------------------------------


def test_aliases_set_read_list_and_delete(registry: Registry, two_versions: str) -> None:
    name = two_versions
    assert registry.get_by_alias(name, "champion") is None
    assert registry.get_by_alias("no-such-model", "champion") is None
    registry.set_alias(name, "champion", 1)
    registry.set_alias(name, "candidate", "2")

    champion = registry.get_by_alias(name, "champion")
    assert champion is not None and champion.version == "1" and champion.aliases == ("champion",)
    assert [v.aliases for v in registry.list_versions(name)] == [("champion",), ("candidate",)]

    registry.delete_alias(name, "candidate")
    registry.delete_alias(name, "candidate")  # idempotent
    assert registry.get_by_alias(name, "candidate") is None


def test_promote_moves_champion_keeps_previous_and_clears_candidate(
    registry: Registry, two_versions: str
) -> None:
    name = two_versions
    first = registry.promote(name, 1)
    assert (first.previous_champion, first.changed) == (None, True)

    registry.set_alias(name, "candidate", 2)
    result = registry.promote(name, 2)
    assert (result.version, result.previous_champion, result.candidate_cleared) == ("2", "1", True)
    assert registry.get_by_alias(name, "champion").version == "2"  # type: ignore[union-attr]
    assert registry.get_by_alias(name, "previous").version == "1"  # type: ignore[union-attr]
    assert registry.get_by_alias(name, "candidate") is None


def test_promoting_the_champion_again_changes_nothing(
    registry: Registry, two_versions: str
) -> None:
    registry.promote(two_versions, 1)
    registry.promote(two_versions, 2)
    again = registry.promote(two_versions, 2)
    assert not again.changed
    assert registry.get_by_alias(two_versions, "previous").version == "1"  # type: ignore[union-attr]


def test_failed_promotion_restores_every_alias(
    registry: Registry, two_versions: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = two_versions
    registry.promote(name, 1)
    registry.set_alias(name, "candidate", 2)
    before = _aliases(registry, name)  # champion 1, candidate 2

    # Promoting 2 moves champion to 2 first; the next write (previous -> 1) fails part-way.
    real = registry._client.set_registered_model_alias

    def cut_off(model: str, alias: str, version: str) -> None:
        if alias == "previous":
            raise ConnectionError("connection reset")
        real(model, alias, version)

    monkeypatch.setattr(registry._client, "set_registered_model_alias", cut_off)
    with pytest.raises(RegistryError, match="aliases restored"):
        registry.promote(name, 2)
    monkeypatch.undo()
    assert _aliases(registry, name) == before, "champion back on 1, candidate still on 2"

    # A version that does not exist fails on the first write: nothing moved.
    with pytest.raises(RegistryError, match="aliases restored"):
        registry.promote(name, 99)
    assert _aliases(registry, name) == before


def test_promoting_in_an_unknown_model_is_a_registry_error(registry: Registry) -> None:
    with pytest.raises(RegistryError, match="not found"):
        registry.promote("no-such-model", 1)
    with pytest.raises(RegistryError, match="not found"):
        registry.rollback_to_previous("no-such-model")


def test_rollback_returns_to_previous_once(registry: Registry, two_versions: str) -> None:
    name = two_versions
    registry.promote(name, 1)
    registry.promote(name, 2)

    result = registry.rollback_to_previous(name)
    assert (result.version, result.previous_champion) == ("1", "2")
    assert registry.get_by_alias(name, "champion").version == "1"  # type: ignore[union-attr]
    assert registry.get_by_alias(name, "previous") is None

    with pytest.raises(RegistryError, match="no previous version to roll back to"):
        registry.rollback_to_previous(name)
    assert registry.get_by_alias(name, "champion").version == "1"  # type: ignore[union-attr]


def test_a_rollback_decided_on_aliases_that_moved_since_moves_nothing(
    registry: Registry, two_versions: str
) -> None:
    name = two_versions
    registry.promote(name, 1)
    registry.promote(name, 2)  # champion 2, previous 1: what the caller saw and verified
    seen = {"champion": "2", "previous": "1"}
    registry.promote(name, 1)  # someone else meanwhile: champion 1, previous 2

    with pytest.raises(RegistryError, match="as when the rollback was decided; nothing moved"):
        registry.rollback_to_previous(name, expect=seen)
    assert _aliases(registry, name) == {"champion": "1", "previous": "2"}

    result = registry.rollback_to_previous(name, expect={"champion": "1", "previous": "2"})
    assert result.version == "2" and _aliases(registry, name) == {"champion": "2"}


def _aliases(registry: Registry, name: str) -> dict[str, str]:
    return {alias: v.version for v in registry.list_versions(name) for alias in v.aliases}


def test_undo_puts_back_a_promotion_and_a_rollback_exactly(
    registry: Registry, two_versions: str
) -> None:
    name = two_versions
    registry.promote(name, 1)
    registry.set_alias(name, "candidate", 2)
    before = _aliases(registry, name)
    promoted = registry.promote(name, 2)  # champion 2, previous 1, candidate cleared
    registry.undo(promoted)
    assert _aliases(registry, name) == before == {"champion": "1", "candidate": "2"}

    registry.promote(name, 2)
    before = _aliases(registry, name)
    back = registry.rollback_to_previous(name)
    registry.undo(back)
    assert _aliases(registry, name) == before == {"champion": "2", "previous": "1"}


def test_undo_refuses_when_the_aliases_moved_again_since(
    registry: Registry, two_versions: str
) -> None:
    name = two_versions
    registry.promote(name, 1)
    promoted = registry.promote(name, 2)
    registry.rollback_to_previous(name)  # someone else's move after ours
    after = _aliases(registry, name)
    with pytest.raises(RegistryError, match="not undoing"):
        registry.undo(promoted)
    assert _aliases(registry, name) == after == {"champion": "1"}


def test_undo_of_a_promotion_leaves_a_candidate_set_since_and_restores_the_rest(
    registry: Registry, two_versions: str, tmp_path: Path
) -> None:
    name = two_versions
    registry.promote(name, 1)
    registry.set_alias(name, "candidate", 2)
    promoted = registry.promote(name, 2)  # champion 2, previous 1, candidate cleared
    # The next release registers meanwhile and takes the candidate alias; then the promotion's
    # gateway switch fails. Before: the undo was refused, leaving champion on a version the
    # gateway does not serve.
    third = register(registry, name, make_artifacts(tmp_path, "c"))
    registry.set_alias(name, "candidate", third.version)
    registry.undo(promoted)
    assert _aliases(registry, name) == {"champion": "1", "candidate": third.version}


# --- approval status and content keys --------------------------------------------------------


def test_approval_record_round_trips_and_refuses_unknown_statuses(
    registry: Registry, two_versions: str
) -> None:
    from datetime import UTC, datetime

    from model_registry import ApprovalRecord

    name = two_versions
    assert registry.get_approval(name, "1") is None  # registered outside the release flow
    pending = ApprovalRecord("pending", "", datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC), "waiting")
    registry.set_approval(name, "1", pending)
    assert registry.get_approval(name, "1") == pending
    decided = ApprovalRecord("approved", "alice", datetime(2026, 1, 2, 4, tzinfo=UTC), "ok")
    registry.set_approval(name, "1", decided)
    assert registry.get_approval(name, "1") == decided
    assert registry.get_approval(name, "2") is None, "one version's record is its own"
    with pytest.raises(ValueError, match="approval status"):
        ApprovalRecord("maybe", "x", datetime.now(UTC), "r")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timezone"):
        ApprovalRecord("approved", "x", datetime(2026, 1, 1), "r")
    # A status written by an older release ("timeout") reads as the rejection it was.
    registry.set_tags(name, "2", {"ballast.approval": "timeout"})
    old = registry.get_approval(name, "2")
    assert old is not None and old.status == "rejected"


def test_content_key_changes_with_each_input_and_only_with_them() -> None:
    from ballast.release import content_key

    base = {
        "training_key": "t" * 64,
        "code": "abc123",
        "backend": "onnxruntime",
        "precision": "fp32",
        "fault": None,
    }
    key = content_key(**base)  # type: ignore[arg-type]
    assert key == content_key(**base) and len(key) == 64  # type: ignore[arg-type]
    for field, other in (
        ("training_key", "u" * 64),
        ("code", "abc124"),
        ("backend", "tensorrt"),
        ("precision", "fp16"),
        ("fault", "errors"),
    ):
        assert content_key(**{**base, field: other}) != key, field  # type: ignore[arg-type]


def _fail_once_on(registry: Registry, monkeypatch: pytest.MonkeyPatch, failing_key: str) -> None:
    """The store refuses one write of tag ``failing_key`` (a transient error), then recovers."""
    from mlflow.exceptions import MlflowException

    real = registry._client.set_model_version_tag
    failed: list[str] = []

    def flaky(name: str, version: str, key: str, value: str) -> None:
        if key == failing_key and not failed:
            failed.append(key)
            raise MlflowException("transient: connection reset")
        real(name, version, key, value)

    monkeypatch.setattr(registry._client, "set_model_version_tag", flaky)


def test_a_failed_approval_write_never_leaves_a_new_status_with_old_evidence(
    registry: Registry, two_versions: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from datetime import UTC, datetime

    from model_registry import ApprovalRecord

    name = two_versions
    pending = ApprovalRecord("pending", "", datetime(2026, 1, 2, 3, tzinfo=UTC), "awaiting")
    registry.set_approval(name, "1", pending)
    # Given the store fails while writing who approved, when recording an approval,
    _fail_once_on(registry, monkeypatch, "ballast.approval.by")
    approved = ApprovalRecord("approved", "bob", datetime(2026, 1, 2, 4, tzinfo=UTC), "looks good")
    with pytest.raises(RegistryError) as raised:
        registry.set_approval(name, "1", approved)
    # then the version still carries the whole previous record, not 'approved' by nobody.
    assert registry.get_approval(name, "1") == pending, "a half-written approval was left behind"
    assert "record restored: transient" in str(raised.value)
    registry.set_approval(name, "1", approved)  # a retry writes the whole new record
    assert registry.get_approval(name, "1") == approved


def test_a_failed_first_approval_write_leaves_no_partial_record(
    registry: Registry, two_versions: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from datetime import UTC, datetime

    from model_registry import ApprovalRecord

    name = two_versions
    _fail_once_on(registry, monkeypatch, "ballast.approval")  # the status, written last
    with pytest.raises(RegistryError) as raised:
        registry.set_approval(name, "2", ApprovalRecord("pending", "", datetime.now(UTC), "w"))
    tags = registry.get_version(name, "2").tags
    assert registry.get_approval(name, "2") is None
    assert not [k for k in tags if k.startswith("ballast.approval")], f"evidence left: {tags}"
    assert "record restored" in str(raised.value)


def test_a_logged_registry_error_shows_no_password_anywhere_in_its_chain(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prefect logs a failed task with its traceback, causes included: MLflow's own exception,
    # chained as the cause, quoted the tracking URI with its password.
    import socket
    import traceback

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    secret = "".join(["s3cret", "PW"])  # not in any source line a traceback quotes
    uri = f"http://alice:{secret}@127.0.0.1:{port}/"
    with pytest.raises(RegistryError) as info:
        Registry(uri, tmp_path / "artifacts")
    logged = "".join(traceback.format_exception(info.value))
    assert "MlflowException" in logged, logged  # what failed is still said, and where
    assert "http://***@127.0.0.1" in logged
    assert secret not in logged, logged
