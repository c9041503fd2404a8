"""``ballast approve``, ``ballast approver-key`` and ``ballast audit verify``: answer a paused
release from the shell (signed with the approver's key where one is registered), make such a
key, and check the audit log's hash chain.

``approve`` refuses locally (exit 2) when the name lacks the approver role, before anything is
sent; the paused flow checks again (role, and that the approver did not start the run), because
anyone can call Prefect's API directly. Prefect is imported inside the command so ``ballast
--help`` stays fast.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING
from uuid import UUID

import typer
from rich.markup import escape

from ballast.cli_shared import console, err, fail
from ballast.errors import BallastError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from ballast.decisions import Authorization

__all__ = ["approve_command", "approver_key_command", "audit_app", "audit_verify"]

audit_app = typer.Typer(help="The hash-chained audit log.", no_args_is_help=True)


def approve_command(
    run_id: str = typer.Argument(..., help="Id of the flow run paused for approval."),
    name: str = typer.Option(..., "--as", help="Your name; it must hold the approver role."),
    reject: bool = typer.Option(False, "--reject", help="Reject the version instead."),
    reason: str = typer.Option(..., "--reason", help="Why (recorded on the model version)."),
    key: Path | None = typer.Option(
        None,
        "--key",
        help="Your approval key (default BALLAST_APPROVER_KEY_FILE): signs the answer. Needed "
        "when the roles file registers your key.",
    ),
) -> None:
    """Approve (or --reject) the release paused in flow run RUN_ID."""
    from ballast.decisions import authorize_approval
    from ballast.roles import roles_from_settings
    from ballast.settings import get_settings

    s = get_settings()
    try:
        flow_run_id = UUID(run_id)
    except ValueError:
        fail(BallastError(f"{run_id!r} is not a flow run id (a UUID)", stage="approve"))
    if not reason.strip():
        fail(BallastError("--reason must not be empty", stage="approve"))
    try:
        roles = roles_from_settings(s)
    except BallastError as exc:
        fail(exc)
    # The starter is known only inside the run; the flow applies that half of the rule.
    auth = authorize_approval(name, None, roles)
    _refuse_unless(auth, name=name, approve=not reject, run_id=run_id)

    signer = _signer(name, key if key is not None else s.approver_key_file)

    from prefect.flow_runs import resume_flow_run

    from ballast.approval_signing import approval_message, sign_approval

    answer = {"approve": not reject, "approver": name.strip(), "reason": reason}
    with _prefect_errors(run_id):
        what, pause_key, starter = _waiting_for(flow_run_id)
    console.print(f"flow run {what}")
    # The other half of the rule, where the run's form says who started it: refused here
    # rather than "sent" and then refused by the run.
    mine = authorize_approval(name, starter, roles)
    _refuse_unless(mine, name=name, approve=not reject, run_id=run_id)
    with _prefect_errors(run_id):
        if signer is not None:
            message = approval_message(
                flow_run_id=str(flow_run_id),
                pause_key=pause_key,
                approve=not reject,
                approver=name,
                reason=reason,
            )
            answer["signature"] = sign_approval(signer, message)
        resume_flow_run(flow_run_id, run_input=answer)
    verdict = "rejected" if reject else "approved"
    signed = ", signed" if signer is not None else ""
    console.print(f"{verdict} flow run {run_id} as {name.strip()}{signed}: sent to the paused run")


def approver_key_command(
    path: Path = typer.Argument(..., help="Where to write the new private key (0600)."),
    name: str = typer.Option(..., "--as", help="Whose key: the name in the roles file."),
) -> None:
    """Make an approval key: the private half goes to PATH (keep it outside the repository),
    the public half is printed as the roles-file entry to register."""
    import json

    from ballast.approval_signing import create_approver_key, public_key_text

    if not name.strip():
        fail(BallastError("--as must not be empty", stage="approve"))
    try:
        key = create_approver_key(path)
    except BallastError as exc:
        fail(exc)
    except OSError as exc:
        fail(BallastError(f"cannot write {path}: {exc}", stage="approve"))
    entry = {name.strip(): {"roles": ["approver"], "approval_key": public_key_text(key)}}
    repo = _git_work_tree(path)
    if repo is not None:
        # Written anyway (the name may be git-ignored), but a private key one `git add -A` away
        # from a commit is worth a word.
        err.print(
            f"warning: {path} is inside the git work tree {repo}: move it outside the "
            "repository so it cannot be committed",
            soft_wrap=True,
            markup=False,
        )
    err.print(
        f"wrote {path} (0600); register its public key in the roles file:",
        soft_wrap=True,
        markup=False,
    )
    print(json.dumps(entry))


def _git_work_tree(path: Path) -> Path | None:
    """The nearest folder above ``path`` holding ``.git`` (a work tree), if any."""
    for folder in path.resolve().parents:
        if (folder / ".git").exists():
            return folder
    return None


def _signer(name: str, key_file: Path | None) -> Ed25519PrivateKey | None:
    """The key to sign ``name``'s answer with (None: answer by name), or exit 2 with the reason
    when the paused run would refuse the answer: a registered key and no key file, a key file
    that is not the registered key, a key file for a name without one, or no key where
    signatures are required."""
    from ballast.approval_signing import load_approver_key, public_key_text, registered_key
    from ballast.roles import approval_keys_from_settings
    from ballast.settings import get_settings

    s = get_settings()
    try:
        registered = registered_key(approval_keys_from_settings(s), name)
        if key_file is None:
            if registered is not None:
                raise BallastError(
                    f"{name.strip()!r} has a registered approval key: pass --key FILE (or set "
                    "BALLAST_APPROVER_KEY_FILE) to sign the answer",
                    stage="approve",
                )
            if s.approval_signatures == "required":
                raise BallastError(
                    "signed approvals are required (BALLAST_APPROVAL_SIGNATURES=required): "
                    "pass --key FILE",
                    stage="approve",
                )
            return None
        signer = load_approver_key(key_file)
        if registered is None:
            raise BallastError(
                f'{name.strip()!r} has no registered approval key: add "approval_key": '
                f'"{public_key_text(signer)}" to their entry in the roles file',
                stage="approve",
            )
        if public_key_text(registered) != public_key_text(signer):
            raise BallastError(
                f"{key_file} is not the approval key registered for {name.strip()!r}",
                stage="approve",
            )
        return signer
    except BallastError as exc:
        fail(exc)


def _refuse_unless(auth: Authorization, *, name: str, approve: bool, run_id: str) -> None:
    """Exit 2 with the reason, audited as the run would audit it, unless ``auth`` allows."""
    if auth.allowed:
        return
    from ballast.audit import record
    from ballast.settings import get_settings

    s = get_settings()
    record(
        s.audit_log,
        "approval_refused",
        model=s.model_name,
        version=None,
        approver=name,
        approve=approve,
        reason=auth.reason,
        flow_run_id=run_id,
        where="cli",
    )
    fail(BallastError(f"refused: {auth.reason}", stage="approve"))


@contextmanager
def _prefect_errors(run_id: str) -> Iterator[None]:
    """Prefect's and the network's failures as one typed line each (exit 2)."""
    import httpx
    from prefect.exceptions import FlowPauseTimeout, NotPausedError, ObjectNotFound

    try:
        yield
    except ObjectNotFound:
        fail(BallastError(f"no flow run {run_id}", stage="approve"))
    except (NotPausedError, FlowPauseTimeout) as exc:
        fail(BallastError(f"flow run {run_id} is not waiting for approval: {exc}", stage="approve"))
    except typer.Exit:
        raise  # click's Exit is a RuntimeError: not Prefect's refusal
    except RuntimeError as exc:  # Prefect's refusal, e.g. input that fails the form's schema
        fail(BallastError(f"Prefect refused the answer: {exc}", stage="approve"))
    except httpx.HTTPError as exc:  # the API is down or answered an error the client raised
        fail(BallastError(f"cannot reach the Prefect API: {exc}", stage="approve"))


def _waiting_for(flow_run_id: UUID) -> tuple[str, str, str | None]:
    """What the paused run asks about ("NAME (ID) asks approval of version V"), its pause key
    (which a signed answer covers) and who started it (as its form says; None if it does not),
    read before any answer is sent, so the approver sees which release they answer. The release
    flow pauses with the key ``approval-<version>-<attempt>-<question>`` (tasks/approval.py); a
    run paused for anything else, or not paused, is refused."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import NotPausedError
    from prefect.input.run_input import keyset_from_paused_state

    from ballast.release import PAUSE_KEY_PREFIX, started_by_in

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_run_id)
        state = run.state
        if state is None or not state.is_paused():
            raise NotPausedError(f"its state is {state.name if state else 'unknown'}")
        starter = None
        try:
            description = client.read_flow_run_input(
                key=keyset_from_paused_state(state)["description"], flow_run_id=flow_run_id
            )
            starter = started_by_in(description)
        except Exception:  # no description: the run applies the rule itself
            starter = None
    key = state.state_details.pause_key or ""
    # approval-<version>-<attempt>-<question> (approval-<version>-<attempt> before signatures)
    parts = key.removeprefix(PAUSE_KEY_PREFIX).rsplit("-", 2)
    version = parts[0] if len(parts) == 3 else "-".join(parts[:-1])
    if not key.startswith(PAUSE_KEY_PREFIX) or not version:
        raise NotPausedError(f"it is paused for something else (pause key {key!r})")
    return f"{run.name} ({flow_run_id}) asks approval of version {version}", key, starter


