"""A live-traffic canary reading a gateway of two pods (``live_traffic(..., pods=...)``): two
real gateway processes, each with its own state folder (its own replica board and observations),
as two Kubernetes pods behind a headless Service.

Before ``pods``, each poll reached one pod through the Service, at random: the judge saw the
pods in turns and a poll's answers from one of them only. The pods' URLs are given directly
here (what resolving the headless Service gives, see ``tests/tasks/test_gateway_pods_tasks.py``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from ballast.canary import ShadowStats, live_traffic, read_pods_shadow
from ballast.errors import GatewayError
from ballast.gateway_client import GatewayClient
from ballast.gateway_process import GatewayProcess
from ballast.serving import Deployment, VersionSpec
from ballast.settings import Settings
from infra.gateway.testing import build_mlp_onnx, spec_for
from tests.conftest import free_port

pytestmark = pytest.mark.integration

MODEL = "m"
TOKEN = "pods-share-one-admin-token"


@pytest.fixture
def versions(tmp_path: Path) -> tuple[VersionSpec, VersionSpec]:
    return (
        spec_for(build_mlp_onnx(tmp_path / "one.onnx", seed=1), "1"),
        spec_for(build_mlp_onnx(tmp_path / "two.onnx", seed=2), "2"),
    )


@pytest.fixture
def pods(
    tmp_path: Path, versions: tuple[VersionSpec, VersionSpec]
) -> Iterator[list[GatewayClient]]:
    """Two pods serving champion 1 and canary 2 at weight 50 (each its own deployment file, as
    pods following one registry converge to the same)."""
    champion, canary = versions
    with contextlib.ExitStack() as stack:
        clients = []
        for name in "ab":
            s = Settings(
                state_dir=tmp_path / f"pod-{name}",
                gateway_port=free_port(),
                gateway_admin_token=SecretStr(TOKEN),
            )
            stack.enter_context(
                GatewayProcess.start(
                    s, log_path=tmp_path / f"{name}.log", exit_with_parent=True, timeout=30
                )
            )
            gw = stack.enter_context(GatewayClient(s.gateway_url, s.admin_token()))
            gw.set_deployment(
                Deployment(model=MODEL, champion=champion, canary=canary, canary_weight=50)
            )
            clients.append(gw)
        yield clients


def _send(gw: GatewayClient, n: int) -> None:
    for _ in range(n):
        gw.predict(MODEL, [[0.1] * 30])


def test_every_pod_is_read_at_every_poll(
    pods: list[GatewayClient],
    versions: tuple[VersionSpec, VersionSpec],
    caplog: pytest.LogCaptureFixture,
) -> None:
    a, b = pods
    urls = [a.base_url, b.base_url]
    load = live_traffic(
        "http://service.invalid", TOKEN, candidate_version="2", min_samples=10**6,
        max_seconds=0.0, pods=lambda: list(urls), model=MODEL,
    )  # fmt: skip
    assert load(50) == []  # first looks: where each pod's replica is
    _send(a, 30)
    _send(b, 20)
    got = load(50)  # one poll (max_seconds=0): both pods
    assert len(got) == 50, got
    # Each answer once: the next poll reads on from each pod's own cursor.
    _send(b, 7)
    assert len(load(50)) == 7
    # A pod gone (its address now answers nothing) is skipped, and said once a step; the
    # other is still read.
    dead = f"127.0.0.1:{free_port()}"
    urls[1] = f"http://{dead}"
    _send(a, 5)
    with caplog.at_level("WARNING", logger="ballast.canary"):
        assert len(load(50)) == 5
        slow = live_traffic(
            "http://service.invalid", TOKEN, candidate_version="2", min_samples=10**6,
            max_seconds=0.3, poll_s=0.02, pods=lambda: list(urls), model=MODEL,
        )  # fmt: skip
        slow(50)  # one step, many polls
    said = [r.getMessage() for r in caplog.records if dead in r.getMessage()]
    assert len(said) == 2 and "pod not read" in said[0], said
    # Answers served at another weight do not count for this step.
    _send(a, 4)
    assert load(10) == []
    # A pod serving another model (a name that also covers another model's gateway) adds
    # nothing, though its versions have the same names.
    urls[1] = b.base_url
    champion, canary = versions
    b.set_deployment(Deployment(model="other", champion=champion, canary=canary, canary_weight=50))
    for _ in range(6):
        b.predict("other", [[0.1] * 30])
    _send(a, 3)
    assert len(load(50)) == 3


def test_a_poll_fails_only_when_no_pod_answers(pods: list[GatewayClient]) -> None:
    a, _ = pods
    dead = [f"http://127.0.0.1:{free_port()}" for _ in range(2)]
    seen: list[Any] = []

    def resolve() -> list[str]:
        seen.append(None)
        if len(seen) == 2:
            raise GatewayError("pods host does not resolve")  # keeps the last known pods
        return dead

    load = live_traffic(
        a.base_url, TOKEN, candidate_version="2", min_samples=1,
        max_seconds=0.0, poll_s=0.0, pods=resolve,
    )  # fmt: skip
    for _ in range(5):  # five failed polls in a row are ridden out ...
        assert load(50) == []
    with pytest.raises(GatewayError, match="unreachable"):
        load(50)  # ... the sixth is a gateway gone
    assert len(seen) == 6  # the pods were asked for at every step


def test_the_shadow_phase_reads_every_pod_once(
    pods: list[GatewayClient], versions: tuple[VersionSpec, VersionSpec], tmp_path: Path
) -> None:
    champion, shadow = versions
    for gw in pods:
        gw.set_deployment(
            Deployment(model=MODEL, champion=champion, shadow=shadow, shadow_fraction=1.0)
        )
    a, b = pods
    _send(a, 10)
    _send(b, 6)

    def fetch(url: str) -> dict[str, Any]:
        with GatewayClient(url, TOKEN) as gw:
            return gw.shadow()

    urls = [a.base_url, b.base_url]
    stats = ShadowStats(0, 0, 0, 0)
    for _ in range(100):  # mirrored calls finish after their requests were answered
        stats = read_pods_shadow(urls, fetch)
        if stats.mirrored == 16:
            break
        time.sleep(0.05)
    assert (stats.mirrored, stats.rows_compared, stats.failed) == (16, 16, 0), stats
    # A pod that does not answer is left out; none answering is the last pod's error.
    dead = f"http://127.0.0.1:{free_port()}"
    assert read_pods_shadow([a.base_url, dead], fetch).mirrored == 10
    with pytest.raises(GatewayError, match="unreachable"):
        read_pods_shadow([dead], fetch)
    # A pod mirroring to another version (or none) adds nothing to this shadow's counts.
    other = spec_for(build_mlp_onnx(tmp_path / "three.onnx", seed=3), "3")
    b.set_deployment(Deployment(model=MODEL, champion=champion, shadow=other, shadow_fraction=1.0))
    _send(b, 5)
    for _ in range(100):
        if read_pods_shadow([b.base_url], fetch).mirrored == 5:
            break
        time.sleep(0.05)
    assert read_pods_shadow(urls, fetch).mirrored == 15  # without the filter: both shadows
    assert read_pods_shadow(urls, fetch, shadow="2").mirrored == 10
    b.set_deployment(Deployment(model=MODEL, champion=champion))
    assert read_pods_shadow([b.base_url, dead], fetch, shadow="2") == ShadowStats(0, 0, 0, 0)
