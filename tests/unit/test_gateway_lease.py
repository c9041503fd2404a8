"""A canary or shadow with a lease: when the controller stops renewing it, every replica drops
the trial by itself and serves the champion alone (in-process apps, real ONNX artefacts)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from pydantic import ValidationError
from starlette.testclient import TestClient

from ballast.serving import Deployment, VersionSpec
from infra.gateway.app import GatewayConfig, create_app
from infra.gateway.desired import FileDesiredState, ReplicaBoard
from infra.gateway.testing import build_mlp_onnx, spec_for

TOKEN = "lease-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MODEL = "m"
ROW = [0.1] * 30


@pytest.fixture(scope="module")
def specs(tmp_path_factory: pytest.TempPathFactory) -> tuple[VersionSpec, VersionSpec]:
    root = tmp_path_factory.mktemp("lease")
    return (
        spec_for(build_mlp_onnx(root / "a.onnx", seed=1), "1"),
        spec_for(build_mlp_onnx(root / "b.onnx", seed=2), "2"),
    )


def wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def served(client: TestClient, n: int = 20) -> set[str]:
    out = set()
    for _ in range(n):
        resp = client.post(f"/v1/models/{MODEL}/predict", json={"instances": [ROW]})
        assert resp.status_code == 200, resp.text
        out.add(resp.headers["X-Ballast-Version"])
    return out


def leased(one: VersionSpec, two: VersionSpec, seconds: float, **kw: object) -> Deployment:
    return Deployment(
        model=MODEL,
        champion=one,
        canary=two,
        canary_weight=50,
        lease_expires_at=time.time() + seconds,
        **kw,  # type: ignore[arg-type]
    )


def test_an_unrenewed_canary_lease_leaves_the_champion_alone(
    specs: tuple[VersionSpec, VersionSpec],
) -> None:
    one, two = specs
    app = create_app(GatewayConfig(admin_token=TOKEN, lease_check_s=0.05, seed=3))
    with TestClient(app) as gw:
        # Leases of seconds, so a stalled CI machine cannot let one run out between two lines.
        dep = leased(one, two, 3.0)
        assert gw.put("/admin/deployment", content=dep.model_dump_json(), headers=AUTH).is_success
        assert served(gw, 40) == {"1", "2"}
        # A renewal (same trial, later expiry) keeps it going past the first expiry.
        renewed = dep.model_copy(update={"lease_expires_at": time.time() + 6.0})
        assert gw.put(
            "/admin/deployment", content=renewed.model_dump_json(), headers=AUTH
        ).is_success
        assert dep.lease_expires_at is not None
        time.sleep(max(0.0, dep.lease_expires_at + 0.5 - time.time()))
        assert gw.get("/admin/deployment", headers=AUTH).json()["canary"] is not None
        wait_for(
            lambda: gw.get("/admin/deployment", headers=AUTH).json()["canary"] is None, timeout=15
        )
        now = Deployment.model_validate(gw.get("/admin/deployment", headers=AUTH).json())
        assert now == Deployment(model=MODEL, champion=one)
        assert served(gw, 40) == {"1"}
        metrics = gw.get("/metrics").text
        assert f'ballast_deployments_total{{model="{MODEL}",result="lease_expired"}} 1.0' in metrics


def test_a_lease_that_already_ran_out_is_refused(specs: tuple[VersionSpec, VersionSpec]) -> None:
    one, two = specs
    app = create_app(GatewayConfig(admin_token=TOKEN))
    with TestClient(app) as gw:
        body = json.loads(leased(one, two, 5).model_dump_json())
        body["lease_expires_at"] = time.time() - 1
        resp = gw.put("/admin/deployment", json=body, headers=AUTH)
        assert resp.status_code == 422 and "lease" in resp.json()["error"]
        assert gw.get("/admin/deployment", headers=AUTH).json() is None


def test_only_a_trial_can_hold_a_lease(specs: tuple[VersionSpec, VersionSpec]) -> None:
    one, _ = specs
    with pytest.raises(ValidationError, match="lease"):
        Deployment(model=MODEL, champion=one, lease_expires_at=time.time() + 60)


def test_replicas_drop_an_expired_trial_and_record_it_once_in_the_source(
    specs: tuple[VersionSpec, VersionSpec], tmp_path: Path
) -> None:
    one, two = specs
    desired, board = tmp_path / "desired.json", tmp_path / "replicas"

    def replica(name: str) -> TestClient:
        return TestClient(
            create_app(
                GatewayConfig(admin_token=TOKEN, replica_id=name, lease_check_s=0.05),
                source=FileDesiredState(desired, poll_interval_s=0.05),
                board=ReplicaBoard(board),
            )
        )

    with replica("r1") as r1, replica("r2") as r2:
        wait_for(lambda: len(ReplicaBoard(board).live()) == 2)
        # A lease of seconds: it must outlast the PUT, r2 converging and r2's GET on a stalled
        # CI machine.
        dep = leased(one, two, 4.0, shadow=None)
        assert r1.put("/admin/deployment", content=dep.model_dump_json(), headers=AUTH).is_success
        assert r2.get("/admin/deployment", headers=AUTH).json()["canary"]["version"] == "2"
        for r in (r1, r2):
            wait_for(
                lambda r=r: r.get("/admin/deployment", headers=AUTH).json()["canary"] is None,
                timeout=15,
            )
        doc = json.loads(desired.read_text())
        assert doc["deployment"]["canary"] is None and doc["deployment"]["lease_expires_at"] is None
        # Recorded by a replica (both may, racing: the same content twice is harmless).
        assert doc["updated_by"] == "gateway:lease-expired" and doc["revision"] >= 2

    # A source still holding an expired lease (say the gateway was down when it ran out): a
    # replica starting now serves the champion alone, never the trial.
    FileDesiredState(desired).publish(leased(one, two, 0.3), actor="test")
    time.sleep(0.4)
    with replica("r3") as r3:
        dep_now = r3.get("/admin/deployment", headers=AUTH).json()
        assert dep_now["canary"] is None and dep_now["champion"]["version"] == "1"
        assert served(r3, 20) == {"1"}
        assert r3.get("/readyz").status_code == 200


def test_without_a_source_a_replica_is_ready_again_as_soon_as_a_lease_runs_out(
    specs: tuple[VersionSpec, VersionSpec],
) -> None:
    # Given a replica with no desired-state source serving a leased canary ...
    one, two = specs
    app = create_app(GatewayConfig(admin_token=TOKEN, lease_check_s=0.05, seed=3))
    with TestClient(app) as gw:
        dep = leased(one, two, 0.5)
        assert gw.put("/admin/deployment", content=dep.model_dump_json(), headers=AUTH).is_success
        assert gw.get("/readyz").status_code == 200
        # ... when the lease runs out, the champion alone is what it should serve: ready.
        wait_for(lambda: gw.get("/admin/deployment", headers=AUTH).json()["canary"] is None)
        ready = gw.get("/readyz")
        assert ready.status_code == 200, f"unready after the lease ran out: {ready.json()}"
        assert ready.json()["versions"] == {"1": "champion"}
        assert gw.get("/v2/health/ready").status_code == 200
        view = gw.get("/admin/replicas", headers=AUTH).json()["this"]
        assert (
            view["desired"]
            == view["fingerprint"]
            == Deployment(model=MODEL, champion=one).fingerprint()
        )


def test_with_a_source_readiness_holds_the_moment_a_lease_is_dropped(
    specs: tuple[VersionSpec, VersionSpec], tmp_path: Path
) -> None:
    # Given a replica following a file source (polled once a second) and serving a leased
    # canary; the lease loop is slowed down so that the test drops the trial itself.
    one, two = specs
    source = FileDesiredState(tmp_path / "desired.json", poll_interval_s=1.0)
    app = create_app(GatewayConfig(admin_token=TOKEN, lease_check_s=60), source=source)
    with TestClient(app) as gw:
        dep = leased(one, two, 60)
        assert gw.put("/admin/deployment", content=dep.model_dump_json(), headers=AUTH).is_success
        gateway = app.state.gateway
        # When the trial is dropped (what the lease loop does at expiry) ...
        assert gw.portal is not None
        gw.portal.call(gateway.expire_lease, dep)
        # ... the replica is ready at once, not only after its next poll of the source.
        ready = gw.get("/readyz")
        assert ready.status_code == 200, f"unready until the next poll: {ready.json()}"
        assert source.read() == Deployment(model=MODEL, champion=one)
