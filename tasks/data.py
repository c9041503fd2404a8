"""Stage 1–2: fetch the encrypted dataset, decrypt it and validate it, in one boundary task.

One task on purpose: plaintext never crosses a task boundary (where Prefect could persist it),
and no task downstream can receive data that did not pass validation. The validation report,
pass or fail, is published as a Prefect markdown artifact whose id travels with the dataset for
lineage; failing data is quarantined (``ballast.ingest``) and the task raises ValidationFailed.
"""

from __future__ import annotations

import dataclasses
import re

from prefect import task
from prefect.cache_policies import NO_CACHE

from ballast.crypto import provider_from_settings
from ballast.data import ValidatedDataset, bundled_spec
from ballast.ingest import load_validated, quarantine_path, storage_from_settings
from ballast.settings import get_settings
from ballast.validation import ExpectationsFailed, ValidationReport
from tasks.common import logger, retry_transient


def artifact_key(dataset: str) -> str:
    """``validation-<dataset>``; Prefect keys allow only lowercase letters, digits and dashes."""
    slug = re.sub(r"[^a-z0-9]+", "-", dataset.lower()).strip("-") or "dataset"
    return f"validation-{slug}"


def publish_report(report: ValidationReport, uri: str) -> str:
    """Publish the report as a markdown artifact; returns its id."""
    from prefect.artifacts import create_markdown_artifact

    verdict = "passed" if report.success else f"FAILED {len(report.failed)} expectations"
    artifact_id = create_markdown_artifact(
        markdown=report.to_markdown(),
        key=artifact_key(report.dataset),
        description=f"{report.dataset} from {uri}: {verdict}",
    )
    return str(artifact_id)


@task(
    name="ingest-dataset",
    retries=2,
    retry_delay_seconds=[1, 5],
    retry_condition_fn=retry_transient,
    cache_policy=NO_CACHE,
)
def ingest_dataset(uri: str) -> ValidatedDataset:
    s = get_settings()
    try:
        ds = load_validated(
            uri,
            provider=provider_from_settings(s),
            spec=bundled_spec(s.dataset_name),
            storage=storage_from_settings(uri, s),
            quarantine=quarantine_path(s),
        )
    except ExpectationsFailed as exc:
        try:
            artifact_id = publish_report(exc.report, uri)
        except Exception as publish_error:  # the typed validation error must win
            logger().warning("stage=validate could not publish the report: %s", publish_error)
            artifact_id = None
        logger().error(
            "stage=validate dataset=%s verdict=failed failed=%d artifact=%s quarantine=%s",
            exc.report.dataset,
            len(exc.report.failed),
            artifact_id,
            quarantine_path(s),
        )
        raise
    if ds.report is None:  # load_validated always attaches one; never publish without it
        raise RuntimeError("validated dataset carries no report")
    ds = dataclasses.replace(ds, validation_artifact_id=publish_report(ds.report, uri))
    logger().info(
        "stage=validate dataset=%s rows=%d sha256=%s ciphertext_sha256=%s checks=%d artifact=%s",
        ds.name,
        ds.n_rows,
        ds.sha256[:12],
        (ds.ciphertext_sha256 or "")[:12],
        len(ds.checks),
        ds.validation_artifact_id,
    )
    return ds
