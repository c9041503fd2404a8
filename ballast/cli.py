"""The ``ballast`` command line (typer). It is the composition root: commands import the flows and
the registry facade lazily, so ``ballast --help`` starts in well under a second."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any, Literal, cast

import typer
from rich.table import Table

from ballast.cli_approve import approve_command, approver_key_command, audit_app
from ballast.cli_data import data_app
from ballast.cli_shared import (
    console,
    err,
    fail,
    no_server_telemetry,
    prefect_unreachable,
    report,
)
from ballast.cli_stack import stack_app
from ballast.errors import BallastError, ConfigError, redact_uri_credentials
from ballast.settings import Settings, get_settings

app = typer.Typer(help="Ballast: release ML models you can trust.", no_args_is_help=True)
keys_app = typer.Typer(help="Key-encryption keys (local keyring).", no_args_is_help=True)
bench_app = typer.Typer(
    help="Benchmarks (each prints a table; --json adds one JSON line).", no_args_is_help=True
)
canary_app = typer.Typer(help="Canary tools.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(data_app, name="data")
app.add_typer(bench_app, name="bench")
app.add_typer(canary_app, name="canary")
app.add_typer(stack_app, name="stack")
app.add_typer(audit_app, name="audit")
app.command("approve")(approve_command)
app.command("approver-key")(approver_key_command)


def _drop_library_info(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or not record.name.startswith("great_expectations")


def _no_traceback_for_typed_errors(record: logging.LogRecord) -> bool:
    """Prefect logs a failed task's and flow's exception with its traceback; for our typed
    errors (bad data, a refused gate, a missing version) the message is the whole story and the
    command ends with it on one line. Any other exception keeps its traceback; -v keeps all."""
    exc = record.exc_info[1] if record.exc_info else None
    if isinstance(exc, BallastError):
        record.exc_info = None
        record.exc_text = None
    return True


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logs.")) -> None:
    # One structured line per step; configured here, never at import time.
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s level=%(levelname)s logger=%(name)s %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("httpx", "alembic", "mlflow", "urllib3", "botocore", "onnx_ir", "onnxscript"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Great Expectations forces INFO on one of its loggers when imported; a filter on the root
    # handler keeps its chatter out whatever level it sets.
    for handler in logging.getLogger().handlers:
        handler.addFilter(_drop_library_info)
        if not verbose:
            handler.addFilter(_no_traceback_for_typed_errors)
    # Bad settings stop every command here, before it does anything, even one that reads none
    # of them: a typo'd BALLAST_* variable is caught at once, not by the next command that
    # happens to read it. A subcommand's --help is parsed after this callback runs, and must
    # work whatever the environment holds.
    # A bare group ("ballast keys") prints its help too.
    # Global options ("ballast -v keys") do not make a group less bare.
    args = [a for a in sys.argv[1:] if a not in ("-v", "--verbose")]
    bare_group = len(args) == 1 and args[0] in {g.name for g in app.registered_groups}
    if not ({"--help", "-h"} & set(args)) and not bare_group:
        get_settings()


def _keyring(s: Settings) -> Any:
    from ballast.keys import LocalKeyring

    return LocalKeyring(s.keyring_path)


# -- keys ------------------------------------------------------------------------------------


@keys_app.command("create")
def keys_create() -> None:
    """Create a new key-encryption key in the local keyring and make it current."""
    s = get_settings()
    key_id = _keyring(s).create_key()
    console.print(f"created key [bold]{key_id}[/] in {s.keyring_path}")


@keys_app.command("list")
def keys_list() -> None:
    """List key ids (current, active and retired)."""
    ring = _keyring(get_settings())
    current = ring.current_key_id()
    for key_id in ring.key_ids():
        console.print(f"{key_id}{'  (current)' if key_id == current else ''}")
    for key_id in ring.retired_key_ids():
        console.print(f"{key_id}  (retired)")


@keys_app.command("export-public")
def keys_export_public(
    out: Path = typer.Argument(..., help="Where to write the PEM (overwritten)."),
) -> None:
    """Write the public half of the manifest signing key (BALLAST_SIGNING_KEY_PATH) as PEM:
    what verifiers (gateway pods) are given instead of the private key."""
    from ballast.manifest import export_public_key

    s = get_settings()
    if not s.signing_key_path.is_file():
        fail(ConfigError(f"no signing key at {s.signing_key_path}; nothing to export"))
    try:
        export_public_key(s.signing_key_path, out)
    except BallastError as exc:
        fail(exc)
    except OSError as exc:
        fail(ConfigError(f"cannot write {out}: {exc}"))
    console.print(f"wrote the public signing key to {out}")


@keys_app.command("rotate")
def keys_rotate(
    objects: list[Path] = typer.Argument(
        None, help="Encrypted files to re-wrap under the new key."
    ),
    retire_old: bool = typer.Option(False, help="Retire the previous key after re-wrapping."),
) -> None:
    """Create a new current key and re-wrap the given objects' data keys (headers only)."""
    from ballast.audit import record, writable_audit_log
    from ballast.crypto import read_header, rewrap_header
    from ballast.manifest import rewrap_signing_key

    s = get_settings()
    ring = _keyring(s)
    # Checked before the new key is made: a typo, a plaintext file or an unwritable audit log
    # must not leave a rotation half done.
    missing = [str(p) for p in objects or [] if not p.is_file()]
    if missing:
        fail(ConfigError(f"not a file: {', '.join(missing)}; nothing rotated"))
    for path in objects or []:
        try:
            with open(path, "rb") as fh:
                read_header(fh)
        except BallastError as exc:
            fail(ConfigError(f"{path}: {exc}; nothing rotated"))
        except OSError as exc:
            fail(ConfigError(f"cannot read {path}: {exc}; nothing rotated"))
    try:
        writable_audit_log(s.audit_log)
    except OSError as exc:
        fail(ConfigError(f"the audit log {s.audit_log} cannot be written ({exc}); nothing rotated"))
    old = ring.current_key_id()
    new = ring.rotate()
    rewrapped: list[str] = []
    signing_rewrapped: str | None = None
    error: BallastError | None = None
    try:
        for path in objects or []:
            rewrap_header(path, ring, new)
            rewrapped.append(str(path))
            with open(path, "rb") as fh:
                console.print(f"re-wrapped {path} under {read_header(fh).key_id}")
        # The manifest signing key, when wrapped by this keyring, moves to the new key too
        # (before the old key may be retired: afterwards nothing could unwrap it).
        signing_rewrapped = rewrap_signing_key(s.signing_key_path, ring)
        if signing_rewrapped:
            console.print(f"re-wrapped the signing key {s.signing_key_path} under {new}")
        if retire_old:
            ring.retire(old)
    except BallastError as exc:
        error = exc
    except OSError as exc:  # a file that went away or cannot be replaced mid-rotation
        error = ConfigError(f"re-wrapping stopped: {exc}")
    # Key ids and paths only, never key material. Written for a partial rotation too: the new
    # key is current either way, and the log must say which objects moved under it.
    record(
        s.audit_log,
        "key_rotate",
        model=s.model_name,
        version=None,
        keyring=str(s.keyring_path),
        old_key=old,
        new_key=new,
        rewrapped=rewrapped,
        signing_key_rewrapped=signing_rewrapped is not None,
        retired_old=retire_old and error is None,
        error=None if error is None else str(error),
    )
    if error is not None:
        fail(error)
    console.print(
        f"current key is now [bold]{new}[/] (was {old}{', retired' if retire_old else ''})"
    )


