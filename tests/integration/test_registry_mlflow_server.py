"""The registry facade against a real ``mlflow server`` over HTTP (not the embedded sqlite store).

The server is a separate process on 127.0.0.1 with its own sqlite backend and artefact folder;
the client reaches it only through its REST API and artefact proxy. Everything the release flow
asks of the registry is exercised: registration with artefacts and a signed manifest, tags, the
typed approval record, look-ups, downloads that verify, alias moves and their rollback.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from ballast.manifest import SignedManifest, build_manifest, sign_manifest, verify_manifest
from model_registry import CANDIDATE, CHAMPION, PREVIOUS, ApprovalRecord, Registry
from tests.conftest import free_port

pytestmark = pytest.mark.integration

NAME = "served-model"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    served = root / "server-artifacts"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{root / 'server.db'}",
            "--artifacts-destination",
            str(served),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        stdout=open(root / "server.log", "wb"),  # noqa: SIM115 - closed with the process
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (root / "server.log").read_text()[-3000:]
            try:
                if httpx.get(f"{url}/health", timeout=2, trust_env=False).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "mlflow server did not become healthy"
            time.sleep(0.5)
        yield url, served
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _artefacts(root: Path, tag: str, key: Path) -> Path:
    d = root / f"artefacts-{tag}"
    d.mkdir(parents=True)
    (d / "model.ort.onnx").write_bytes(f"onnx {tag}".encode() * 50)
    (d / "state_dict.pt").write_bytes(f"weights {tag}".encode())
    manifest = build_manifest(
        d, model_name=NAME, dataset_sha256="cd" * 32, backend="onnxruntime", precision="fp32"
    )
    sign_manifest(manifest, key).write(d)
    return d


def test_the_release_flows_registry_calls_work_over_http(
    server: tuple[str, Path], tmp_path: Path
) -> None:
    url, served = server
    local_root = tmp_path / "client-artifacts"
    reg = Registry(url, local_root)
    assert reg.remote
    key = tmp_path / "signing.pem"

    versions = []
    for tag in ("a", "b"):
        info = reg.register_version(
            NAME,
            artifact_dir=_artefacts(tmp_path, tag, key),
            params={"hidden": 64},
            metrics={"accuracy": 0.97},
            metric_history={"epoch_val_loss": [(1, 0.5), (2, 0.4)]},
            tags={"ballast.content_key": tag * 64, "ballast.dataset": "d"},
        )
        versions.append(info.version)
    assert versions == ["1", "2"]
    # The artefacts went through the server's proxy to its folder, none to the client's.
    assert not local_root.exists() or not any(local_root.rglob("*"))
    assert any(p.name == "model.ort.onnx" for p in served.rglob("*"))

    assert [v.version for v in reg.find_by_tag(NAME, "ballast.content_key", "b" * 64)] == ["2"]
    assert reg.version_metrics(NAME, "2")["accuracy"] == pytest.approx(0.97)
    assert reg.metric_history(NAME, "2", "epoch_val_loss") == [(1, 0.5), (2, 0.4)]

    # A download from the server verifies against the signing key; a tampered copy does not.
    got = reg.download(NAME, "1", tmp_path / "dl")
    verify_manifest(SignedManifest.read(got), key, got)
    weights = (got / "state_dict.pt").read_bytes()
    (got / "state_dict.pt").write_bytes(weights[:-1] + bytes([weights[-1] ^ 1]))
    with pytest.raises(Exception, match="content changed"):
        verify_manifest(SignedManifest.read(got), key, got)

    # The release flow's copy: kept under the cache, fetched once, nothing left in TMPDIR.
    cache = tmp_path / "state" / "versions"
    temp_before = set(Path(tempfile.gettempdir()).glob("ballast-model-*"))
    dead, live = cache / NAME / ".1.partial-dead", cache / NAME / ".1.partial-live"
    for folder in (dead, live):  # left by processes killed mid-download, long ago and just now
        folder.mkdir(parents=True)
    os.utime(dead, (time.time() - 7200, time.time() - 7200))
    kept = reg.local_copy(NAME, "1", cache)
    assert kept == cache / NAME / "1"
    verify_manifest(SignedManifest.read(kept), key, kept)
    stamp = (kept / "state_dict.pt").stat().st_mtime_ns
    assert reg.local_copy(NAME, "1", cache) == kept
    assert (kept / "state_dict.pt").stat().st_mtime_ns == stamp, "fetched again"
    assert sorted(p.name for p in (cache / NAME).iterdir()) == [".1.partial-live", "1"]
    assert set(Path(tempfile.gettempdir()).glob("ballast-model-*")) == temp_before

    record = ApprovalRecord("approved", "alice", datetime(2026, 11, 27, 5, tzinfo=UTC), "fine")
    reg.set_approval(NAME, "2", record)
    assert reg.get_approval(NAME, "2") == record

    reg.set_alias(NAME, CANDIDATE, "1")
    reg.promote(NAME, "1")
    reg.set_alias(NAME, CANDIDATE, "2")
    moved = reg.promote(NAME, "2")
    assert moved.previous_champion == "1" and moved.candidate_cleared
    assert reg.get_by_alias(NAME, CHAMPION).version == "2"  # type: ignore[union-attr]
    assert reg.get_by_alias(NAME, PREVIOUS).version == "1"  # type: ignore[union-attr]
    assert reg.get_by_alias(NAME, CANDIDATE) is None
    back = reg.rollback_to_previous(NAME)
    assert back.version == "1" and reg.get_by_alias(NAME, PREVIOUS) is None
    # A second client (another process would be the same) sees the same registry.
    other = Registry(url, tmp_path / "elsewhere")
    assert other.get_by_alias(NAME, CHAMPION).version == "1"  # type: ignore[union-attr]
    assert [v.version for v in other.list_versions(NAME)] == ["1", "2"]


def test_kept_copies_are_pruned_to_the_aliased_and_recently_used(
    server: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One folder per version ever released filled the disk: each use of a copy removes the
    model's copies that no alias names, that are not among the KEEP_COPIES most recently used
    and that nothing used within the last hour."""
    from model_registry import registry as registry_module

    url, _ = server
    reg = Registry(url, tmp_path / "unused")
    key = tmp_path / "signing.pem"
    model = "pruned-model"
    for tag in ("a", "b"):
        reg.register_version(
            model,
            artifact_dir=_artefacts(tmp_path / model, tag, key),
            params={},
            metrics={},
            tags={},
        )
    reg.set_alias(model, CHAMPION, "1")
    cache = tmp_path / "versions"
    folder = cache / model
    now = time.time()
    # Copies earlier releases left: 10..19 last used 2..11 hours ago, 30 five minutes ago.
    ages = {str(10 + i): 7200.0 + 3600 * i for i in range(10)} | {"30": 300.0}
    for version, age in [("1", 9e4), *ages.items()]:
        (folder / version).mkdir(parents=True)
        (folder / version / "w").write_bytes(b"x")
        os.utime(folder / version, (now - age, now - age))
    other = cache / "another-model" / "3"  # another model's copies are not this one's to prune
    other.mkdir(parents=True)
    os.utime(other, (now - 9e4, now - 9e4))

    got = reg.local_copy(model, "2", cache)
    assert got == folder / "2"
    kept = sorted((p.name for p in folder.iterdir() if not p.name.startswith(".")), key=int)
    recent = sorted(ages, key=ages.__getitem__)[: registry_module.KEEP_COPIES]
    # "1": the champion alias names it (however old); "2": just used; "30": used 5 min ago.
    assert kept == sorted({"1", "2", "30", *recent}, key=int)
    assert "19" not in kept and other.is_dir()
    # Reuse marks a copy used; with no copies kept by count, what an hour saw used stays.
    monkeypatch.setattr(registry_module, "KEEP_COPIES", 0)
    assert reg.local_copy(model, "1", cache) == folder / "1"
    assert (folder / "1").stat().st_mtime >= now - 5
    assert sorted(p.name for p in folder.iterdir()) == ["1", "2", "30"]


