"""One-click rollback: champion goes back to the version aliased `previous`, and the gateway follows."""

from __future__ import annotations

from prefect import flow
from prefect.runtime import flow_run

from ballast.settings import get_settings
from tasks.report import publish_decision
from tasks.rollback import rollback_to_previous


def _run_name() -> str:
    """The model rolled back: the parameter, else the configured one (not "rollback-None")."""
    return f"rollback-{flow_run.parameters.get('model_name') or get_settings().model_name}"


@flow(name="rollback", flow_run_name=_run_name)
def rollback_flow(model_name: str | None = None, force: bool = False) -> str:
    """``force``: roll back even while a canary or shadow trial is in force (that release is
    abandoned: its controller stops when it sees the change)."""
    name = model_name or get_settings().model_name
    done = rollback_to_previous(name, force=force)
    publish_decision(
        model=name,
        version=done.replaced or "?",
        outcome="rolled_back",
        reasons=[f"manual rollback to version {done.restored}"],
        champion=done.restored,
        steps=[],
        evidence={"restored": done.restored, "replaced": done.replaced},
    )
    return done.restored
