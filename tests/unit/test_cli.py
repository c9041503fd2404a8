"""The CLI as a person uses it: keys, data round trip, validation, typed errors, status."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ballast.audit import read as read_audit
from ballast.audit import verify_chain
from ballast.cli import app
from ballast.data import bundled_csv_bytes
from ballast.gateway_client import GatewayClient
from ballast.settings import Settings
from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.mark.parametrize(
    "command",
    [["audit", "verify"], ["canary", "simulate"]],  # the second reads no settings itself
)
def test_bad_settings_end_any_command_as_one_line_and_exit_2(
    settings: Settings, command: list[str]
) -> None:
    # The installed `ballast` runs ballast.cli:main, as `python -m ballast.cli` does.
    env = {**os.environ, "BALLAST_CANARY_STEP": "5,100"}
    proc = subprocess.run(
        [sys.executable, "-m", "ballast.cli", *command],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "stage=config" in proc.stderr and "did you mean BALLAST_CANARY_STEPS?" in proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr  # one line, not wrapped at 80 columns


def test_help_lists_every_command(runner: CliRunner) -> None:
    out = runner.invoke(app, ["--help"]).output
    for command in (
        "demo",
        "keys",
        "data",
        "release",
        "serve",
        "rollback",
        "status",
        "approve",
        "audit",
    ):
        assert command in out, f"{command} missing from --help"


def test_keys_create_then_list_shows_the_current_key(runner: CliRunner, settings: Settings) -> None:
    created = runner.invoke(app, ["keys", "create"])
    assert created.exit_code == 0, created.output
    key_id = created.output.split("created key ")[1].split()[0]
    listed = runner.invoke(app, ["keys", "list"])
    assert f"{key_id}  (current)" in listed.output
    assert oct(settings.keyring_path.stat().st_mode & 0o777) == "0o600"


def encrypted(runner: CliRunner, tmp_path: Path) -> tuple[Path, Path]:
    """The bundled dataset as plaintext and encrypted with ``ballast data encrypt``."""
    plain = tmp_path / "data.csv"
    plain.write_bytes(bundled_csv_bytes())
    enc = tmp_path / "data.enc"
    assert runner.invoke(app, ["data", "encrypt", str(plain), str(enc)]).exit_code == 0
    return plain, enc


def test_data_encrypt_decrypt_validate_round_trip(
    runner: CliRunner, settings: Settings, tmp_path: Path
) -> None:
    plain, enc = encrypted(runner, tmp_path)
    back = tmp_path / "back.csv"
    assert b"mean_radius" not in enc.read_bytes(), "ciphertext must not contain plaintext"
    assert runner.invoke(app, ["data", "decrypt", str(enc), str(back)]).exit_code == 0
    assert back.read_bytes() == plain.read_bytes()
    valid = runner.invoke(app, ["data", "validate", str(enc)])
    assert valid.exit_code == 0 and "569 rows" in valid.output, valid.output


def test_a_tampered_file_fails_with_the_stage_named_and_no_output_left(
    runner: CliRunner, settings: Settings, tmp_path: Path
) -> None:
    _, enc = encrypted(runner, tmp_path)
    back = tmp_path / "back.csv"
    raw = bytearray(enc.read_bytes())
    raw[-5] ^= 0xFF
    enc.write_bytes(bytes(raw))
    result = runner.invoke(app, ["data", "decrypt", str(enc), str(back)])
    assert result.exit_code == 2
    assert "stage=decrypt" in result.output
    assert not back.exists(), "a failed decrypt must leave no output file"


def test_plausible_bad_paths_end_as_one_line_not_a_traceback(
    runner: CliRunner, settings: Settings, tmp_path: Path
) -> None:
    _, enc = encrypted(runner, tmp_path)
    long_dir = tmp_path / ("d" * 100)
    long_dir.mkdir()
    cases = {
        "missing source": (
            ["data", "encrypt", str(tmp_path / "typo.csv"), str(enc)],
            "no such file",
        ),
        "folder as output": (["data", "decrypt", str(enc), str(tmp_path)], "is a folder"),
        # A name that fits, whose temp file beside it does not (was: OSError traceback).
        "no room for the temp file": (
            ["data", "decrypt", str(enc), str(tmp_path / ("n" * 250))],
            "cannot write there",
        ),
        "folder as log": (["audit", "verify", str(tmp_path)], "not a file"),
        # Past 80 columns: still one line (rich wrapped it, and a temp folder's name length
        # decided whether the message split).
        "long folder as log": (["audit", "verify", str(long_dir)], "not a file"),
    }
    for what, (args, message) in cases.items():
        result = runner.invoke(app, args)
        assert result.exit_code in (1, 2), (what, result.output)
        assert message in result.output and "Traceback" not in result.output, (what, result.output)
        assert len(result.output.strip().splitlines()) == 1, (what, result.output)
        assert not isinstance(result.exception, OSError), (what, result.exception)


def test_keys_rotate_with_a_missing_file_rotates_nothing(
    runner: CliRunner, settings: Settings, tmp_path: Path
) -> None:
    assert runner.invoke(app, ["keys", "create"]).exit_code == 0
    before = runner.invoke(app, ["keys", "list"]).output
    result = runner.invoke(app, ["keys", "rotate", str(tmp_path / "typo.enc")])
    assert result.exit_code == 2 and "not a file" in result.output, result.output
    assert "nothing rotated" in result.output
    assert runner.invoke(app, ["keys", "list"]).output == before, "no new current key"


def test_keys_rotate_with_a_plaintext_file_or_an_unwritable_log_rotates_nothing(
    runner: CliRunner, settings: Settings, tmp_path: Path
) -> None:
    # Before: the new key was made current, then re-wrapping (or the audit entry) failed.
    plain, enc = encrypted(runner, tmp_path)
    before = runner.invoke(app, ["keys", "list"]).output
    mixed = runner.invoke(app, ["keys", "rotate", str(enc), str(plain)])
    assert mixed.exit_code == 2 and "nothing rotated" in mixed.output, mixed.output
    assert "not a Ballast encrypted object" in mixed.output
    settings.audit_log.parent.mkdir(parents=True, exist_ok=True)
    settings.audit_log.unlink(missing_ok=True)
    settings.audit_log.mkdir()  # an audit log nothing can be appended to
    try:
        unlogged = runner.invoke(app, ["keys", "rotate", str(enc)])
    finally:
        settings.audit_log.rmdir()
    assert unlogged.exit_code == 2 and "audit log" in unlogged.output, unlogged.output
    assert "Traceback" not in unlogged.output
    assert runner.invoke(app, ["keys", "list"]).output == before, "no new current key"


def test_status_reports_versions_and_a_stopped_gateway(
    runner: CliRunner, settings: Settings
) -> None:
    result = runner.invoke(app, ["status"])
    assert result.exit_code == 0, result.output
    assert "not running" in result.output


def test_status_says_at_once_that_no_mlflow_server_answers(settings: Settings) -> None:
    # Before: MLflow retried the refused connection with back-off for about four minutes.
    uri = f"http://ops:s3cret@127.0.0.1:{free_port()}"
    env = {**os.environ, "BALLAST_MLFLOW_TRACKING_URI": uri}
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "ballast.cli", "status"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "stage=registry:" in proc.stderr and "does not answer" in proc.stderr, proc.stderr
    assert "BALLAST_MLFLOW_TRACKING_URI" in proc.stderr and "s3cret" not in proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert time.monotonic() - started < 60, "refused at once, not after MLflow's retries"


def test_keys_rotate_rewraps_objects_and_retires_the_old_key(
    runner: CliRunner, settings: Settings, tmp_path: Path
) -> None:
    from ballast.crypto import read_header

    plain, enc = encrypted(runner, tmp_path)
    with open(enc, "rb") as fh:
        old = read_header(fh).key_id
    payload_before = enc.read_bytes()[-4096:]
    from ballast.keys import LocalKeyring
    from ballast.manifest import load_or_create_signing_key, public_key_bytes

    ring = LocalKeyring(settings.keyring_path)
    signing_public = public_key_bytes(load_or_create_signing_key(settings.signing_key_path, ring))
    rotated = runner.invoke(app, ["keys", "rotate", str(enc), "--retire-old"])
    assert rotated.exit_code == 0, rotated.output
    with open(enc, "rb") as fh:
        new = read_header(fh).key_id
    assert new != old and f"{old}  (retired)" in runner.invoke(app, ["keys", "list"]).output
    assert enc.read_bytes()[-4096:] == payload_before, "rotation must not touch the payload"
    entry = read_audit(settings.audit_log)[-1]
    assert entry["action"] == "key_rotate" and entry["old_key"] == old and entry["new_key"] == new
    assert entry["rewrapped"] == [str(enc)] and entry["retired_old"] is True
    assert entry["error"] is None and verify_chain(settings.audit_log) == []
    # The signing key moved to the new key with the data, and still opens (old key retired).
    assert entry["signing_key_rewrapped"] is True
    key = load_or_create_signing_key(settings.signing_key_path, LocalKeyring(settings.keyring_path))
    assert public_key_bytes(key) == signing_public
    back = tmp_path / "back.csv"
    assert runner.invoke(app, ["data", "decrypt", str(enc), str(back)]).exit_code == 0
    assert back.read_bytes() == plain.read_bytes()


def test_rollback_during_a_trial_is_refused_unless_forced(
    runner: CliRunner, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    import flows.rollback as fr
    from ballast.errors import TrialInForce

    asked: list[bool] = []

    def rollback_flow(model_name: str | None = None, force: bool = False) -> str:
        asked.append(force)
        if not force:
            raise TrialInForce("a trial is in force (canary 4 at 10%)")
        return "2"

    monkeypatch.setattr(fr, "rollback_flow", rollback_flow)
    refused = runner.invoke(app, ["rollback"])
    assert refused.exit_code == 2, refused.output
    assert "stage=rollback" in refused.output and "--force" in refused.output, refused.output
    forced = runner.invoke(app, ["rollback", "--force"])
    assert forced.exit_code == 0 and "2" in forced.output, forced.output
    assert asked == [False, True]


@pytest.mark.parametrize("user_set", [False, True])
def test_a_temporary_prefect_server_sends_no_telemetry_unless_the_environment_says_so(
    runner: CliRunner, settings: Settings, monkeypatch: pytest.MonkeyPatch, user_set: bool
) -> None:
    # Offline, Prefect's telemetry service logs an ERROR on every run that starts its own server.
    from prefect.settings import (
        PREFECT_SERVER_ANALYTICS_ENABLED,
        get_current_settings,
        temporary_settings,
    )

    import flows.rollback as fr

    if user_set:
        monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "true")
    else:
        monkeypatch.delenv("PREFECT_SERVER_ANALYTICS_ENABLED", raising=False)
    seen: list[tuple[bool, str | None]] = []

    def rollback_flow(model_name: str | None = None, force: bool = False) -> str:
        # What the temporary server's process would be started with, from inside the flow call.
        current = get_current_settings()
        server_env = current.to_environment_variables(exclude_unset=True)
        seen.append(
            (current.server.analytics_enabled, server_env.get("PREFECT_SERVER_ANALYTICS_ENABLED"))
        )
        return "2"

    monkeypatch.setattr(fr, "rollback_flow", rollback_flow)
    # Prefect reads the environment once per process: the settings in force start as "on", as
    # they are for a user who set nothing (CI turns them off for the whole run).
    with temporary_settings({PREFECT_SERVER_ANALYTICS_ENABLED: True}):
        result = runner.invoke(app, ["rollback"])
    assert result.exit_code == 0, result.output
    assert seen == ([(True, "True")] if user_set else [(False, "False")])


# -- `ballast serve` as a real process: signals reach the gateway, which drains -----------------


def _serve(settings: Settings, log: Path) -> subprocess.Popen[bytes]:
    """`ballast serve` in a session of its own, as a terminal's foreground job would be."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ballast.cli", "serve", "--host", "127.0.0.1"],
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + 30
    with GatewayClient(settings.gateway_url, timeout=1.0) as client:
        while not client.health():
            assert proc.poll() is None, f"serve exited: {log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, f"serve never healthy: {log.read_text()[-2000:]}"
            time.sleep(0.1)
    return proc


