"""tasks/canary.py via ``.fn()`` against FAKES of the gateway and the registry
(tests/tasks/fakes.py): the gateway goes back when the registry's promotion fails."""

from __future__ import annotations

import numpy as np
import pytest

import tasks.canary as tc
from ballast.errors import RegistryError
from ballast.judge import Observation, ThresholdJudge
from ballast.serving import Deployment
from ballast.settings import Settings
from tests.tasks.fakes import FakeGateway, FakeRegistry, spec

ROWS = np.zeros((1, 30), dtype=np.float32)
LABELS = np.zeros(1, dtype=np.int64)


def _wire(monkeypatch: pytest.MonkeyPatch, gateway: FakeGateway, reg: FakeRegistry) -> None:
    monkeypatch.setattr(tc, "GatewayClient", gateway)
    monkeypatch.setattr(tc, "registry", lambda s=None: reg)
    monkeypatch.setattr(tc, "version_spec", lambda reg, s, info: spec(info.version))
    monkeypatch.setattr(tc, "ensure_gateway", lambda s: None)
    monkeypatch.setattr(tc, "_judge", lambda s: ThresholdJudge(min_samples=10))

    def healthy(s: Settings, candidate: str, rows: object, labels: object) -> object:
        return lambda weight: [Observation(candidate, True, 0.001)] * s.canary_min_samples

    monkeypatch.setattr(tc, "_load", healthy)


def _candidate(version: str) -> object:
    from types import SimpleNamespace

    return SimpleNamespace(name="ignored", version=version, tags={})


def test_a_failed_promotion_of_a_first_release_leaves_nothing_served(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a first release (no champion, nothing deployed) that passes its canary,
    gateway = FakeGateway(None)
    reg = FakeRegistry({}, fail=True)
    _wire(monkeypatch, gateway, reg)
    # when the registry cannot promote it after the gateway switched,
    with pytest.raises(RegistryError, match="unreachable"):
        tc.canary_release.fn(_candidate("1"), ROWS, LABELS)
    # then the gateway serves nothing again: it must not serve a version the registry disowns.
    assert any(d.champion == spec("1") for d in gateway.sets), gateway.sets
    assert gateway.current == Deployment(model=settings.model_name), gateway.current


def test_a_failed_restore_after_a_failed_promotion_rides_along_on_the_error(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    gateway = FakeGateway(None, refuse_sets={3})  # trial, promotion, then the restore refused
    reg = FakeRegistry({}, fail=True)
    _wire(monkeypatch, gateway, reg)
    with pytest.raises(RegistryError, match="unreachable") as info:
        tc.canary_release.fn(_candidate("1"), ROWS, LABELS)
    assert gateway.sets[-1] == Deployment(model=settings.model_name), "the restore was tried"
    notes = getattr(info.value, "__notes__", [])
    assert any("restoring the deployment" in n and "refused" in n for n in notes), notes
