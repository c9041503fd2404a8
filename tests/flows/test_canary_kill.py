"""Kill the flow process in the middle of its canary: the champion serves 100 % again.

The release flow runs in a child process (its own Python, talking to this session's Prefect test
server); once the gateway shows its canary taking traffic, the child is SIGKILLed — no Python
cleanup, no Prefect hook, no ``finally`` runs. The canary's lease, no longer renewed, runs out and
the gateway drops the canary by itself. Nothing in the registry moved.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from ballast.gateway_client import GatewayClient
from ballast.release import ALIAS_CHAMPION
from ballast.serving import Deployment
from ballast.settings import Settings
from flows.release import release_flow
from model_registry import Registry

pytestmark = pytest.mark.flow

LEASE_S = 3.0
ROW = [0.5] * 30


def _deployment(s: Settings) -> Deployment | None:
    with GatewayClient(s.gateway_url, s.admin_token()) as gw:
        return gw.get_deployment()


def test_killing_the_flow_mid_canary_leaves_the_champion_at_100_percent(
    release_env: Settings, tmp_path: Path
) -> None:
    from prefect.settings import PREFECT_API_URL

    s = release_env
    first = release_flow()
    assert first.outcome == "promoted", first
    reg = Registry(s.tracking_uri, s.artifact_root)
    versions_before = {v.version for v in reg.list_versions(s.model_name)}

    env = {
        **os.environ,
        "PREFECT_API_URL": str(PREFECT_API_URL.value()),
        "BALLAST_CANARY_LEASE_S": str(LEASE_S),
        # A canary that cannot finish on its own: it waits for samples it will never get.
        "BALLAST_CANARY_MIN_SAMPLES": "1000000",
        "BALLAST_CANARY_STEP_MAX_SECONDS": "300",
        "BALLAST_CANARY_CONCURRENCY": "2",
        # A release of its own, not a rerun of the champion (which would change nothing).
        "BALLAST_LEARNING_RATE": repr(3e-3 * (1 + 1e-6)),
    }
    log = tmp_path / "flow.log"
    with open(log, "wb") as out:
        child = subprocess.Popen(
            [sys.executable, "-c", "from flows.release import release_flow; release_flow()"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 150
        while True:
            dep = _deployment(s)
            if dep is not None and dep.canary is not None:
                break
            assert child.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the child never started its canary"
            time.sleep(0.2)
        assert dep.lease_expires_at is not None, "the canary must hold a lease"
        candidate = dep.canary.version
        assert candidate not in versions_before
        time.sleep(0.5)  # it is really serving
        os.killpg(child.pid, signal.SIGKILL)
        killed = time.monotonic()
        child.wait(10)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait(10)

    deadline = killed + LEASE_S + 5
    while (dep := _deployment(s)) is not None and dep.canary is not None:
        assert time.monotonic() < deadline, f"the canary outlived its lease: {dep}"
        time.sleep(0.1)
    dropped_after = time.monotonic() - killed
    assert dep is not None and dep.champion is not None
    assert dep.champion.version == first.version and dep.lease_expires_at is None
    with httpx.Client(base_url=s.gateway_url, trust_env=False, timeout=10) as http:
        seen = {
            http.post(f"/v1/models/{s.model_name}/predict", json={"instances": [ROW]}).headers[
                "X-Ballast-Version"
            ]
            for _ in range(50)
        }
    assert seen == {first.version}
    champion = reg.get_by_alias(s.model_name, ALIAS_CHAMPION)
    assert champion is not None and champion.version == first.version, "no alias moved"
    assert dropped_after <= LEASE_S + 5
    print(f"canary dropped {dropped_after:.2f} s after the flow process was killed")
