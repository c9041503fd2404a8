"""Manual rollback to the previous champion: registry aliases and gateway move together."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from ballast.audit import record
from ballast.errors import RegistryError
from ballast.gateway_client import GatewayClient
from ballast.release import ALIAS_CHAMPION, ALIAS_PREVIOUS
from ballast.serving import Deployment
from ballast.settings import get_settings
from tasks.canary import version_spec
from tasks.common import logger, registry


@task(name="rollback-to-previous", cache_policy=NO_CACHE)
def rollback_to_previous(model_name: str | None = None) -> str:
    s = get_settings()
    name = model_name or s.model_name
    reg = registry(s)
    previous = reg.get_by_alias(name, ALIAS_PREVIOUS)
    champion = reg.get_by_alias(name, ALIAS_CHAMPION)
    if previous is None:
        raise RegistryError(f"{name} has no 'previous' version to roll back to")
    spec = version_spec(reg, s, previous)  # verify before anything moves
    with GatewayClient(s.gateway_url, s.admin_token()) as gw:
        live = gw.health()
        before = gw.get_deployment() if live else None
        if live:
            gw.set_deployment(Deployment(model=name, champion=spec))
        try:
            reg.rollback_to_previous(name)
        except BaseException:
            if live and before is not None:
                gw.set_deployment(before)
            raise
    record(
        s.audit_log,
        "rollback",
        model=name,
        version=previous.version,
        replaced=champion.version if champion else None,
        gateway_updated=live,
    )
    logger().info(
        "stage=rollback model=%s champion=%s replaced=%s gateway_updated=%s",
        name,
        previous.version,
        champion.version if champion else None,
        live,
    )
    return previous.version
