"""Rollback to the previous champion: registry aliases and gateway move together.

With the gateway down, the rollback still happens in the registry and is written to the
gateway's desired-state file (when the gateway uses one), so a gateway started later serves the
restored champion, not the version rolled away from.

While a trial (a canary at any weight, or its shadow phase) is in force the release flow owns
the deployment: a rollback then raises :class:`TrialInForce` and changes nothing, unless forced
(``ballast rollback --force``); a forced one makes the running canary stop without touching it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from ballast.audit import record
from ballast.errors import ChampionChanged, GatewayError, RegistryError, TrialInForce
from ballast.gateway_client import GatewayClient
from ballast.release import (
    ALIAS_CHAMPION,
    ALIAS_PREVIOUS,
    TAG_REASON,
    TAG_STATUS,
    TAG_VERDICT,
)
from ballast.serving import Deployment
from ballast.settings import Settings, get_settings
from tasks.canary import version_spec
from tasks.common import AuditedAdmin, logger, registry


@dataclass(frozen=True, slots=True)
class RolledBack:
    """What a rollback did: ``restored`` is champion now, ``replaced`` was (None: no champion)."""

    restored: str
    replaced: str | None


def desired_state_file(s: Settings) -> Path:
    """Where a gateway with the default (file) desired-state source reads what to serve."""
    return s.state_dir.resolve() / "gateway" / "desired.json"


def _refuse_another_model(name: str, dep: Deployment | None) -> None:
    """The gateway serves one model: a rollback of ``name`` while it serves another would
    replace that model (its clients would meet 404). Not waived by ``force``."""
    if dep is not None and dep.model != name and dep.versions():
        raise GatewayError(
            f"the gateway serves model {dep.model!r}, not {name!r}: rolling {name} back there "
            "would replace it; nothing was rolled back"
        )


def _refuse_during_trial(name: str, dep: Deployment | None, *, force: bool) -> None:
    # A trial whose lease ran out is dead (its controller is gone): every replica drops it at
    # its next lease check, so it does not hold a rollback up.
    if force or dep is None or not dep.has_trial() or dep.lease_expired(time.time()):
        return
    trial = (
        f"canary {dep.canary.version} at {dep.canary_weight}%"
        if dep.canary is not None
        else f"shadow {dep.shadow.version if dep.shadow else '?'}"
    )
    raise TrialInForce(
        f"{name}: a trial is in force ({trial}); the release flow owns the deployment until it "
        "ends. Force the rollback only if that release is to be abandoned."
    )


@task(name="rollback-to-previous", cache_policy=NO_CACHE)
def rollback_to_previous(
    model_name: str | None = None,
    *,
    why: str = "manual rollback",
    force: bool = False,
    expect_champion: str | None = None,
) -> RolledBack:
    """Move ``champion`` back to ``previous`` and point the gateway at it.

    ``expect_champion``: roll back only while that version is the champion (the watchdog's
    judged version): a champion promoted since was never judged, and its ``previous`` may be
    the very version that breached. Otherwise :class:`RegistryError`, nothing moved.

    Refused with :class:`TrialInForce` while a canary or shadow trial is in force, unless
    ``force``. The registry moves first (a registry-backed gateway serves only what the aliases
    name), then the gateway; if the gateway then refuses or cannot be reached mid-change, the
    alias move is undone and the gateway gets back what it served before (nothing, if it served
    nothing), and the gateway's error is raised.
    """
    s = get_settings()
    name = model_name or s.model_name
    reg = registry(s)
    previous = reg.get_by_alias(name, ALIAS_PREVIOUS)
    champion = reg.get_by_alias(name, ALIAS_CHAMPION)
    if previous is None:
        raise RegistryError(f"{name} has no 'previous' version to roll back to")
    current = None if champion is None else champion.version
    if expect_champion is not None and current != expect_champion:
        raise ChampionChanged(
            f"{name}'s champion is version {current}, not the judged version {expect_champion}: "
            "it changed since; nothing was rolled back"
        )
    spec = version_spec(reg, s, previous)  # verify before anything moves
    target = Deployment(model=name, champion=spec)
    offline = None
    with GatewayClient(s.gateway_url, s.admin_token()) as client:
        gw = AuditedAdmin(client, s.audit_log, why=why)
        live = client.health()
        # Read right before the change: a canary may have begun since the caller decided.
        before = gw.get_deployment() if live else None
        if live:
            _refuse_another_model(name, before)
            _refuse_during_trial(name, before, force=force)
        elif desired_state_file(s).exists():
            # Imported only here: tasks normally talk to the gateway over its API.
            from infra.gateway.desired import FileDesiredState

            offline = FileDesiredState(desired_state_file(s))
            offline_before = offline.read()
            _refuse_another_model(name, offline_before)
            _refuse_during_trial(name, offline_before, force=force)
        # Only the pair verified above: a promotion since would make `previous` another
        # version than the one the gateway is about to be given.
        moved = reg.rollback_to_previous(
            name,
            expect={
                ALIAS_PREVIOUS: previous.version,
                ALIAS_CHAMPION: None if champion is None else champion.version,
            },
        )
        try:
            if live:
                gw.set_deployment(target)
            elif offline is not None:
                offline.publish(target, actor=f"rollback ({why})")
        except BaseException as exc:
            # The gateway did not take `previous`: the registry's champion must not say it does.
            try:
                reg.undo(moved)
            except Exception as undo_exc:
                exc.add_note(f"undoing the alias move failed too: {undo_exc!r}")
            if live:
                # A PUT that timed out may have been applied all the same.
                restore = before if before is not None else Deployment(model=name)
                try:
                    gw.set_deployment(restore)
                except Exception as restore_exc:
                    exc.add_note(f"restoring the deployment failed too: {restore_exc!r}")
            raise
    if champion is not None and champion.version != previous.version:
        # The version rolled away from is decided: a rerun of its release (same content key)
        # must not offer it again. Its promotion tags may be missing (record_promotion is a
        # later task), so they are not what says so. Best effort: the rollback itself stands.
        try:
            reg.set_tags(
                name,
                champion.version,
                {TAG_STATUS: "rolled_back", TAG_VERDICT: "rollback", TAG_REASON: why[:500]},
            )
        except Exception as exc:
            logger().warning("stage=rollback could not tag version %s: %s", champion.version, exc)
    record(
        s.audit_log,
        "rollback",
        model=name,
        version=previous.version,
        replaced=champion.version if champion else None,
        gateway_updated=live,
        desired_state_written=offline is not None,
        why=why,
        forced=force,
    )
    logger().info(
        "stage=rollback model=%s champion=%s replaced=%s gateway_updated=%s desired_file=%s",
        name,
        previous.version,
        champion.version if champion else None,
        live,
        offline is not None,
    )
    # What moved, as read right before the move: a caller that read the champion earlier may
    # have seen one a promotion has replaced since.
    return RolledBack(previous.version, champion.version if champion else None)
