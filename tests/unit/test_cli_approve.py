"""``ballast approve`` refusals that need no Prefect server, and ``ballast audit verify``.

Answering a real paused run through the CLI is tested in tests/flows/test_manual_approval.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from ballast.audit import read, record
from ballast.cli_approve import approve_command, audit_app
from ballast.settings import Settings, get_settings

RUN_ID = "0b5e4f5e-4a59-4f43-9a8b-7f1b8f3c2d11"


def cli() -> typer.Typer:
    """The two commands as the lead registers them in ballast/cli.py."""
    app = typer.Typer()
    app.command("approve")(approve_command)
    app.add_typer(audit_app, name="audit")
    return app


@pytest.fixture
def approvers(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setenv("BALLAST_APPROVERS", '["alice"]')
    get_settings.cache_clear()
    return get_settings()


def test_a_name_without_the_approver_role_is_refused_locally(approvers: Settings) -> None:
    result = CliRunner().invoke(
        cli(), ["approve", RUN_ID, "--as", "mallory", "--reason", "ship it"]
    )
    assert result.exit_code == 2, result.output
    assert "does not hold the approver role" in result.output
    refused = read(approvers.audit_log)[-1]
    assert refused["action"] == "approval_refused" and refused["approver"] == "mallory"


def test_a_run_id_that_is_not_a_uuid_is_refused(approvers: Settings) -> None:
    result = CliRunner().invoke(cli(), ["approve", "run-7", "--as", "alice", "--reason", "ok"])
    assert result.exit_code == 2 and "not a flow run id" in result.output, result.output


def test_an_empty_reason_is_refused(approvers: Settings) -> None:
    result = CliRunner().invoke(cli(), ["approve", RUN_ID, "--as", "alice", "--reason", " "])
    assert result.exit_code == 2 and "--reason" in result.output, result.output


def test_an_unreachable_prefect_api_is_one_line_and_exit_2(approvers: Settings) -> None:
    from prefect.settings import PREFECT_API_URL, PREFECT_CLIENT_MAX_RETRIES, temporary_settings

    from tests.conftest import free_port

    # Nothing listens there: the client's connection error must become the command's refusal.
    # (Settings in context, not the environment: a test harness elsewhere in the session may
    # hold the API URL in Prefect's settings context.)
    down = {PREFECT_API_URL: f"http://127.0.0.1:{free_port()}/api", PREFECT_CLIENT_MAX_RETRIES: 0}
    with temporary_settings(updates=down):
        result = CliRunner().invoke(cli(), ["approve", RUN_ID, "--as", "alice", "--reason", "ok"])
    assert result.exit_code == 2, (result.output, result.exception)
    assert "cannot reach the Prefect API" in result.output


def test_a_world_readable_roles_file_stops_the_command(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    roles = tmp_path / "roles.json"
    roles.write_text('{"alice": ["approver"]}')
    roles.chmod(0o644)
    monkeypatch.setenv("BALLAST_ROLES_FILE", str(roles))
    get_settings.cache_clear()
    result = CliRunner().invoke(cli(), ["approve", RUN_ID, "--as", "alice", "--reason", "ok"])
    assert result.exit_code == 2 and "must be 600" in result.output, result.output


def test_audit_verify_passes_an_intact_log_and_names_a_tampered_line(settings: Settings) -> None:
    for v in ("1", "2", "3"):
        record(settings.audit_log, "approve", model="m", version=v)
    ok = CliRunner().invoke(cli(), ["audit", "verify"])
    assert ok.exit_code == 0 and "chain intact" in ok.output, ok.output
    lines = settings.audit_log.read_text().splitlines()
    lines[0] = lines[0].replace('"version": "1"', '"version": "9"')
    settings.audit_log.write_text("\n".join(lines) + "\n")
    bad = CliRunner().invoke(cli(), ["audit", "verify", str(settings.audit_log)])
    assert bad.exit_code == 1 and "line 2" in bad.output, bad.output
    # A byte that is not UTF-8 is named too (was: UnicodeDecodeError).
    raw = settings.audit_log.read_bytes().replace(b'"approve"', b'"appr\xffve"', 1)
    settings.audit_log.write_bytes(raw)
    garbled = CliRunner().invoke(cli(), ["audit", "verify", str(settings.audit_log)])
    assert garbled.exit_code == 1 and "line 1: not valid JSON" in garbled.output, garbled.output


def test_audit_anchor_and_verify_against_it(settings: Settings) -> None:
    for v in ("1", "2"):
        record(settings.audit_log, "approve", model="m", version=v)
    taken = CliRunner().invoke(cli(), ["audit", "anchor"])
    assert taken.exit_code == 0, taken.output
    held = taken.output.strip()
    assert held.startswith("2:") and len(held) == 2 + 64
    ok = CliRunner().invoke(cli(), ["audit", "verify", "--anchor", held])
    assert ok.exit_code == 0 and "1 anchor(s) held" in ok.output, ok.output
    # Cut back to one entry: the chain is intact, the anchor is not.
    first = settings.audit_log.read_text().splitlines()[0]
    settings.audit_log.write_text(first + "\n")
    cut = CliRunner().invoke(cli(), ["audit", "verify", "--anchor", held])
    assert cut.exit_code == 1 and "cut short" in cut.output, cut.output
    junk = CliRunner().invoke(cli(), ["audit", "verify", "--anchor", "yesterday"])
    assert junk.exit_code == 2 and "ENTRIES:SHA256" in junk.output, junk.output


def test_audit_anchor_refuses_a_folder_or_a_file_that_is_no_intact_log(
    settings: Settings, tmp_path: Path
) -> None:
    # Before: a folder anchored as "0:000..." and a CSV got an anchor, exit 0 both.
    folder = CliRunner().invoke(cli(), ["audit", "anchor", str(tmp_path)])
    assert folder.exit_code == 2 and "not a file" in folder.output, folder.output
    csv = tmp_path / "data.csv"
    csv.write_text("a,b\n1,2\n")
    not_a_log = CliRunner().invoke(cli(), ["audit", "anchor", str(csv)])
    assert not_a_log.exit_code == 2 and "not anchored" in not_a_log.output, not_a_log.output
