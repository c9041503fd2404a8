"""FAKES of the gateway client and the registry facade for tasks called via ``.fn()``.

They stand in for ``GatewayClient`` (the deployment calls only) and ``Registry`` (aliases, promote
and rollback), so a task's guard paths (a registry move failing after traffic moved) can be made
to happen on demand. The real gateway and MLflow are exercised in tests/flows and
tests/integration.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from types import SimpleNamespace
from typing import Any

from ballast.errors import GatewayError, RegistryError
from ballast.gateway_client import GatewayHTTPError
from ballast.serving import Deployment, VersionSpec, deployment_etag, precondition_holds


def spec(version: str) -> VersionSpec:
    return VersionSpec(version=version, artifact_path=f"/a/{version}.onnx", sha256="0" * 64)


class FakeGateway:
    """FAKE of ``GatewayClient``: an instance is also the "class" a task constructs.

    ``refuse_sets`` numbers the PUTs (1-based) it refuses; a refused PUT changes nothing.
    """

    def __init__(self, current: Deployment | None, *, refuse_sets: set[int] | None = None) -> None:
        self.current = current
        self.sets: list[Deployment] = []
        self._refuse = refuse_sets or set()
        self._watched: FakeRegistry | None = None
        # The watched registry's aliases as each PUT arrived (see watch).
        self.aliases_at_put: list[dict[str, str]] = []

    def watch(self, registry: FakeRegistry) -> None:
        """Record ``registry``'s aliases at every PUT (to check what moved first)."""
        self._watched = registry

    def __call__(self, *args: Any, **kwargs: Any) -> FakeGateway:
        return self

    def __enter__(self) -> FakeGateway:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def health(self) -> bool:
        return True

    def get_deployment(self) -> Deployment | None:
        return self.current

    def set_deployment(
        self, dep: Deployment, *, expect: Sequence[Deployment | None] = ()
    ) -> Deployment:
        # If-Match as the gateway checks it: a change that lost a race changes nothing.
        tags = frozenset(deployment_etag(d) for d in expect)
        if expect and not precondition_holds(tags, self.current, time.time()):
            raise GatewayHTTPError("fake gateway: 412 precondition failed", status_code=412)
        if self._watched is not None:
            self.aliases_at_put.append(dict(self._watched.aliases))
        self.sets.append(dep)
        if len(self.sets) in self._refuse:
            raise GatewayError("fake gateway refused the change")
        self.current = dep
        return dep

    def shadow(self) -> dict[str, Any]:
        return {}


class FakeRegistry:
    """FAKE of the registry facade's alias calls: ``fail`` makes promote and rollback raise,
    ``fail_undo`` the undo of a move. ``log`` lists the moves and undos in order."""

    def __init__(
        self, aliases: dict[str, str], *, fail: bool = False, fail_undo: bool = False
    ) -> None:
        self.aliases = dict(aliases)
        self.fail = fail
        self.fail_undo = fail_undo
        self.log: list[str] = []
        self.tags: dict[str, dict[str, str]] = {}
        self.serving_locks = 0
        self.locked = False
        self.unlocked_alias_writes: list[str] = []

    def get_by_alias(self, name: str, alias: str) -> Any:
        version = self.aliases.get(alias)
        return None if version is None else SimpleNamespace(name=name, version=version, tags={})

    def set_tags(self, name: str, version: str, tags: dict[str, str]) -> None:
        self.tags.setdefault(version, {}).update(tags)

    def delete_alias(self, name: str, alias: str) -> None:
        self.aliases.pop(alias, None)
        self.log.append(f"{alias} deleted")
        if not self.locked:
            self.unlocked_alias_writes.append(f"{alias} deleted")

    def set_alias(self, name: str, alias: str, version: str) -> None:
        self.aliases[alias] = version
        self.log.append(f"{alias} {version}")
        if not self.locked:
            self.unlocked_alias_writes.append(f"{alias} {version}")

    @contextlib.contextmanager
    def serving_lock(self, name: str) -> Iterator[None]:
        # One process: nothing to take turns with (the real lock: test_registry_write_lock);
        # records whether alias writes happen inside it.
        self.serving_locks += 1
        self.locked = True
        try:
            yield
        finally:
            self.locked = False

    def _move(self, name: str, what: str, target: dict[str, str | None]) -> SimpleNamespace:
        if self.fail:
            raise RegistryError("tracking server unreachable")
        moved_from = {alias: self.aliases.get(alias) for alias in target}
        for alias, version in target.items():
            if version is None:
                self.aliases.pop(alias, None)
            else:
                self.aliases[alias] = version
        self.log.append(what)
        return SimpleNamespace(name=name, moved_from=moved_from, moved_to=dict(target))

    def promote(self, name: str, version: str) -> SimpleNamespace:
        target: dict[str, str | None] = {"champion": version}
        if "champion" in self.aliases:
            target["previous"] = self.aliases["champion"]
        if self.aliases.get("candidate") == version:
            target["candidate"] = None
        return self._move(name, f"promote {version}", target)

    def rollback_to_previous(
        self, name: str, *, expect: dict[str, str | None] | None = None
    ) -> SimpleNamespace:
        if expect is not None and any(self.aliases.get(a) != v for a, v in expect.items()):
            raise RegistryError(f"not rolling back: the aliases moved (expected {expect})")
        if "previous" not in self.aliases:
            raise RegistryError("no previous")
        return self._move(
            name, "rollback", {"champion": self.aliases["previous"], "previous": None}
        )

    def undo(self, result: SimpleNamespace) -> None:
        if self.fail_undo:
            raise RegistryError("tracking server unreachable for the undo")
        for alias, version in result.moved_from.items():
            if version is None:
                self.aliases.pop(alias, None)
            else:
                self.aliases[alias] = version
        self.log.append("undo")