def test_a_gateway_follows_the_registry_on_the_server(
    server: tuple[str, Path], tmp_path: Path
) -> None:
    """The registry-backed desired state, read from the real server: the champion alias and the
    canary weight tag decide what a gateway serves, after the manifest verified."""
    from starlette.testclient import TestClient

    from infra.gateway.app import GatewayConfig, create_app
    from infra.gateway.registry_source import TAG_CANARY_WEIGHT, RegistryDesiredState

    url, _ = server
    reg = Registry(url, tmp_path / "unused")
    key = tmp_path / "signing.pem"
    model = "gateway-model"
    _register_mlps(reg, model, key, tmp_path)
    reg.set_alias(model, CHAMPION, "1")
    reg.set_alias(model, CANDIDATE, "2")
    reg.set_tags(model, "2", {TAG_CANARY_WEIGHT: "30"})

    source = RegistryDesiredState(reg, model, key, poll_interval_s=0.2)
    dep = source.read()
    assert dep is not None and dep.champion is not None and dep.canary is not None
    assert (dep.champion.version, dep.canary.version, dep.canary_weight) == ("1", "2", 30)

    app = create_app(GatewayConfig(admin_token="t", seed=5), source=source)
    with TestClient(app) as gw:
        assert gw.get("/readyz").status_code == 200
        seen = {
            gw.post(f"/v1/models/{model}/predict", json={"instances": [[0.5] * 30]}).headers[
                "X-Ballast-Version"
            ]
            for _ in range(60)
        }
        assert seen == {"1", "2"}


