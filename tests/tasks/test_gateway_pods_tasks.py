"""The watchdog's and the canary's tasks against a gateway of two pods: two real gateway processes, each with a
state folder (and so a replica board) of its own, as two Kubernetes pods have.

With ``BALLAST_GATEWAY_PODS_HOST`` each watchdog run reads every pod and heartbeats every pod,
and a canary's live-traffic polls and shadow look read every pod. The one
stand-in is DNS: a name resolving to both pods (a headless Service) cannot be served here, so
``socket.getaddrinfo`` answers for that one name with both addresses and passes every other
lookup to the real resolver.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ballast.anomaly import DetectorPolicy
from ballast.gateway_client import GatewayClient
from ballast.gateway_process import GatewayProcess
from ballast.serving import Deployment
from ballast.settings import Settings, get_settings
from ballast.watchdog import WatchdogPolicy
from infra.gateway.testing import build_mlp_onnx, spec_for
from tasks import canary as tc
from tasks import watchdog as wt
from tests.conftest import free_port

pytestmark = pytest.mark.integration

POLICY = WatchdogPolicy(detector=DetectorPolicy(warmup=3, min_count=20))
PODS_HOST = "ballast-gateway-pods.test"


class Registry:
    def get_by_alias(self, name: str, alias: str) -> Any:
        return type("V", (), {"version": {"champion": "3", "previous": "2"}[alias]})()


@pytest.fixture
def ports(settings: Settings) -> list[int]:
    """The pods' ports, in the order PODS_HOST resolves to them (a test may change them)."""
    return [settings.gateway_port, free_port()]