def _reap(proc: subprocess.Popen[bytes]) -> None:
    # Its whole session: under the old subprocess.call a gateway child outlived `serve`.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


@pytest.mark.integration
def test_serve_stops_its_gateway_on_sigterm(settings: Settings, tmp_path: Path) -> None:
    proc = _serve(settings, tmp_path / "serve.log")
    try:
        proc.send_signal(signal.SIGTERM)  # `kill PID`, as a service manager stops it
        assert proc.wait(20) == 0, "the gateway did not drain and exit cleanly"
        with GatewayClient(settings.gateway_url, timeout=1.0) as client:
            assert not client.health(), "a gateway kept serving after `serve` got SIGTERM"
    finally:
        _reap(proc)


@pytest.mark.integration
def test_ctrl_c_on_serve_drains_the_request_in_flight(settings: Settings, tmp_path: Path) -> None:
    # Given a request whose body is still arriving when Ctrl-C comes
    log = tmp_path / "serve.log"
    proc = _serve(settings, log)
    try:
        body = b'{"model": "m", "healthy": true}'
        head = (
            b"POST /admin/watchdog/heartbeat HTTP/1.1\r\nHost: x\r\n"
            + b"Authorization: Bearer " + settings.admin_token().encode() + b"\r\n"
            + b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
        )  # fmt: skip
        with socket.create_connection(("127.0.0.1", settings.gateway_port), timeout=10) as conn:
            conn.sendall(head + body[:-1])
            time.sleep(0.3)
            # When the terminal sends SIGINT to the foreground job
            os.killpg(proc.pid, signal.SIGINT)
            time.sleep(1.5)  # longer than subprocess.call's 0.25 s before it SIGKILLs
            # Then the request is still answered, and the gateway stops
            conn.sendall(body[-1:])
            status_line = conn.recv(200).split(b"\r\n")[0]
        assert status_line.startswith(b"HTTP/1.1 "), f"no answer: {status_line!r}"
        assert proc.wait(20) == 0, log.read_text()[-2000:]
        assert "gateway.stopped" in log.read_text(), "the gateway did not shut down cleanly"
        assert "Traceback" not in log.read_text(), "a clean stop ended with a traceback"
    finally:
        _reap(proc)