# -- release ---------------------------------------------------------------------------------


@app.command()
def release(
    dataset: str = typer.Option(None, help="Encrypted dataset URI (default: settings)."),
    inject_fault: str = typer.Option(
        None, help="Deliberately break the candidate: errors | latency | bad-weights."
    ),
    approval: str = typer.Option(None, help="Approval policy: auto | manual (default: settings)."),
) -> None:
    """Run the release flow once: ingest, train, compile, register, approve, canary, decide."""
    from ballast.serving import Fault
    from flows.release import release_flow

    if inject_fault not in (None, "errors", "latency", "bad-weights"):
        raise typer.BadParameter("inject-fault must be errors, latency or bad-weights")
    if approval not in (None, "auto", "manual"):
        raise typer.BadParameter("approval must be auto or manual")
    try:
        with no_server_telemetry():
            report = release_flow(
                dataset_uri=dataset,
                inject_fault=cast(Fault | None, inject_fault),
                approval_policy=cast(Literal["auto", "manual"] | None, approval),
            )
    except BallastError as exc:  # bad data, a failed gate, a refused approval: one line
        default = get_settings().default_dataset_uri
        local = "://" not in default
        if dataset is None and exc.stage == "fetch" and local and not Path(default).exists():
            # The first thing a new user meets: say how to make the dataset.
            console.print(f"no dataset at {default}: `ballast data prepare` makes it")
        fail(exc)
    except RuntimeError as exc:
        fail(prefect_unreachable(exc))
    console.print_json(json.dumps(report.__dict__, default=str))
    if report.outcome not in ("promoted", "rolled_back", "rejected", "unchanged"):
        raise typer.Exit(code=1)


