"""The ingest task under a real Prefect API: the validation report becomes a markdown artifact
(pass or fail) whose id travels with the dataset; failing data is quarantined; plaintext stays
inside the task."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from prefect import flow

from ballast.crypto import LocalKeyring, encrypt_stream
from ballast.data import ValidatedDataset, bundled_csv_bytes, bundled_frame
from ballast.errors import DecryptionError, ValidationFailed
from ballast.ingest import dataset_identity, quarantine_path
from ballast.quarantine import read_records
from ballast.settings import Settings
from tasks.common import not_retryable
from tasks.data import artifact_key, ingest_dataset

pytestmark = pytest.mark.flow


@pytest.fixture(scope="module")
def prefect_api() -> Iterator[None]:
    """One temporary Prefect server for this module (about 15 s to start)."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    with (
        prefect_test_harness(server_startup_timeout=120),
        temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}),
    ):
        yield


def _artifacts(key: str) -> list[Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        return client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]))
        )


def _artifact(artifact_id: str) -> Any:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterId

    with get_client(sync_client=True) as client:
        (found,) = client.read_artifacts(
            artifact_filter=ArtifactFilter(id=ArtifactFilterId(any_=[UUID(artifact_id)]))
        )
    return found


def _encrypted(s: Settings, plaintext: bytes, name: str) -> Path:
    path = s.state_dir / "datasets" / f"{name}.csv.enc"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        encrypt_stream(
            io.BytesIO(plaintext),
            fh,
            LocalKeyring(s.keyring_path, auto_create=True),
            dataset_identity(s.dataset_name),
        )
    return path


def _table_rows(markdown: str) -> list[str]:
    return [line for line in markdown.splitlines() if line.startswith("| ") and line[2].isdigit()]


def test_artifact_key_is_a_valid_prefect_key() -> None:
    assert artifact_key("breast-cancer") == "validation-breast-cancer"
    assert artifact_key("Iris v2 (2026)") == "validation-iris-v2-2026"
    assert artifact_key("__") == "validation-dataset"


def test_valid_dataset_in_a_flow_publishes_its_report_linked_to_the_task_run(
    prefect_api: None, settings: Settings
) -> None:
    path = _encrypted(settings, bundled_csv_bytes(), "good")

    @flow(name="ingest-only")
    def ingest_only(uri: str) -> ValidatedDataset:
        return ingest_dataset(uri)

    ds = ingest_only(str(path))

    assert ds.validation_artifact_id is not None
    art = _artifact(ds.validation_artifact_id)
    assert art.key == "validation-breast-cancer" and art.type == "markdown"
    assert art.task_run_id is not None, "the report belongs to the ingest task run"
    assert ds.ciphertext_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert ds.report is not None
    assert "**PASSED**" in art.data and ds.sha256 in art.data and ds.ciphertext_sha256 in art.data
    assert len(_table_rows(art.data)) == len(ds.report.results) == len(ds.checks)
    assert not quarantine_path(settings).exists()


def _failing_dataset(settings: Settings, name: str) -> Path:
    """The bundled data with 41 rows of mean_radius out of range, encrypted as ``name``."""
    frame = bundled_frame()
    frame.loc[0:40, "mean_radius"] = -5.0
    buf = io.StringIO()
    frame.to_csv(buf, index=False)
    return _encrypted(settings, buf.getvalue().encode(), name)


def test_failing_dataset_publishes_the_failed_report_quarantines_and_raises(
    prefect_api: None, settings: Settings
) -> None:
    path = _failing_dataset(settings, "bad")
    before = {a.id for a in _artifacts("validation-breast-cancer")}

    with pytest.raises(ValidationFailed, match=r"^\[validate\] .*mean_radius"):
        ingest_dataset.fn(str(path))

    (art,) = [a for a in _artifacts("validation-breast-cancer") if a.id not in before]
    assert "**FAILED**" in art.data
    assert "`expect_column_values_to_be_between(mean_radius)`: 41 outside" in art.data
    assert len(_table_rows(art.data)) > 90, "every expectation is listed, not only failures"
    (record,) = read_records(quarantine_path(settings))
    assert record["uri"] == str(path)
    assert record["ciphertext_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert record["ciphertext_sha256"] in art.data, (
        "the artifact and the record name the same bytes"
    )


def test_an_unwritable_quarantine_log_still_publishes_the_report_and_raises_the_typed_error(
    prefect_api: None, settings: Settings
) -> None:
    # Given failing data and a symlink where the quarantine log belongs.
    path = _failing_dataset(settings, "bad-log")
    quarantine = quarantine_path(settings)
    quarantine.parent.mkdir(parents=True, exist_ok=True)
    quarantine.symlink_to(settings.state_dir / "elsewhere.jsonl")
    before = {a.id for a in _artifacts("validation-breast-cancer")}

    with pytest.raises(ValidationFailed, match=r"^\[validate\] .*mean_radius") as info:
        ingest_dataset.fn(str(path))

    assert not_retryable(info.value), "bad input is not retried"
    assert any("quarantine record was not written" in n for n in info.value.__notes__)
    (art,) = [a for a in _artifacts("validation-breast-cancer") if a.id not in before]
    assert "**FAILED**" in art.data, "the report is published although the log could not be"
    assert not (settings.state_dir / "elsewhere.jsonl").exists()


def test_undecryptable_dataset_publishes_nothing_and_quarantines_nothing(
    prefect_api: None, settings: Settings
) -> None:
    path = _encrypted(settings, bundled_csv_bytes(), "tampered")
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10
    path.write_bytes(bytes(data))
    before = len(_artifacts("validation-breast-cancer"))

    with pytest.raises(DecryptionError, match=r"^\[decrypt\] segment 0 failed authentication"):
        ingest_dataset.fn(str(path))

    assert len(_artifacts("validation-breast-cancer")) == before
    assert not quarantine_path(settings).exists()