def test_keys_export_public_writes_a_pem_that_verifies_and_holds_no_private_key(
    runner: CliRunner, settings: Settings, tmp_path: Path
) -> None:
    from ballast.manifest import load_or_create_signing_key, public_key_bytes

    missing = runner.invoke(app, ["keys", "export-public", str(tmp_path / "pub.pem")])
    assert missing.exit_code == 2 and "no signing key" in missing.output
    key = load_or_create_signing_key(settings.signing_key_path)
    result = runner.invoke(app, ["keys", "export-public", str(tmp_path / "pub.pem")])
    assert result.exit_code == 0, result.output
    pem = (tmp_path / "pub.pem").read_bytes()
    assert b"PUBLIC KEY" in pem and b"PRIVATE" not in pem
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    loaded = serialization.load_pem_public_key(pem)
    assert isinstance(loaded, Ed25519PublicKey)
    assert public_key_bytes(loaded) == public_key_bytes(key)
    # Before: exporting over the key itself replaced the only copy of the private half.
    private = settings.signing_key_path.read_bytes()
    over = runner.invoke(app, ["keys", "export-public", str(settings.signing_key_path)])
    assert over.exit_code == 2 and "signing key itself" in over.output, over.output
    assert settings.signing_key_path.read_bytes() == private


def test_the_demo_never_points_at_your_registry_data_keys_or_gateway(
    runner: CliRunner, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fcntl

    import ballast.demo

    seen: list[Settings] = []
    monkeypatch.setattr(ballast.demo, "run_demo", lambda s, **kw: seen.append(s) or 0)
    mine = {
        "BALLAST_MLFLOW_TRACKING_URI": "sqlite:////tmp/users-own-registry.db",
        "BALLAST_MODEL_NAME": "users-prod-model",
        "BALLAST_DATASET_URI": "s3://users-bucket/data.csv.enc",
        "BALLAST_GATEWAY_HOST": "gateway.prod.internal",
    }
    for name, value in mine.items():
        monkeypatch.setenv(name, value)
    result = runner.invoke(app, ["demo"])
    assert result.exit_code == 0, result.output
    (s,) = seen
    # Before: the demo registered and promoted in the user's registry, under their model name.
    assert s.mlflow_tracking_uri == "" and s.dataset_uri == ""
    assert s.model_name != "users-prod-model" and s.gateway_host == "127.0.0.1"
    assert s.state_dir == settings.state_dir / "demo"

    # A second demo while one runs is refused (it would delete the first's state under it).
    lock = os.open(settings.state_dir / "demo.lock", os.O_RDWR)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        monkeypatch.setenv("BALLAST_STATE_DIR", str(settings.state_dir))
        again = subprocess.run(
            [sys.executable, "-m", "ballast.cli", "demo"],
            env={**os.environ},
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        os.close(lock)
    assert again.returncode == 2 and "another ballast demo is running" in again.stderr


def test_rollback_with_the_prefect_api_down_is_one_line_and_exit_2(
    runner: CliRunner, settings: Settings
) -> None:
    from prefect.settings import PREFECT_API_URL, PREFECT_CLIENT_MAX_RETRIES, temporary_settings

    from tests.conftest import free_port

    # Before: Prefect's RuntimeError ("Failed to reach API") came out as a traceback.
    down = {PREFECT_API_URL: f"http://127.0.0.1:{free_port()}/api", PREFECT_CLIENT_MAX_RETRIES: 0}
    with temporary_settings(updates=down):
        result = runner.invoke(app, ["rollback"])
    assert result.exit_code == 2, (result.output, result.exception)
    assert "cannot reach the Prefect API" in result.output and "Traceback" not in result.output


def test_help_of_a_bare_group_or_with_h_works_whatever_the_environment(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    ballast = str(Path(sys.executable).with_name("ballast"))
    env = {**os.environ, "BALLAST_NO_SUCH_SETTING": "1"}

    def run(*args: str, clean: bool = False) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [ballast, *args],
            env={**env, "BALLAST_STATE_DIR": str(tmp_path)}
            if not clean
            else {k: v for k, v in env.items() if k != "BALLAST_NO_SUCH_SETTING"}
            | {"BALLAST_STATE_DIR": str(tmp_path / "state")},
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )

    # Before: both stopped on the unknown variable instead of printing their help.
    assert "Usage: ballast keys" in run("keys").stdout
    assert "Usage: ballast keys" in run("-v", "keys").stdout, "a global option changes nothing"
    data_help = run("bench", "data", "-h")
    assert data_help.returncode == 0 and "usage: ballast bench data" in data_help.stdout
    # A command still stops on it.
    status = run("status")
    assert status.returncode == 2 and "BALLAST_NO_SUCH_SETTING" in status.stdout + status.stderr
    # And serve holds --host to what BALLAST_GATEWAY_HOST is held to (was: started, then failed).
    bad_host = run("serve", "--host", "http://bad", clean=True)
    assert bad_host.returncode == 2 and "--host" in bad_host.stdout + bad_host.stderr
    assert not (tmp_path / "state").exists(), "nothing written"


def test_logged_failures_of_typed_errors_carry_no_traceback_unless_verbose() -> None:
    import logging

    from ballast.cli import _no_traceback_for_typed_errors
    from ballast.errors import RegistryError

    def record(exc: BaseException) -> logging.LogRecord:
        try:
            raise exc
        except BaseException:
            info = sys.exc_info()
        return logging.LogRecord(
            "prefect.task_runs", logging.ERROR, __file__, 1, "failed", (), info
        )

    # Before: Prefect's task and flow loggers printed two tracebacks above the one-line error.
    typed = record(RegistryError("no 'previous' version to roll back to"))
    assert _no_traceback_for_typed_errors(typed) and typed.exc_info is None
    assert "Traceback" not in logging.Formatter().format(typed)
    bug = record(KeyError("a bug"))  # anything else keeps its traceback
    assert _no_traceback_for_typed_errors(bug) and bug.exc_info is not None
    assert "Traceback" in logging.Formatter().format(bug)


def test_the_demo_with_the_prefect_api_down_is_one_line_and_exit_2(
    runner: CliRunner, settings: Settings
) -> None:
    from prefect.settings import PREFECT_API_URL, PREFECT_CLIENT_MAX_RETRIES, temporary_settings

    from tests.conftest import free_port

    # Before: `stack up` prints an export of PREFECT_API_URL; after `stack down`, `make demo`
    # ended in three tracebacks (release and rollback said one line).
    down = {PREFECT_API_URL: f"http://127.0.0.1:{free_port()}/api", PREFECT_CLIENT_MAX_RETRIES: 0}
    with temporary_settings(updates=down):
        result = runner.invoke(app, ["demo"])
    assert result.exit_code == 2, (result.output, result.exception)
    assert "cannot reach the Prefect API" in result.output and "Traceback" not in result.output