@app.command()
def rollback(
    model: str = typer.Argument(None, help="Model name (default: settings)."),
    force: bool = typer.Option(
        False, "--force", help="Roll back even while a canary or shadow trial is in force."
    ),
) -> None:
    """Move `champion` back to `previous` and point the gateway at it."""
    from ballast.errors import TrialInForce
    from flows.rollback import rollback_flow

    try:
        with no_server_telemetry():
            result = rollback_flow(model_name=model, force=force)
    except BallastError as exc:
        if isinstance(exc, TrialInForce):
            err.print("a running release owns the deployment; --force abandons it")
        fail(exc)
    except RuntimeError as exc:
        fail(prefect_unreachable(exc))
    console.print(result)


@app.command()
def serve(host: str = typer.Option(None), port: int = typer.Option(None, min=1, max=65535)) -> None:
    """Run the serving gateway in the foreground (Ctrl-C drains and stops it)."""
    import os
    import subprocess

    s = get_settings()
    if host is not None:
        from ballast.settings import check_host

        try:  # what BALLAST_GATEWAY_HOST is held to: a name or address, not a URL
            check_host(host)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--host") from None
    cmd = [sys.executable, "-m", "infra.gateway", "--host", host or s.gateway_host]
    cmd += ["--port", str(port or s.gateway_port)]
    if os.name == "posix":
        # This process becomes the gateway (same pid): Ctrl-C, SIGTERM and SIGHUP reach it
        # directly and it drains; a child would be SIGKILLed by subprocess.call on Ctrl-C and
        # left serving on SIGTERM. Nothing here has to run after it.
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sys.executable, cmd)
    # Elsewhere Ctrl-C reaches every process on the console: wait for the gateway's drain.
    proc = subprocess.Popen(cmd)
    while True:
        try:
            raise typer.Exit(code=proc.wait())
        except KeyboardInterrupt:
            continue


@app.command()
def status(model: str = typer.Argument(None)) -> None:
    """Versions, aliases, verdicts and the gateway's live weights."""
    from ballast.gateway_client import GatewayClient
    from ballast.release import TAG_STATUS, TAG_VERDICT
    from model_registry import Registry

    s = get_settings()
    name = model or s.model_name
    # Asked interactively: an MLflow server that is not there is said in seconds, not after
    # MLflow's minutes of retries.
    reg = Registry(s.tracking_uri, s.artifact_root, probe_timeout_s=3.0)
    table = Table(title=f"{name} in {redact_uri_credentials(s.tracking_uri)}")
    for col in ("version", "aliases", "status", "verdict", "accuracy"):
        table.add_column(col)
    for v in reg.list_versions(name):
        table.add_row(
            v.version,
            ",".join(v.aliases),
            v.tags.get(TAG_STATUS, ""),
            v.tags.get(TAG_VERDICT, ""),
            v.tags.get("ballast.accuracy", ""),
        )
    console.print(table)
    with GatewayClient(s.gateway_url, s.admin_token(), timeout=1.0) as gw:
        if gw.health():
            dep = gw.get_deployment()
            console.print(
                f"gateway {s.gateway_url}: {dep.model_dump_json() if dep else 'nothing deployed'}"
            )
        else:
            console.print(f"gateway {s.gateway_url}: not running")


