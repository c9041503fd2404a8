"""Conditional deployment changes: ``PUT /admin/deployment`` with ``If-Match`` applies only over
the deployment the sender saw (in-process apps, real ONNX artefacts; a real file source)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from ballast.serving import Deployment, VersionSpec, deployment_etag, precondition_holds
from infra.gateway.app import GatewayConfig, _default_loader, create_app, parse_if_match
from infra.gateway.desired import FileDesiredState
from infra.gateway.testing import build_mlp_onnx, spec_for

TOKEN = "if-match-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MODEL = "m"
ROW = [0.1] * 30


@pytest.fixture(scope="module")
def specs(tmp_path_factory: pytest.TempPathFactory) -> tuple[VersionSpec, VersionSpec, VersionSpec]:
    root = tmp_path_factory.mktemp("if-match")
    return (
        spec_for(build_mlp_onnx(root / "a.onnx", seed=1), "1"),
        spec_for(build_mlp_onnx(root / "b.onnx", seed=2), "2"),
        spec_for(build_mlp_onnx(root / "c.onnx", seed=3), "3"),
    )


def put(gw: TestClient, dep: Deployment, if_match: str | None = None) -> Any:
    headers = dict(AUTH)
    if if_match is not None:
        headers["If-Match"] = if_match
    return gw.put("/admin/deployment", content=dep.model_dump_json(), headers=headers)


def served(gw: TestClient, n: int = 10) -> set[str]:
    return {
        gw.post(f"/v1/models/{MODEL}/predict", json={"instances": [ROW]}).headers[
            "X-Ballast-Version"
        ]
        for _ in range(n)
    }


def test_parse_if_match() -> None:
    assert parse_if_match("*") == {"*"}
    assert parse_if_match('"a"') == {"a"}
    assert parse_if_match(' "a" , "b" ') == {"a", "b"}
    assert parse_if_match('W/"a"') == {'W/"a"'}  # weak: never equal to a strong tag
    for bad in ("", "a", '"a" "b"', '"a",,"b"', '"a b"'):
        assert parse_if_match(bad) == frozenset(), bad


def test_precondition_holds_on_the_desired_state_as_served(
    specs: tuple[VersionSpec, ...],
) -> None:
    one, two, _ = specs
    champ = Deployment(model=MODEL, champion=one)
    now = time.time()
    trial = Deployment(
        model=MODEL, champion=one, canary=two, canary_weight=10, lease_expires_at=now + 60
    )
    expired = trial.model_copy(update={"lease_expires_at": now - 1})
    tag = deployment_etag
    assert precondition_holds(frozenset({"none"}), None, now)
    assert not precondition_holds(frozenset({"none"}), champ, now)
    assert precondition_holds(frozenset({tag(champ)}), champ, now)
    assert precondition_holds(frozenset({"x", tag(trial)}), trial, now)
    assert not precondition_holds(frozenset({tag(champ)}), trial, now)
    assert precondition_holds(frozenset({"*"}), trial, now)
    # A trial whose lease ran out is what the gateway serves of it: the champion alone. Its
    # controller can no longer renew it; a release that saw the champion alone may begin.
    assert precondition_holds(frozenset({tag(champ)}), expired, now)
    assert not precondition_holds(frozenset({tag(expired)}), expired, now)
    # Paths aside (each replica keeps its own copy): the tag is the content's.
    moved = champ.model_copy(
        update={"champion": one.model_copy(update={"artifact_path": "/elsewhere/a.onnx"})}
    )
    assert tag(moved) == tag(champ)


def test_a_change_applies_only_over_the_deployment_its_sender_saw(
    specs: tuple[VersionSpec, ...],
) -> None:
    one, two, three = specs
    first = Deployment(model=MODEL, champion=one)
    with TestClient(create_app(GatewayConfig(admin_token=TOKEN))) as gw:
        got = gw.get("/admin/deployment", headers=AUTH)
        assert got.json() is None and got.headers["ETag"] == '"none"'
        assert put(gw, first, '"none"').status_code == 200
        etag = gw.get("/admin/deployment", headers=AUTH).headers["ETag"]
        assert etag == f'"{deployment_etag(first)}"'

        # Two senders that both saw nothing deployed: the second is refused, nothing changes.
        second = Deployment(model=MODEL, champion=two)
        refused = put(gw, second, '"none"')
        assert refused.status_code == 412, refused.text
        assert "the one in force stays" in refused.json()["error"]
        assert refused.headers["ETag"] == etag
        assert served(gw) == {"1"}
        assert gw.get("/admin/deployment", headers=AUTH).json()["champion"]["version"] == "1"

        # Over the tag it read, a change applies; a list matches any of its tags; * anything.
        assert put(gw, second, f'"0123456789abcdef", {etag}').status_code == 200
        assert served(gw) == {"2"}
        assert put(gw, Deployment(model=MODEL, champion=three), "*").status_code == 200
        assert (
            put(
                gw, first, 'W/"' + deployment_etag(Deployment(model=MODEL, champion=three)) + '"'
            ).status_code
            == 412
        )
        bad = put(gw, first, "not-a-tag")
        assert bad.status_code == 400 and "If-Match" in bad.json()["error"]
        assert served(gw) == {"3"}
        # Without If-Match a change applies as before.
        assert put(gw, first).status_code == 200


def test_a_change_that_loses_the_race_while_loading_is_undone_and_the_winner_stays(
    specs: tuple[VersionSpec, ...], tmp_path: Path
) -> None:
    one, two, three = specs
    source = FileDesiredState(tmp_path / "desired.json", poll_interval_s=1.0)
    start = Deployment(model=MODEL, champion=one)
    source.publish(start, actor="test")
    winner = Deployment(model=MODEL, champion=three)

    def loader(path: Path, backend: str, threads: int) -> Any:
        # While this replica loads version 2, another replica publishes version 3 (its
        # If-Match saw version 1 too): the check before the load passed, the write must not.
        if Path(path).read_bytes() == Path(two.artifact_path).read_bytes():
            source.publish(winner, actor="the other replica")
        return _default_loader(path, backend, threads)

    app = create_app(GatewayConfig(admin_token=TOKEN), loader=loader, source=source)
    with TestClient(app) as gw:
        assert served(gw) == {"1"}
        etag = gw.get("/admin/deployment", headers=AUTH).headers["ETag"]
        resp = put(gw, Deployment(model=MODEL, champion=two), etag)
        assert resp.status_code == 412, resp.text
        assert resp.headers["ETag"] == f'"{deployment_etag(winner)}"'
        # The source keeps the winner, and this replica never went on serving the loser.
        assert source.read() == winner
        assert "2" not in served(gw)


def test_a_lease_that_ran_out_in_the_source_is_matched_as_the_champion_alone(
    specs: tuple[VersionSpec, ...], tmp_path: Path
) -> None:
    one, two, three = specs
    source = FileDesiredState(tmp_path / "desired.json", poll_interval_s=1.0)
    champ = Deployment(model=MODEL, champion=one)
    expired = Deployment(
        model=MODEL,
        champion=one,
        canary=two,
        canary_weight=10,
        lease_expires_at=time.time() - 1,
    )
    # Written straight to the source, as a controller that died left it (a PUT would refuse it).
    source.publish(expired, actor="a dead controller")
    app = create_app(GatewayConfig(admin_token=TOKEN), source=source)
    with TestClient(app) as gw:
        # The dead controller's own tag no longer matches: its trial is over.
        assert (
            put(
                gw, Deployment(model=MODEL, champion=two), f'"{deployment_etag(expired)}"'
            ).status_code
            == 412
        )
        # A release that saw the champion alone begins over it.
        trial = Deployment(
            model=MODEL,
            champion=one,
            canary=three,
            canary_weight=10,
            lease_expires_at=time.time() + 60,
        )
        assert put(gw, trial, f'"{deployment_etag(champ)}"').status_code == 200
        assert source.read() == trial


def test_publish_if_writes_only_while_its_condition_holds(tmp_path: Path) -> None:
    source = FileDesiredState(tmp_path / "desired.json")
    dep = Deployment(model=MODEL)
    assert not source.publish_if(lambda cur: cur is not None, dep, actor="t")
    assert not (tmp_path / "desired.json").exists()
    assert source.publish_if(lambda cur: cur is None, dep, actor="t")
    assert source.read() == dep and source.revision() == 1
