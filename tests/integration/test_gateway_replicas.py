"""Several gateway replicas (processes) on one machine: convergence, restarts, metrics, draining.

A supervisor runs the replicas on one port (a listening socket each); they follow the desired state in the state folder.
Every test starts real processes on 127.0.0.1, bounded in time, and stops them.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ballast.gateway_client import GatewayClient
from ballast.gateway_process import GatewayProcess
from ballast.serving import Deployment, VersionSpec
from ballast.settings import Settings
from infra.gateway.desired import FileDesiredState
from infra.gateway.testing import build_mlp_onnx, spec_for

pytestmark = pytest.mark.integration

MODEL = "m"
ROW = [0.5] * 30


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory) -> tuple[VersionSpec, VersionSpec]:
    root = tmp_path_factory.mktemp("artefacts")
    return (
        spec_for(build_mlp_onnx(root / "one.onnx", seed=21), "1"),
        spec_for(build_mlp_onnx(root / "two.onnx", seed=22), "2"),
    )


def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def board(client: GatewayClient) -> list[dict[str, Any]]:
    # A fresh connection per look: a kept-alive one may lead to the replica a test just killed.
    with GatewayClient(client.base_url, client._token) as fresh:
        return list(fresh.replicas()["replicas"])


def fresh_predict(url: str) -> httpx.Response:
    # A new connection each time, so the kernel spreads requests over the replicas.
    return httpx.post(
        f"{url}/v1/models/{MODEL}/predict", json={"instances": [ROW]}, trust_env=False, timeout=10
    )


def requests_total(url: str) -> float:
    text = httpx.get(f"{url}/metrics", trust_env=False, timeout=10).text
    return sum(
        s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == "ballast_requests_total"
    )


def test_replicas_converge_restart_into_the_right_state_and_share_metrics(
    settings: Settings, versions: tuple[VersionSpec, VersionSpec], tmp_path: Path
) -> None:
    one, two = versions
    desired = FileDesiredState(settings.state_dir.resolve() / "gateway" / "desired.json")
    log = tmp_path / "gw.log"
    sent = 0
    with (
        GatewayProcess.start(
            settings, log_path=log, workers=3, exit_with_parent=True, timeout=30
        ) as gw,
        GatewayClient(gw.url, settings.admin_token()) as client,
    ):
        wait_for(lambda: len(board(client)) == 3, 20, "three replicas reporting")

        # A push through one replica reaches all three before the PUT answers.
        split = Deployment(model=MODEL, champion=one, canary=two, canary_weight=30)
        assert client.set_deployment(split) == split
        assert {r["fingerprint"] for r in board(client)} == {split.fingerprint()}
        answers = [fresh_predict(gw.url) for _ in range(60)]
        sent += len(answers)
        assert {a.status_code for a in answers} == {200}
        assert {a.headers["X-Ballast-Version"] for a in answers} == {"1", "2"}

        # A change in the source itself (as a registry change would be) is picked up by polling.
        promoted = Deployment(model=MODEL, champion=two)
        desired.publish(promoted, actor="test")
        wait_for(
            lambda: (
                {r["fingerprint"] for r in board(client)} == {promoted.fingerprint()}
                and all(r["ready"] for r in board(client))
            ),
            5,
            "every replica on the promoted deployment",
        )
        answers = [fresh_predict(gw.url) for _ in range(30)]
        sent += len(answers)
        assert {a.headers["X-Ballast-Version"] for a in answers} == {"2"}

        # Counts are written every 20 ms (--metrics-flush-ms); a replica killed hard loses what
        # it had not written yet, so the kill waits until every answer so far is counted.
        wait_for(lambda: requests_total(gw.url) == sent, 2, f"/metrics counting {sent} requests")
        # Kill one replica hard: the supervisor restarts it and it comes back by itself.
        victim = board(client)[0]
        os.kill(victim["pid"], signal.SIGKILL)
        wait_for(
            lambda: (
                len(replicas := board(client)) == 3
                and victim["pid"] not in {r["pid"] for r in replicas}
                and all(r["ready"] and r["fingerprint"] == promoted.fingerprint() for r in replicas)
            ),
            20,
            "the replacement replica serving the desired deployment",
        )
        answers = [fresh_predict(gw.url) for _ in range(30)]
        sent += len(answers)
        assert {a.headers["X-Ballast-Version"] for a in answers} == {"2"}

        # Metrics add up every replica, the killed one included (counters never go back).
        # The answers since the kill are written within 20 ms: wait that out once.
        wait_for(lambda: requests_total(gw.url) == sent, 2, f"/metrics counting {sent} requests")
        totals = {requests_total(gw.url) for _ in range(6)}
        assert totals == {float(sent)}, f"sent {sent}, /metrics said {totals}"
        assert gw.stop(timeout=15) == 0

    # The whole gateway restarted (one process now) comes back to the desired state by itself.
    with (
        GatewayProcess.start(settings, log_path=log, exit_with_parent=True) as again,
        GatewayClient(again.url, settings.admin_token()) as client,
    ):
        wait_for(client.ready, 10, "the restarted gateway to be ready")
        assert client.get_deployment() == promoted
        assert {client.predict(MODEL, [ROW]).version for _ in range(10)} == {"2"}
    assert "worker 0" in log.read_text() and "exited with -9" in log.read_text()


@contextmanager
def two_replicas(
    settings: Settings, log: Path, champion: VersionSpec
) -> Iterator[tuple[GatewayProcess, GatewayClient]]:
    """A two-replica gateway, both on the board and serving ``champion``."""
    with (
        GatewayProcess.start(
            settings, log_path=log, workers=2, exit_with_parent=True, timeout=30
        ) as gw,
        GatewayClient(gw.url, settings.admin_token()) as admin,
    ):
        wait_for(lambda: len(board(admin)) == 2, 20, "both replicas reporting")
        admin.set_deployment(Deployment(model=MODEL, champion=champion))
        yield gw, admin


def listeners(port: int) -> dict[str, set[int]]:
    """The sockets listening on ``port`` (by inode) and the pids holding each, from /proc."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
            inodes.add(fields[9])
    holders: dict[str, set[int]] = {inode: set() for inode in inodes}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:[") and target[8:-1] in holders:
                    holders[target[8:-1]].add(int(proc.name))
        except OSError:  # exited meanwhile, or not ours to read
            continue
    return holders


def replica_per_connection(url: str, token: str, n: int) -> Counter[str]:
    """Open ``n`` connections at once and ask each which replica accepted it."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    conns = [http.client.HTTPConnection(host, int(port), timeout=10) for _ in range(n)]
    try:
        for conn in conns:
            conn.connect()
        seen: Counter[str] = Counter()
        for conn in conns:
            conn.request("GET", "/admin/stats", headers={"Authorization": f"Bearer {token}"})
            seen[json.loads(conn.getresponse().read())["replica"]] += 1
        return seen
    finally:
        for conn in conns:
            conn.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SO_REUSEPORT balances on Linux")
def test_each_replica_listens_on_a_socket_of_its_own_and_connections_spread(
    settings: Settings, versions: tuple[VersionSpec, VersionSpec], tmp_path: Path
) -> None:
    one, _ = versions
    port = int(settings.gateway_port)
    with two_replicas(settings, tmp_path / "gw.log", one) as (gw, client):
        pids = {r["pid"] for r in board(client)}
        # One listening socket per replica, held by that replica alone (a shared socket lets
        # whichever replica wakes first take a burst of connections).
        wait_for(lambda: len(listeners(port)) == 2, 10, "two listening sockets")
        assert sorted(map(sorted, listeners(port).values())) == sorted([p] for p in pids)
        # The kernel spreads connections over them: 64 at once land 32 +- 4 on each (the
        # bound below fails by chance about once in 40,000 runs).
        spread = replica_per_connection(gw.url, settings.admin_token(), 64)
        assert len(spread) == 2 and min(spread.values()) >= 16, spread

        # A replica killed hard takes its socket with it: new connections meanwhile all reach
        # the other one instead of waiting for the replacement, which listens once started.
        victim = board(client)[0]["pid"]
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: len(listeners(port)) == 1, 5, "the dead replica's socket closed")
        answers = [fresh_predict(gw.url) for _ in range(20)]
        assert {a.status_code for a in answers} == {200}
        wait_for(
            lambda: (
                len(replicas := board(client)) == 2
                and victim not in {r["pid"] for r in replicas}
                and all(r["ready"] for r in replicas)
            ),
            20,
            "the replacement replica ready",
        )
        wait_for(lambda: len(listeners(port)) == 2, 10, "the replacement's socket listening")
        assert victim not in set().union(*listeners(port).values())

        # SO_REUSEPORT would let a second gateway of the same user join the port and take a
        # share of the connections: it is refused instead, before it starts any replica.
        second = subprocess.run(
            [sys.executable, "-m", "infra.gateway", "--workers", "2", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert second.returncode == 1
        assert f"another Ballast gateway serves port {port}" in second.stderr
        assert len(listeners(port)) == 2
        assert gw.stop(timeout=15) == 0
    assert listeners(port) == {}


def test_switching_under_load_drops_nothing_and_sigterm_drains(
    settings: Settings, versions: tuple[VersionSpec, VersionSpec], tmp_path: Path
) -> None:
    one, two = versions
    log = tmp_path / "gw.log"
    gw = GatewayProcess.start(settings, log_path=log, workers=2, exit_with_parent=True)
    outcomes: Counter[str] = Counter()
    seen_versions: set[str] = set()
    lock = threading.Lock()
    stop = threading.Event()
    terminating = threading.Event()
    errors: list[str] = []  # the first few non-200 bodies, for the failure message

    def load() -> None:
        with httpx.Client(base_url=gw.url, trust_env=False, timeout=10) as http:
            while not stop.is_set():
                try:
                    resp = http.post(f"/v1/models/{MODEL}/predict", json={"instances": [ROW]})
                except httpx.HTTPError as exc:
                    # After SIGTERM the server closes idle keep-alive connections and refuses new
                    # ones: such a request never entered the gateway. Anything else is a failure.
                    kind = "refused" if terminating.is_set() else "error"
                    with lock:
                        outcomes[f"{kind}:{type(exc).__name__}"] += 1
                    if not gw.running():
                        return
                    time.sleep(0.01)
                    continue
                with lock:
                    outcomes[str(resp.status_code)] += 1
                    if resp.status_code != 200 and len(errors) < 5:
                        errors.append(resp.text)
                    seen_versions.add(resp.headers.get("X-Ballast-Version", "?"))

    try:
        with GatewayClient(gw.url, settings.admin_token()) as admin:
            # Both on the board first, so the PUT waits until both serve it.
            wait_for(lambda: len(board(admin)) == 2, 20, "both replicas reporting")
            admin.set_deployment(Deployment(model=MODEL, champion=one))
            threads = [threading.Thread(target=load) for _ in range(4)]
            for t in threads:
                t.start()
            plan = [
                Deployment(model=MODEL, champion=one, canary=two, canary_weight=10),
                Deployment(model=MODEL, champion=one, canary=two, canary_weight=90),
                Deployment(model=MODEL, champion=two),
                Deployment(model=MODEL, champion=two, canary=one, canary_weight=50),
                Deployment(model=MODEL, champion=one),
            ]
            for dep in plan:
                admin.set_deployment(dep)
                time.sleep(0.25)
            with lock:
                before = dict(outcomes)
            # SIGTERM while the load goes on: in-flight requests are answered, then it exits.
            started = time.monotonic()
            terminating.set()
            code = gw.stop(timeout=15)
            stopped_in = time.monotonic() - started
        stop.set()
        for t in threads:
            t.join(15)
    finally:
        stop.set()
        gw.stop()
    ok = outcomes["200"]
    assert before.get("200", 0) > 100, before
    assert not [k for k in before if k != "200"], f"failures while switching: {before} {errors}"
    assert seen_versions == {"1", "2"}
    assert code == 0 and stopped_in < 15
    unexpected = {k: v for k, v in outcomes.items() if k != "200" and not k.startswith("refused")}
    assert not unexpected, outcomes
    # Every predict request a replica answered reached its client as a 200: nothing was cut off.
    answered = sum(
        int(n)
        for n in re.findall(r'"event": "gateway.stopped".*?"answered": (\d+)', log.read_text())
    )
    lines = [
        json.loads(line) for line in log.read_text().splitlines() if '"gateway.stopped"' in line
    ]
    assert len(lines) == 2, "both replicas must log their orderly stop"
    assert answered == ok, f"replicas answered {answered}, clients got {ok} answers ({outcomes})"


def metric_values(url: str, name: str) -> dict[frozenset[tuple[str, str]], float]:
    text = httpx.get(f"{url}/metrics", trust_env=False, timeout=10).text
    return {
        frozenset(s.labels.items()): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == name
    }


def test_heartbeat_and_class_counts_merge_across_replicas(
    settings: Settings, versions: tuple[VersionSpec, VersionSpec], tmp_path: Path
) -> None:
    one, _ = versions
    with two_replicas(settings, tmp_path / "gw.log", one) as (gw, _admin):
        # A fresh connection per heartbeat, so both replicas receive some; the last one is
        # unhealthy and must win on every scrape, whichever replica answers /metrics.
        for _ in range(8):
            with GatewayClient(gw.url, settings.admin_token()) as fresh:
                fresh.watchdog_heartbeat(MODEL, healthy=True, detail="ok")
        last = time.time()
        with GatewayClient(gw.url, settings.admin_token()) as fresh:
            fresh.watchdog_heartbeat(MODEL, healthy=False, detail="error rate 4 %")
        answers = [fresh_predict(gw.url) for _ in range(20)]
        assert {a.status_code for a in answers} == {200}
        key = frozenset({"model": MODEL}.items())
        # Each replica writes its counts every 20 ms (--metrics-flush-ms): wait that out once.
        wait_for(
            lambda: sum(metric_values(gw.url, "ballast_predictions_total").values()) == 20,
            2,
            "/metrics counting the 20 answers",
        )
        for _ in range(6):
            stamps = metric_values(gw.url, "ballast_watchdog_heartbeat_timestamp_seconds")
            assert set(stamps) == {key}, stamps
            assert last <= stamps[key] <= time.time()
            assert metric_values(gw.url, "ballast_watchdog_healthy") == {key: 0.0}
            classes = metric_values(gw.url, "ballast_predictions_total")
            assert sum(classes.values()) == 20, classes
            assert {dict(k)["role"] for k in classes} == {"champion"}


def test_a_sigterm_while_the_workers_start_up_is_a_clean_stop(
    settings: Settings, tmp_path: Path
) -> None:
    # Workers still importing have no SIGTERM handler yet: the SIGTERM the supervisor passes on
    # ends them at once. That is the stop asked for, not a failure (was: exit 1).
    cmd = [sys.executable, "-m", "infra.gateway", "--workers", "2"]
    cmd += ["--host", settings.gateway_host, "--port", str(settings.gateway_port)]
    with (tmp_path / "gw.log").open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and len(children.read_text().split()) < 2:
                time.sleep(0.01)
            workers = [int(p) for p in children.read_text().split()]
            assert len(workers) == 2, "the supervisor never started its workers"
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0, (tmp_path / "gw.log").read_text()
            # and no worker is left: the supervisor reaped both.
            assert all(not Path(f"/proc/{pid}").exists() for pid in workers)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


def test_admin_stats_on_any_replica_carries_every_replicas_counters(
    settings: Settings, versions: tuple[VersionSpec, VersionSpec], tmp_path: Path
) -> None:
    # The champion watchdog reads /admin/stats once per run from whichever replica answers;
    # before, that was one replica's counters only, and a replica failing all its requests
    # was diluted by the healthy ones.
    from ballast.watchdog import observe_replicas

    one, _ = versions
    with two_replicas(settings, tmp_path / "gw.log", one) as (gw, _admin):

        def every_replica() -> dict[str, int]:
            with GatewayClient(gw.url, settings.admin_token()) as fresh:
                stats = fresh.stats()
            mine = {stats["replica"]: stats["versions"][one.version]["requests"]}
            return mine | {
                p["replica"]: p["versions"][one.version]["requests"] for p in stats["replicas"]
            }

        wait_for(lambda: len(every_replica()) == 2, 5, "both replicas on the board")
        with GatewayClient(gw.url, settings.admin_token()) as fresh:
            first = observe_replicas(
                fresh.stats(), model=MODEL, version=one.version, last_snapshot=None
            )
        assert first.first and len(first.snapshot["replicas"]) == 2  # type: ignore[index]
        answers = [fresh_predict(gw.url) for _ in range(40)]
        assert {a.status_code for a in answers} == {200}
        # Each replica's board entry is at most a heartbeat (0.5 s) old: wait for all 40, in
        # the window itself. Read once then again, another replica may answer the second look
        # with the first one's entry a heartbeat older (39 of 40 in one CI run).
        windows = []

        def window_counts_all() -> bool:
            with GatewayClient(gw.url, settings.admin_token()) as fresh:
                windows.append(
                    observe_replicas(
                        fresh.stats(),
                        model=MODEL,
                        version=one.version,
                        last_snapshot=first.snapshot,
                    )
                )
            return windows[-1].requests == 40

        wait_for(window_counts_all, 5, "the board counting all 40")
        window = windows[-1]
        assert (window.requests, window.errors, window.first) == (40, 0, False), window
        assert window.class_counts is not None and sum(window.class_counts.values()) == 40