def test_if_match_writes_of_gateways_on_different_machines_take_turns(
    server: tuple[str, Path], tmp_path: Path
) -> None:
    """Four registry-backed sources, each with its own client and no file lock (gateway pods on
    four machines), make the same conditional change at the same moment, three times: the
    registry's lock lets exactly one through each time, and the others see its change."""
    import threading

    from ballast.serving import Deployment
    from infra.gateway.registry_source import TAG_CANARY_WEIGHT, RegistryDesiredState

    url, _ = server
    key = tmp_path / "signing.pem"
    model = "gateway-race-model"
    first = Registry(url, tmp_path / "unused")
    _register_mlps(first, model, key, tmp_path)
    first.set_alias(model, CHAMPION, "1")
    first.set_alias(model, CANDIDATE, "2")
    first.set_tags(model, "2", {TAG_CANARY_WEIGHT: "5"})
    pods = [RegistryDesiredState(Registry(url, tmp_path / "unused"), model, key) for _ in range(4)]
    for weight in (10, 20, 30):
        before = pods[0].read()
        assert before is not None and before.canary is not None
        start = threading.Barrier(len(pods))
        won: list[int] = []
        errors: list[BaseException] = []

        def change(
            i: int,
            pod: RegistryDesiredState,
            before: Deployment = before,
            start: threading.Barrier = start,
            won: list[int] = won,
            errors: list[BaseException] = errors,
            w: int = weight,
        ) -> None:
            try:
                start.wait(30)
                asked = before.model_copy(update={"canary_weight": w + i})
                if pod.replace_if(before, asked, actor=f"pod{i}"):
                    won.append(i)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=change, args=(i, p)) for i, p in enumerate(pods)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert errors == [] and len(won) == 1, (won, errors)
        assert first.get_version(model, "2").tags[TAG_CANARY_WEIGHT] == str(weight + won[0])


def test_the_registry_lock_over_http_lets_one_holder_in_at_a_time(
    server: tuple[str, Path], tmp_path: Path
) -> None:
    import functools

    from tests.unit.test_registry_write_lock import most_inside_at_once

    url, _ = server
    guards = [
        functools.partial(
            Registry(url, tmp_path / "unused").exclusive,
            "http-lock",
            holder=f"m{i}",
            timeout_s=60,
            busy=TimeoutError(),
        )
        for i in range(2)
    ]
    assert most_inside_at_once(guards, rounds=3, hold_s=0.05) == (1, [0, 0, 0, 1, 1, 1])