def resolve_pods(monkeypatch: pytest.MonkeyPatch, ports: list[int]) -> None:
    """PODS_HOST resolves to 127.0.0.1 at each of ``ports`` (read at each lookup: a test may
    change them); every other name goes to the real resolver."""
    real = socket.getaddrinfo

    def resolve(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host != PODS_HOST:
            return real(host, port, *args, **kwargs)
        return [row for p in ports for row in real("127.0.0.1", p, *args, **kwargs)]

    monkeypatch.setattr(socket, "getaddrinfo", resolve)


@pytest.fixture
def pods(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ports: list[int]
) -> Iterator[list[GatewayClient]]:
    """Two gateway processes serving version 3 as champion; pod b's champion fails 30 % of its
    requests (the gateway's injected fault). Settings name both through PODS_HOST."""
    spec = spec_for(build_mlp_onnx(tmp_path / "three.onnx", seed=3), "3")
    resolve_pods(monkeypatch, ports)
    monkeypatch.setattr(wt, "registry", lambda s=None: Registry())
    with contextlib.ExitStack() as stack:
        clients = []
        for name, port in zip("ab", list(ports), strict=True):
            pod = settings.model_copy(
                update={"state_dir": tmp_path / f"pod-{name}", "gateway_port": port}
            )
            stack.enter_context(
                GatewayProcess.start(
                    pod, log_path=tmp_path / f"{name}.log", timeout=30, exit_with_parent=True
                )
            )
            client = stack.enter_context(GatewayClient(pod.gateway_url, settings.admin_token()))
            fault = "errors" if name == "b" else None
            client.set_deployment(
                Deployment(
                    model=settings.model_name,
                    champion=spec.model_copy(update={"fault": fault}),
                )
            )
            clients.append(client)
        monkeypatch.setenv("BALLAST_GATEWAY_PODS_HOST", PODS_HOST)
        get_settings.cache_clear()
        yield clients


def _traffic(client: GatewayClient, model: str, n: int) -> None:
    for _ in range(n):
        with contextlib.suppress(Exception):  # pod b's injected faults answer 500
            client.predict(model, [[0.1] * 30])


def _counts(client: GatewayClient) -> tuple[int, int]:
    v = client.stats()["versions"]["3"]
    return int(v["requests"]), int(v["errors"])


def test_every_pod_is_read_and_a_failing_pod_is_in_every_window(
    pods: list[GatewayClient], settings: Settings
) -> None:
    model = settings.model_name
    a, b = pods
    first = wt.check_champion.fn(model, POLICY).decision.observation
    assert first.first, first
    before = [_counts(a), _counts(b)]
    _traffic(a, model, 40)
    _traffic(b, model, 40)
    obs = wt.check_champion.fn(model, POLICY).decision.observation
    after = [_counts(a), _counts(b)]
    # Both pods' windows, added up: pod b's errors are in it, whichever pod a connection
    # to the gateway's Service would have reached.
    assert obs.replica == "2 replicas", obs
    assert obs.requests == sum(n - m for (n, _), (m, _) in zip(after, before, strict=True)) == 80
    errors_b = after[1][1] - before[1][1]
    assert errors_b > 0 and obs.errors == errors_b, (obs, after, before)
    assert obs.class_counts is not None and sum(obs.class_counts.values()) == 80 - errors_b


def test_every_pod_gets_the_heartbeat(pods: list[GatewayClient], settings: Settings) -> None:
    model = settings.model_name
    assert wt.send_heartbeat.fn(model, False, "breach") is True
    for client in pods:
        metrics = client._http.get("/metrics").text
        assert f'ballast_watchdog_healthy{{model="{model}"}} 0.0' in metrics


def test_a_pod_that_does_not_answer_is_left_out_and_the_others_are_read(
    pods: list[GatewayClient],
    settings: Settings,
    ports: list[int],
    caplog: pytest.LogCaptureFixture,
) -> None:
    model = settings.model_name
    a, _ = pods
    wt.check_champion.fn(model, POLICY)
    _traffic(a, model, 25)
    # Pod b goes away: the name now gives its address where nothing listens.
    ports[1] = dead = free_port()
    caplog.set_level(logging.INFO)
    obs = wt.check_champion.fn(model, POLICY).decision.observation
    assert obs.available and obs.requests == 25 and obs.errors == 0, obs
    assert "pods=2 read=1 failed=1" in caplog.text
    assert f"127.0.0.1:{dead} unreachable" in caplog.text
    # No pod answers: unavailable, with the reason, and no heartbeat sent.
    ports[0] = free_port()
    check = wt.check_champion.fn(model, POLICY)
    assert check.decision.status == "unavailable"
    assert "2 pod(s)" in check.decision.observation.reason
    assert wt.send_heartbeat.fn(model, True) is False


def test_a_pods_name_that_does_not_resolve_is_unavailable(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BALLAST_GATEWAY_PODS_HOST", "pods.invalid")
    monkeypatch.setattr(wt, "registry", lambda s=None: Registry())

    def nowhere(host: Any, *args: Any, **kwargs: Any) -> Any:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", nowhere)
    get_settings.cache_clear()
    check = wt.check_champion.fn(settings.model_name, POLICY)
    assert check.decision.status == "unavailable"
    assert "'pods.invalid' does not resolve" in check.decision.observation.reason
    assert wt.send_heartbeat.fn(settings.model_name, True) is False


def test_the_canarys_live_polls_and_shadow_look_read_every_pod(
    pods: list[GatewayClient], settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = settings.model_name
    a, b = pods
    three = a.get_deployment()
    assert three is not None and three.champion is not None
    four = spec_for(build_mlp_onnx(tmp_path / "four.onnx", seed=4), "4")
    monkeypatch.setenv("BALLAST_CANARY_TRAFFIC", "live")
    # A read returns at the first candidate answer or after 1 s.
    monkeypatch.setenv("BALLAST_CANARY_MIN_SAMPLES", "1")
    monkeypatch.setenv("BALLAST_CANARY_STEP_MAX_SECONDS", "1")
    get_settings.cache_clear()
    s = get_settings()
    for gw in pods:
        gw.set_deployment(
            Deployment(model=model, champion=three.champion, shadow=four, shadow_fraction=1.0)
        )
    _traffic(a, model, 10)
    _traffic(b, model, 6)
    mirrored = 0
    for _ in range(100):  # mirrored calls finish after their requests were answered
        mirrored = tc._shadow_reader(s, a, "4")().mirrored
        if mirrored == 16:
            break
        time.sleep(0.05)
    assert mirrored == 16  # through a's URL alone: 10
    # The pods' name not resolving just then: read through the gateway's URL (pod a) instead.
    real = socket.getaddrinfo

    def no_pods(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host == PODS_HOST:
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return real(host, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket, "getaddrinfo", no_pods)
        assert tc._shadow_reader(s, a, "4")().mirrored == 10
    for gw in pods:
        gw.set_deployment(
            Deployment(model=model, champion=three.champion, canary=four, canary_weight=50)
        )
    load = tc._load(s, "4", np.zeros((1, 30), np.float32), np.zeros(1, np.int64))
    load(50)  # first looks
    _traffic(a, model, 10)
    _traffic(b, model, 6)
    got: list[Any] = []
    for _ in range(20):
        got += load(50)
        if len(got) >= 16:
            break
    assert len(got) == 16, got


def test_the_breach_report_localises_the_failing_pod_from_every_pods_files(
    pods: list[GatewayClient], settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    from tests.tasks.test_watchdog_tasks import _breach

    model = settings.model_name
    a, b = pods
    _traffic(a, model, 30)
    _traffic(b, model, 40)
    errors_b = _counts(b)[1]
    assert errors_b > 0 and _counts(a)[1] == 0
    replica_b = b.stats()["replica"]
    caplog.set_level(logging.INFO)
    # No gateway log under the watchdog's state folder (a pod logs to stdout): every pod's
    # /admin/failures is read, and pod b's replica holds every failure.
    md = wt.localisation_markdown(get_settings(), _breach(settings), None, 900)
    assert f"**{errors_b} failed requests**" in md, md
    assert f"| {replica_b} | {errors_b} | 100.0% |" in md, md
    assert "| injected_fault |" in md and "| 500 |" in md
    # Both pods were read: b's file and a's none (a failed nothing).
    assert "pod-b/gateway/failures/" in md and "pod-a" not in md
    assert md.count(": no failure file") == 1, md
    assert "Log around the first failure" in md and "request.failed" in md
    assert "stage=localise pods=2 read=2 failed=0" in caplog.text


def test_the_report_says_where_a_clusters_failure_lines_are(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, ports: list[int]
) -> None:
    import yaml

    from tests.tasks.test_watchdog_tasks import _breach

    decision = _breach(settings)
    # Nothing listens at the gateway's URL: no report, and why.
    alone = wt.localisation_markdown(settings, decision, [], 900)
    assert alone.startswith("_No gateway log found for fault localisation (gateway at "), alone
    assert "unreachable" in alone
    # Pods that do not answer (none runs here): their own log, with the command that reads it.
    resolve_pods(monkeypatch, ports)
    monkeypatch.setenv("BALLAST_GATEWAY_PODS_HOST", PODS_HOST)
    get_settings.cache_clear()
    md = wt.localisation_markdown(get_settings(), decision, [], 900)
    assert md.startswith("_No pod's failures could be read ("), md
    # The pods' label as the manifests set it: the command selects the gateway's pods.
    manifests = Path(__file__).resolve().parents[2] / "infra" / "k8s" / "gateway.yaml"
    deployment = next(
        d for d in yaml.safe_load_all(manifests.read_text()) if d and d["kind"] == "Deployment"
    )
    ((key, value),) = deployment["spec"]["selector"]["matchLabels"].items()
    assert f"kubectl logs -l {key}={value} --since=15m" in md, md
    assert "request.failed" in md


def test_a_fault_report_that_breaks_never_breaks_the_report_it_goes_into(
    pods: list[GatewayClient], settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from datetime import UTC, datetime, timedelta

    from ballast.gateway_client import GatewayClient as Client
    from tasks.localisation import fault_markdown, rollback_fault_report

    model = settings.model_name
    _traffic(pods[1], model, 20)
    since = datetime.now(UTC) - timedelta(minutes=5)
    # The rollback report's task over the same pods: pod b's failures.
    md = rollback_fault_report.fn(model, "3", since.timestamp())
    assert md.startswith(f"# Fault report: {model} version 3") and "failed requests" in md

    def broken(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise ZeroDivisionError("a pod's answer this code did not foresee")

    monkeypatch.setattr(Client, "failures", broken)
    md = fault_markdown(get_settings(), model, "3", since)
    assert md == (
        "_Fault localisation failed: ZeroDivisionError: a pod's answer this code did not foresee_\n"
    )
