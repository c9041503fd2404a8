"""Stage 1–2: fetch the encrypted dataset, decrypt it and validate it, in one boundary task.

One task on purpose: plaintext never crosses a task boundary (where Prefect could persist it),
and no task downstream can receive data that did not pass validation.
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from ballast.crypto import provider_from_settings
from ballast.data import ValidatedDataset, bundled_spec
from ballast.ingest import load_validated, storage_from_settings
from ballast.settings import get_settings
from tasks.common import logger, retry_transient


@task(
    name="ingest-dataset",
    retries=2,
    retry_delay_seconds=[1, 5],
    retry_condition_fn=retry_transient,
    cache_policy=NO_CACHE,
)
def ingest_dataset(uri: str) -> ValidatedDataset:
    s = get_settings()
    ds = load_validated(
        uri,
        provider=provider_from_settings(s),
        spec=bundled_spec(s.dataset_name),
        storage=storage_from_settings(uri, s),
    )
    logger().info(
        "stage=validate dataset=%s rows=%d sha256=%s checks=%d",
        ds.name,
        ds.n_rows,
        ds.sha256[:12],
        len(ds.checks),
    )
    return ds
