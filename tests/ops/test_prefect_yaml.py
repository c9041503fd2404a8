"""prefect.yaml without a server: the deployments, their schedules and queues, entrypoints that
name real flows, parameters the flows accept, and no secrets. (test_deploy.py deploys it.)"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]


def prefect_yaml() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((REPO / "prefect.yaml").read_text())
    return data


def deployments() -> dict[str, dict[str, Any]]:
    return {d["name"]: d for d in prefect_yaml()["deployments"]}


def flow_params(entrypoint: str) -> set[str]:
    """Parameter names of the @flow function an entrypoint names (parsed, not imported)."""
    path, func = entrypoint.split(":")
    tree = ast.parse((REPO / path).read_text())
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == func:
            decorators = [ast.unparse(d) for d in node.decorator_list]
            assert any(d.startswith("flow") for d in decorators), f"{entrypoint} is not a @flow"
            return {a.arg for a in node.args.args + node.args.kwonlyargs}
    raise AssertionError(f"{entrypoint}: no function {func}")


def test_the_expected_deployments_exist_on_the_process_pool() -> None:
    ds = deployments()
    assert {"release", "nightly-retrain", "rollback", "champion-watchdog"} <= set(ds)
    assert {d["work_pool"]["name"] for d in ds.values()} == {"ballast-process"}


def test_only_scheduled_deployments_have_schedules_and_they_use_their_own_queue() -> None:
    for name, d in deployments().items():
        if d.get("schedules"):
            assert d["work_pool"]["work_queue_name"] == "scheduled", name
        else:
            assert d["work_pool"]["work_queue_name"] == "default", name
    (nightly,) = deployments()["nightly-retrain"]["schedules"]
    fields = nightly["cron"].split()
    assert len(fields) == 5 and nightly["timezone"] == "UTC"


def test_entrypoints_name_flows_and_parameters_are_ones_they_accept() -> None:
    for name, d in deployments().items():
        accepted = flow_params(d["entrypoint"])
        assert set(d.get("parameters", {})) <= accepted, f"{name}: unknown parameters"
        assert d.get("enforce_parameter_schema") is True, name
    # Scheduled retraining follows the settings: auto-approved in dev only, a person elsewhere.
    assert deployments()["nightly-retrain"]["parameters"]["approval_policy"] is None
    assert deployments()["release"]["parameters"]["approval_policy"] == "manual"


def test_no_deployment_whose_runs_pause_for_approval_has_a_concurrency_limit() -> None:
    # Prefect 3.9 releases a deployment's concurrency slot when a run pauses and revokes its
    # lease; the engine renews that lease every 225 s, gets 410 Gone and crashes the run
    # (reproduced against a real server: Running, Paused, Crashed at 229 s). Release runs take
    # turns at the gateway instead (tests/flows: wait_for_turn).
    for path in (REPO / "prefect.yaml", REPO / "infra" / "k8s" / "prefect.yaml"):
        doc = yaml.safe_load(path.read_text())
        for d in doc["deployments"]:
            if d["entrypoint"] == "flows/release.py:release_flow":
                assert "concurrency_limit" not in d, f"{path.name}: {d['name']}"
    assert "pause_flow_run" in (REPO / "tasks" / "approval.py").read_text()


def test_the_champion_watchdog_runs_every_5_minutes_one_at_a_time() -> None:
    d = deployments()["champion-watchdog"]
    assert d["entrypoint"] == "flows/watchdog.py:champion_watchdog_flow"
    (schedule,) = d["schedules"]
    assert schedule == {"interval": 300, "active": True}
    assert d["work_pool"] == {"name": "ballast-process", "work_queue_name": "scheduled"}
    # A run that finds the last one still going is dropped: stale checks must not pile up, and
    # two runs must never write the detector's state at once.
    assert d["concurrency_limit"] == {"limit": 1, "collision_strategy": "CANCEL_NEW"}
    assert d["parameters"] == {"model_name": None, "rollback": True}
    assert {"model_name", "rollback"} <= flow_params(d["entrypoint"])


def test_no_secrets_in_prefect_yaml() -> None:
    text = (REPO / "prefect.yaml").read_text()
    assert not re.search(r"(?i)(password|secret|token|api_key)\s*:", text)
    assert "PREFECT_API_KEY" not in text
    for d in deployments().values():
        env = (d["work_pool"].get("job_variables") or {}).get("env", {})
        assert not any(re.search(r"(?i)token|key|password|secret", k) for k in env)


def test_the_release_deployment_refuses_an_unknown_approval_policy_at_submission() -> None:
    # enforce_parameter_schema checks run parameters against this schema when a run is
    # created: a typo must stop there, not after training, compiling and registering.
    from prefect.utilities.callables import parameter_schema
    from prefect.utilities.schema_tools import ValidationError, validate

    from flows.release import release_flow

    schema = parameter_schema(release_flow.fn).model_dump_for_openapi()
    for ok in ("auto", "manual", None):
        validate({"approval_policy": ok}, schema, raise_on_error=True)
    for typo in ("Manual", "manul", ""):
        try:
            validate({"approval_policy": typo}, schema, raise_on_error=True)
        except ValidationError:
            continue
        raise AssertionError(f"approval_policy={typo!r} was accepted")
    assert all(d.get("enforce_parameter_schema") for d in deployments().values())
