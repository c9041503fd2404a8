"""prefect.yaml on a real Prefect server and worker: ``prefect deploy --all``, then the ``release``
deployment triggered through the API and run by a process worker. The worker (with the flow run it
started) is killed while the release waits for approval, after registering its candidate; the
approver answers the form through the API; the same flow run is scheduled again and a new worker
runs it to completion. The registry then holds exactly one version, tagged with that flow run's id
(registration is idempotent by flow-run id), and it is the champion.

Started here and stopped by the test: a Prefect server and a gateway (``ballast.stack``, sqlite),
two workers in turn. The flow runs in the worker's subprocess with this test's BALLAST_* settings
(state, keyring, gateway in tmp_path).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from ballast.audit import read as read_audit
from ballast.release import ALIAS_CHAMPION, TAG_FLOW_RUN
from ballast.settings import Settings, get_settings
from ballast.stack import StackConfig, deploy_all, down, up
from tests.conftest import free_port

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
RUN_TIMEOUT_S = 150.0


@pytest.fixture
def release_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    """Settings for a fast release, exported through the environment the workers inherit."""
    from ballast.cli_data import prepare_dataset

    env = {
        "BALLAST_STATE_DIR": str(tmp_path / "state"),
        "BALLAST_KEYRING_PATH": str(tmp_path / "keys" / "keyring.json"),
        "BALLAST_SIGNING_KEY_PATH": str(tmp_path / "keys" / "signing-key.pem"),
        "BALLAST_GATEWAY_PORT": str(free_port()),
        "BALLAST_GATEWAY_ADMIN_TOKEN": "deploy-test-token",
        "BALLAST_EPOCHS": "8",
        "BALLAST_BENCH_BATCHES": "[1,64]",
        "BALLAST_CANARY_STEP_MAX_SECONDS": "8",
        "BALLAST_CANARY_MIN_SAMPLES": "30",
        "BALLAST_APPROVAL_POLL_S": "1",
        "BALLAST_APPROVERS": '["ci"]',
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # The worker asks for work every 2 s instead of 10.
        "PREFECT_WORKER_QUERY_SECONDS": "2",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    s = get_settings()
    prepare_dataset(s)
    yield s
    get_settings.cache_clear()


class Worker:
    """``prefect worker start`` on the process pool's `default` queue, in a process group of its own."""

    def __init__(self, config: StackConfig, log: Path) -> None:
        env = {
            **os.environ,
            "PREFECT_API_URL": config.prefect_api_url,
            "BALLAST_HOME": str(REPO),
        }
        cmd = [sys.executable, "-m", "prefect", "worker", "start", "--pool", config.work_pool]
        cmd += ["--work-queue", "default", "--type", "process"]
        self.log = log
        with log.open("ab") as fh:
            self.proc = subprocess.Popen(
                cmd,
                cwd=REPO,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def kill(self) -> None:
        """SIGKILL the worker and every process under it, as a lost machine would.

        The process worker starts each flow run in a session of its own (so a signal to the
        worker's group does not reach it): its descendants are collected first, then each
        group is killed.
        """
        groups = {self.proc.pid} | {_pgid(p) for p in _descendants(self.proc.pid)}
        for pgid in groups:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
        self.proc.wait(10)
        deadline = time.monotonic() + 10
        while any(_group_alive(g) for g in groups) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_group_alive(g) for g in groups), "a killed worker's process survived"


def _stat(pid: int) -> list[str] | None:
    try:
        # Fields after the command name, which may hold spaces: state, ppid, pgrp, ...
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _pgid(pid: int) -> int:
    fields = _stat(pid)
    return int(fields[2]) if fields else pid


def _descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat(int(entry.name))) is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found: set[int] = set()
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _group_alive(pgid: int) -> bool:
    """A live, non-zombie process is left in group ``pgid``."""
    for entry in Path("/proc").iterdir():
        fields = _stat(int(entry.name)) if entry.name.isdigit() else None
        if fields is not None and int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _flow_run(client: httpx.Client, run_id: str) -> dict[str, Any]:
    resp = client.get(f"/flow_runs/{run_id}")
    resp.raise_for_status()
    data: dict[str, Any] = resp.json()
    return data


def _wait(what: str, predicate: Any, timeout: float, worker: Worker) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        assert worker.proc.poll() is None, (
            f"worker exited while waiting for {what}:\n" + (worker.log.read_text()[-3000:])
        )
        time.sleep(1)
    raise AssertionError(
        f"timed out after {timeout:.0f} s waiting for {what}:\n" + worker.log.read_text()[-3000:]
    )


