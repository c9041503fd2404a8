"""Rollback to the previous champion: registry aliases and gateway move together.

With the gateway down, the rollback still happens in the registry and is written to the
gateway's desired-state file (when the gateway uses one), so a gateway started later serves the
restored champion, not the version rolled away from.
"""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from ballast.audit import record
from ballast.errors import RegistryError
from ballast.gateway_client import GatewayClient
from ballast.release import ALIAS_CHAMPION, ALIAS_PREVIOUS
from ballast.serving import Deployment
from ballast.settings import Settings, get_settings
from tasks.canary import version_spec
from tasks.common import AuditedAdmin, logger, registry


def desired_state_file(s: Settings) -> Path:
    """Where a gateway with the default (file) desired-state source reads what to serve."""
    return s.state_dir.resolve() / "gateway" / "desired.json"


@task(name="rollback-to-previous", cache_policy=NO_CACHE)
def rollback_to_previous(model_name: str | None = None, *, why: str = "manual rollback") -> str:
    s = get_settings()
    name = model_name or s.model_name
    reg = registry(s)
    previous = reg.get_by_alias(name, ALIAS_PREVIOUS)
    champion = reg.get_by_alias(name, ALIAS_CHAMPION)
    if previous is None:
        raise RegistryError(f"{name} has no 'previous' version to roll back to")
    spec = version_spec(reg, s, previous)  # verify before anything moves
    target = Deployment(model=name, champion=spec)
    offline = None
    with GatewayClient(s.gateway_url, s.admin_token()) as client:
        gw = AuditedAdmin(client, s.audit_log, why=why)
        live = client.health()
        before = gw.get_deployment() if live else None
        if live:
            gw.set_deployment(target)
        elif desired_state_file(s).exists():
            # Imported only here: tasks normally talk to the gateway over its API.
            from infra.gateway.desired import FileDesiredState

            offline = FileDesiredState(desired_state_file(s))
            offline_before = offline.read()
            offline.publish(target, actor=f"rollback ({why})")
        try:
            reg.rollback_to_previous(name)
        except BaseException:
            if live and before is not None:
                gw.set_deployment(before)
            if offline is not None:
                offline.publish(offline_before, actor="rollback failed: restored")
            raise
    record(
        s.audit_log,
        "rollback",
        model=name,
        version=previous.version,
        replaced=champion.version if champion else None,
        gateway_updated=live,
        desired_state_written=offline is not None,
        why=why,
    )
    logger().info(
        "stage=rollback model=%s champion=%s replaced=%s gateway_updated=%s desired_file=%s",
        name,
        previous.version,
        champion.version if champion else None,
        live,
        offline is not None,
    )
    return previous.version