@app.command()
def demo(
    fault: str = typer.Option("errors", help="Fault injected into release 2: errors | latency."),
) -> None:
    """Release 1 (promoted), then a broken release 2 that the canary rolls back.

    The demo works in its own state folder (``<state_dir>/demo``, made afresh each time) and on a
    free port, so it never touches your registry, your champion or a gateway you run.
    """
    import os
    import shutil

    from ballast.demo import run_demo
    from ballast.serving import Fault

    if fault not in ("errors", "latency"):
        raise typer.BadParameter("fault must be errors or latency (bad-weights stops at the gate)")
    import contextlib

    from ballast.locks import held_or_refused

    # Set before the process's one settings object is first read.
    parent = Path(os.environ.get("BALLAST_STATE_DIR", ".ballast"))
    demo_dir = parent / "demo"
    if demo_dir.is_symlink():
        fail(ConfigError(f"{demo_dir} is a symlink: the demo deletes and remakes that folder"))
    # One demo at a time: a second would delete the first's state under it.
    with contextlib.ExitStack() as held:
        try:
            busy = ConfigError(f"another ballast demo is running in {parent}")
            held.enter_context(held_or_refused(parent / "demo.lock", busy))
        except ConfigError as exc:
            fail(exc)
        shutil.rmtree(demo_dir, ignore_errors=True)
        os.environ["BALLAST_STATE_DIR"] = str(demo_dir)
        os.environ["BALLAST_GATEWAY_PORT"] = str(_free_port())
        # Nothing of yours: your registry, dataset, model name, KMS key and gateway stay out
        # of it (settings that point elsewhere fall back to the demo folder's own).
        for name in _DEMO_RESETS:
            os.environ.pop(name, None)
        # The demo is a dev sandbox: it approves by policy whatever environment you are in.
        os.environ["BALLAST_ENVIRONMENT"] = "dev"
        get_settings.cache_clear()
        try:
            code = run_demo(get_settings(), fault=cast(Fault, fault), console=console)
        except BallastError as exc:
            fail(exc)
        except RuntimeError as exc:  # PREFECT_API_URL set to a server that is down
            fail(prefect_unreachable(exc))
        except KeyboardInterrupt:
            console.print(
                "interrupted: the demo's gateway is stopped, its state left in " + str(demo_dir)
            )
            raise typer.Exit(code=130) from None
    raise typer.Exit(code=code)


# Settings that could point the demo at someone's own registry, data, keys or gateway.
_DEMO_RESETS = (
    "BALLAST_MLFLOW_TRACKING_URI",
    "BALLAST_DATASET_URI",
    "BALLAST_MODEL_NAME",
    "BALLAST_DATASET_NAME",
    "BALLAST_KMS_KEY_ID",
    "BALLAST_KMS_TRUSTED_KEY_IDS",
    "BALLAST_GATEWAY_HOST",
    "BALLAST_GATEWAY_ADMIN_TOKEN",
    "BALLAST_GATEWAY_AUTOSTART",
    "BALLAST_APPROVAL_POLICY",
)


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- bench and canary tools: each lives in its own module with an argparse main(argv) ----------

_PASS = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}


def _run_main(module: str, ctx: typer.Context) -> None:
    import importlib

    main = importlib.import_module(module).main
    raise typer.Exit(code=int(main(list(ctx.args)) or 0))


@bench_app.command("data", context_settings=_PASS)
def bench_data(ctx: typer.Context) -> None:
    """Decrypt and validation throughput, peak memory (--help for options)."""
    _run_main("ballast.bench.data", ctx)


@bench_app.command("compile", context_settings=_PASS)
def bench_compile(ctx: typer.Context) -> None:
    """Eager vs each available compile backend at batch 1, 64 and large (--help for options)."""
    _run_main("ballast.bench.compile", ctx)


@bench_app.command("serving", context_settings=_PASS)
def bench_serving(ctx: typer.Context) -> None:
    """The gateway against its peers under load (--help for options)."""
    _run_main("ballast.bench.serving", ctx)


@canary_app.command("simulate", context_settings=_PASS)
def canary_simulate(ctx: typer.Context) -> None:
    """Traffic scenarios through the real judge on simulated time (--help for options)."""
    _run_main("ballast.simulate", ctx)


def main() -> None:
    """The ``ballast`` command: a typed error a command did not handle itself (bad settings,
    most often) ends it as one line naming its stage, exit 2, instead of a traceback."""
    try:
        app()
    except BallastError as exc:
        report(exc)
        raise SystemExit(2) from None


if __name__ == "__main__":  # pragma: no cover
    main()