def test_release_deployment_runs_on_a_worker_and_a_killed_run_reruns_without_duplicates(
    release_settings: Settings, tmp_path: Path
) -> None:
    from model_registry import Registry

    s = release_settings
    config = StackConfig(
        root=s.state_dir.resolve() / "stack",
        prefect_port=free_port(),
        components=("prefect-server", "gateway"),
        start_timeout_s=90,
    )
    reg = Registry(s.tracking_uri, s.artifact_root)
    workers: list[Worker] = []
    t0 = time.monotonic()
    try:
        up(s, config)
        deploy_all(config)  # prefect deploy --all, against this server
        deployed_s = time.monotonic() - t0
        api = httpx.Client(base_url=config.prefect_api_url, timeout=10, trust_env=False)
        names = {d["name"]: d for d in api.post("/deployments/filter", json={}).json()}
        assert set(names) >= {"release", "nightly-retrain", "rollback"}
        assert names["nightly-retrain"]["schedules"][0]["schedule"]["cron"] == "0 2 * * *"
        assert names["release"]["work_pool_name"] == "ballast-process"
        # Schedules feed their own queue: this test's worker (queue `default`) never runs them.
        assert names["nightly-retrain"]["work_queue_name"] == "scheduled"
        assert names["release"]["work_queue_name"] == "default"

        # Trigger `release` through the Prefect API (what the UI's run form does too). Manual
        # approval gives the kill a fixed point after registration: the run waits, PAUSED.
        from prefect.client.schemas.objects import FlowRun
        from prefect.deployments import run_deployment
        from prefect.flow_runs import resume_flow_run
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: config.prefect_api_url}):
            flow_run = run_deployment(
                "release/release", parameters={"approval_policy": "manual"}, timeout=0
            )
        # Called outside an event loop, the sync-compatible function returns the run itself.
        assert isinstance(flow_run, FlowRun)
        run_id = str(flow_run.id)
        assert flow_run.parameters == {
            "dataset_uri": None,
            "inject_fault": None,
            "approval_policy": "manual",
        }

        workers.append(Worker(config, tmp_path / "worker-1.log"))
        _wait(
            "the run to pause for approval",
            lambda: _flow_run(api, run_id)["state"]["type"] == "PAUSED",
            RUN_TIMEOUT_S,
            workers[0],
        )
        registered = reg.find_by_tag(s.model_name, TAG_FLOW_RUN, run_id)
        assert len(registered) == 1, "the run paused before registering its candidate"
        # No concurrency lease anywhere in the run's history: a run holding one renews it every
        # 225 s from the engine, and Prefect revokes a paused run's lease, so a wait for
        # approval longer than that would crash (410 Gone). Checked on the server the deploy
        # wrote, not only in prefect.yaml (tests/ops/test_prefect_yaml.py).
        assert names["release"]["global_concurrency_limit"] is None
        states = api.get("/flow_run_states/", params={"flow_run_id": run_id}).json()
        assert {st["type"] for st in states} >= {"RUNNING", "PAUSED"}
        leases = [st["state_details"].get("deployment_concurrency_lease_id") for st in states]
        assert leases == [None] * len(states), leases
        first_attempt_s = time.monotonic() - t0
        # The worker dies (with the flow run it started) while the release waits.
        workers[0].kill()
        assert _flow_run(api, run_id)["state"]["type"] == "PAUSED"
        # The approver answers the form anyway, as in the UI; nothing runs the flow now.
        with temporary_settings({PREFECT_API_URL: config.prefect_api_url}):
            resume_flow_run(
                flow_run.id, run_input={"approve": True, "approver": "ci", "reason": "rerun test"}
            )

        # Run the same flow run again: back to SCHEDULED, a new worker picks it up.
        resp = api.post(
            f"/flow_runs/{run_id}/set_state",
            json={"state": {"type": "SCHEDULED", "name": "Rescheduled"}, "force": True},
        )
        assert resp.status_code in (200, 201), resp.text
        workers.append(Worker(config, tmp_path / "worker-2.log"))
        final = _wait(
            "the rerun to finish",
            lambda: (
                _flow_run(api, run_id)
                if _flow_run(api, run_id)["state"]["type"]
                in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
                else None
            ),
            RUN_TIMEOUT_S,
            workers[1],
        )
        assert final["state"]["type"] == "COMPLETED", (
            final["state"],
            workers[1].log.read_text()[-3000:],
        )
        assert final["run_count"] >= 2, "the same flow run ran twice"

        versions = reg.list_versions(s.model_name)
        assert [v.version for v in versions] == [registered[0].version], (
            "the rerun registered a duplicate version"
        )
        assert versions[0].tags[TAG_FLOW_RUN] == run_id
        champion = reg.get_by_alias(s.model_name, ALIAS_CHAMPION)
        assert champion is not None and champion.version == registered[0].version
        audit = read_audit(s.audit_log)
        assert [e["action"] for e in audit].count("register") == 1
        approvals = [e for e in audit if e["action"] == "approve"]
        assert [(e["version"], e["approver"]) for e in approvals] == [(champion.version, "ci")]
        total_s = time.monotonic() - t0
        print(
            f"deploy {deployed_s:.1f} s, first attempt to the approval pause "
            f"{first_attempt_s:.1f} s, total {total_s:.1f} s"
        )
        api.close()
    finally:
        for w in workers:
            w.kill()
        down(config)
