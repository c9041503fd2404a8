"""One-click rollback: champion goes back to the version aliased `previous`, and the gateway follows."""

from __future__ import annotations

from prefect import flow

from tasks.rollback import rollback_to_previous


@flow(name="rollback", flow_run_name="rollback-{model_name}")
def rollback_flow(model_name: str | None = None) -> str:
    return rollback_to_previous(model_name)