def _register_mlps(reg: Registry, model: str, key: Path, root: Path) -> None:
    """Versions 1 and 2 of ``model``: two different MLPs, each with a signed manifest."""
    from ballast.hashing import sha256_file
    from infra.gateway.testing import build_mlp_onnx

    for seed in (1, 2):
        d = root / f"onnx-{seed}"
        onnx = build_mlp_onnx(d / "model.onnx", seed=seed)
        manifest = build_manifest(
            d, model_name=model, dataset_sha256="cd" * 32, backend="onnxruntime", precision="fp32"
        )
        sign_manifest(manifest, key).write(d)
        reg.register_version(
            model,
            artifact_dir=d,
            params={},
            metrics={},
            tags={"ballast.artifact": onnx.name, "ballast.artifact_sha256": sha256_file(onnx)},
        )


def test_a_canary_promotes_and_a_rollback_returns_through_registry_backed_replicas(
    server: tuple[str, Path], tmp_path: Path
) -> None:
    """The Kubernetes shape: gateway replicas follow the registry, each with its own copy of
    the artefacts, and the release flow runs elsewhere (its artefact paths mean nothing to
    them). A whole canary, its promotion and a rollback go through the admin API."""
    from functools import partial

    from starlette.testclient import TestClient

    from ballast.canary import ShadowPolicy, ShadowStats, run_canary
    from ballast.errors import GatewayError, IntegrityError
    from ballast.judge import Observation, ThresholdJudge
    from ballast.serving import Deployment, if_match_header
    from ballast.settings import Settings
    from infra.gateway.app import GatewayConfig, create_app
    from infra.gateway.desired import ReplicaBoard
    from infra.gateway.registry_source import RegistryDesiredState
    from tasks.canary import promotion, trial_aliases, version_spec

    url, _ = server
    model = "k8s-model"
    key = tmp_path / "signing.pem"
    flow_reg = Registry(url, tmp_path / "flow-pod")
    _register_mlps(flow_reg, model, key, tmp_path)
    flow_reg.set_alias(model, CHAMPION, "1")
    flow_reg.set_alias(model, CANDIDATE, "2")

    # The release flow's view: verified specs at paths only its own pod could read.
    s = Settings(model_name=model, signing_key_path=key, state_dir=tmp_path / "flow-state")

    def flow_spec(version: str) -> object:
        info = flow_reg.get_version(model, version)
        local = version_spec(flow_reg, s, info)
        return local.model_copy(update={"artifact_path": f"/flow-pod/{version}/model.onnx"})

    champion, candidate = flow_spec("1"), flow_spec("2")
    # Its copies are kept in its state folder; a copy that no longer verifies is removed, and
    # the next look fetches it again.
    kept = s.state_dir / "versions" / model / "1"
    artefact = kept / "model.onnx"
    good = artefact.read_bytes()
    artefact.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    with pytest.raises(IntegrityError):
        version_spec(flow_reg, s, flow_reg.get_version(model, "1"))
    assert not kept.exists()
    assert flow_spec("1") == champion and artefact.read_bytes() == good
    board = tmp_path / "replicas"

    def replica(name: str) -> TestClient:
        source = RegistryDesiredState(
            Registry(url, tmp_path / f"pod-{name}"), model, key, poll_interval_s=0.1
        )
        config = GatewayConfig(admin_token="t", replica_id=name, converge_timeout_s=10.0)
        return TestClient(create_app(config, source=source, board=ReplicaBoard(board)))

    auth = {"Authorization": "Bearer t"}

    class Admin:  # the controller's two calls, over the first replica's admin API
        def __init__(self, gw: TestClient) -> None:
            self.gw = gw
            self.replicas: list[str] = []

        def get_deployment(self) -> Deployment | None:
            body = self.gw.get("/admin/deployment", headers=auth).json()
            return None if body is None else Deployment.model_validate(body)

        def set_deployment(
            self, dep: Deployment, *, expect: Sequence[Deployment | None] = ()
        ) -> Deployment:
            headers = dict(auth)
            if expect:
                headers["If-Match"] = if_match_header(expect)
            r = self.gw.put("/admin/deployment", headers=headers, content=dep.model_dump_json())
            if r.status_code != 200:
                raise GatewayError(f"{r.status_code}: {r.text}")
            self.replicas.append(r.headers["X-Ballast-Replicas"])
            return Deployment.model_validate(r.json())

    def served(gw: TestClient, n: int = 40) -> set[str]:
        body = {"instances": [[0.5] * 30]}
        return {
            gw.post(f"/v1/models/{model}/predict", json=body).headers["X-Ballast-Version"]
            for _ in range(n)
        }

    with replica("a") as a, replica("b") as b:
        deadline = time.monotonic() + 30
        while not (a.get("/readyz").status_code == b.get("/readyz").status_code == 200):
            assert time.monotonic() < deadline, (a.get("/readyz").json(), b.get("/readyz").json())
            time.sleep(0.1)
        assert served(b) == {"1"}
        admin = Admin(a)

        def load(weight: int) -> list[Observation]:
            out = []
            for gw in (a, b):
                for _ in range(20):
                    t = time.perf_counter()
                    r = gw.post(f"/v1/models/{model}/predict", json={"instances": [[0.5] * 30]})
                    version = r.headers["X-Ballast-Version"]
                    out.append(Observation(version, r.status_code == 200, time.perf_counter() - t))
            return out

        def shadow_stats() -> ShadowStats:
            return ShadowStats.from_report(a.get("/admin/shadow", headers=auth).json())

        with trial_aliases(flow_reg, model, "2", shadow=True):
            result = run_canary(
                admin,
                model=model,
                champion=champion,  # type: ignore[arg-type]
                candidate=candidate,  # type: ignore[arg-type]
                steps=(50, 100),
                judge=ThresholdJudge(min_samples=5, latency_slack_ms=1000.0),  # mechanics only
                load=load,
                min_samples=5,
                step_max_seconds=20,
                # Two different MLPs: they may disagree; this checks the mechanics.
                shadow=ShadowPolicy(seconds=1.0, max_disagreement=1.0, min_rows=5),
                shadow_reader=shadow_stats,
                promote=partial(promotion, flow_reg, model, "2"),
            )
        assert result.promoted, result.reasons
        assert result.steps[0].weight == 0 and result.steps[0].canary_n >= 5  # the shadow ran
        assert flow_reg.get_by_alias(model, "shadow") is None
        # Every PUT was taken by both replicas, though each loaded its own copies.
        assert admin.replicas and set(admin.replicas) == {"2/2"}, admin.replicas
        assert flow_reg.get_by_alias(model, CHAMPION).version == "2"  # type: ignore[union-attr]
        assert flow_reg.get_by_alias(model, PREVIOUS).version == "1"  # type: ignore[union-attr]
        assert flow_reg.get_by_alias(model, CANDIDATE) is None
        assert served(a) == served(b) == {"2"}
        live = admin.get_deployment()
        assert live is not None and live.champion is not None and live.canary is None
        assert live.champion.version == "2" and not live.champion.artifact_path.startswith(
            "/flow-pod/"
        )

        # A rollback: the registry first, then the gateway (tasks.rollback's order).
        flow_reg.rollback_to_previous(model)
        admin.set_deployment(Deployment(model=model, champion=champion))  # type: ignore[arg-type]
        assert served(a) == served(b) == {"1"}

        # A PUT naming a version's artefact by another sha256 is refused, and changes nothing.
        forged = champion.model_copy(update={"sha256": "ab" * 32})  # type: ignore[attr-defined]
        r = a.put(
            "/admin/deployment",
            headers=auth,
            content=Deployment(model=model, champion=forged).model_dump_json(),
        )
        assert r.status_code == 409 and "sha256" in r.text, r.text
        assert served(a) == {"1"}
