"""Fault localisation from a real gateway's real log: two replica processes, a canary with the
``errors`` fault, real HTTP load; then :func:`ballast.localise.localise` on the log file the
gateway process wrote. Bounded (about 10 s), on 127.0.0.1, and the gateway is stopped.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
import pytest

from ballast.gateway_client import GatewayClient
from ballast.gateway_process import GatewayProcess
from ballast.loadgen import run_load
from ballast.localise import localise
from ballast.serving import Deployment
from ballast.settings import Settings
from infra.gateway.testing import build_mlp_onnx, spec_for

pytestmark = pytest.mark.integration

MODEL = "m"


def test_a_faulty_canary_is_localised_from_the_gateways_log(
    settings: Settings, tmp_path: Path
) -> None:
    one = spec_for(build_mlp_onnx(tmp_path / "one.onnx", seed=31), "1")
    two = spec_for(build_mlp_onnx(tmp_path / "two.onnx", seed=32), "2", fault="errors")
    log = tmp_path / "gateway.log"
    rows = np.random.default_rng(5).normal(size=(64, 30)).astype(np.float32)
    start = datetime.now(UTC)
    probes: dict[str, int] = {}
    with (
        GatewayProcess.start(
            settings, log_path=log, workers=2, exit_with_parent=True, timeout=30
        ) as gw,
        GatewayClient(gw.url, settings.admin_token()) as admin,
    ):
        deadline = time.monotonic() + 20
        while len(admin.replicas()["replicas"]) < 2:
            assert time.monotonic() < deadline, "both replicas reporting"
            time.sleep(0.05)
        replica_ids = {r["replica"] for r in admin.replicas()["replicas"]}
        admin.set_deployment(Deployment(model=MODEL, champion=one, canary=two, canary_weight=50))
        # Requests with the client's own ids first: the failing ones must be found by id.
        with httpx.Client(base_url=gw.url, trust_env=False, timeout=10) as http:
            for i in range(40):
                resp = http.post(
                    f"/v1/models/{MODEL}/predict",
                    json={"instances": [rows[i].tolist()]},
                    headers={"X-Request-Id": f"probe-{i}"},
                )
                assert resp.headers["X-Request-Id"] == f"probe-{i}"
                probes[f"probe-{i}"] = resp.status_code
        observations = run_load(
            gw.url, MODEL, rows, concurrency=8, max_requests=1500, max_seconds=8
        )
        # Stopping flushes the last per-second summaries into the log.
        assert gw.stop(timeout=15) == 0
    end = datetime.now(UTC)

    failed_probes = [rid for rid, status in probes.items() if status != 200]
    assert failed_probes and set(probes.values()) <= {200, 500}
    failed_load = sum(1 for o in observations if not o.ok)
    assert all(o.version == "2" for o in observations if not o.ok)
    assert failed_load > 50

    report = localise(log, MODEL, "2", start, end, metric="error_rate")
    assert report.failures == failed_load + len(failed_probes), "every failure is accounted for"
    assert report.logged < report.failures, "a 30 % fault under load is summarised, not flooded"
    assert report.reasons == {"injected_fault": report.failures}
    assert report.statuses == {500: report.failures}
    assert report.roles == {"canary": report.failures}
    assert {r.replica for r in report.replicas} <= replica_ids
    assert sum(r.share for r in report.replicas) == pytest.approx(1.0)
    assert report.first_failure is not None and start <= report.first_failure <= end
    assert report.first_request_ids[: len(failed_probes)] == tuple(failed_probes)
    assert any('"request.failed"' in line for line in report.context)
    md = report.to_markdown()
    assert "**Metric that broke:** error_rate" in md and failed_probes[0] in md
    # The champion never failed.
    assert not localise(log, MODEL, "1", start, end).failed