@audit_app.command("verify")
def audit_verify(
    path: Path | None = typer.Argument(None, help="Audit log (default: the one in state_dir)."),
    anchor: list[str] = typer.Option(
        [],
        "--anchor",
        help="ENTRIES:SHA256 taken earlier (`ballast audit anchor`, or a release's report): "
        "the log must still hold that entry unchanged. Repeatable.",
    ),
) -> None:
    """Check the hash chain; exit 1 naming the first broken entry if anything was edited."""
    from ballast.audit import Anchor, verify_chain
    from ballast.settings import get_settings

    try:
        anchors = [Anchor.parse(a) for a in anchor]
    except ValueError as exc:
        fail(BallastError(str(exc), stage="audit"))
    target = path or get_settings().audit_log
    problems = verify_chain(target, anchors)
    if problems:
        for p in problems:
            # One line each however long (paths), and a path's brackets are not markup.
            err.print(f"[bold red]audit[/] {escape(p)}", soft_wrap=True)
        raise typer.Exit(code=1)
    held = f", {len(anchors)} anchor(s) held" if anchors else ""
    console.print(f"audit log {target}: chain intact{held}")


@audit_app.command("anchor")
def audit_anchor(
    path: Path | None = typer.Argument(None, help="Audit log (default: the one in state_dir)."),
) -> None:
    """Print the log's anchor (ENTRIES:SHA256): keep it elsewhere, check with verify --anchor."""
    from ballast.audit import anchor as take_anchor
    from ballast.audit import verify_chain
    from ballast.settings import get_settings

    target = path or get_settings().audit_log
    if path is not None and not path.is_file():
        fail(BallastError(f"{path} is not a file: no audit log to anchor", stage="audit"))
    # An anchor vouches for everything before it: taken on a broken chain (or on a file that
    # is no audit log at all) it would vouch for that.
    problems = verify_chain(target) if target.is_file() else []
    if problems:
        fail(BallastError(f"{target}: {problems[0]}; not anchored", stage="audit"))
    typer.echo(take_anchor(target).text())
