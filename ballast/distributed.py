"""Data-parallel training: how many ranks, the ``torchrun`` command line, and a launcher that
never leaves a rank behind.

- :func:`resolve_world_size` turns the ``auto`` / integer setting into processes per node
  (``auto``: one per visible GPU, 1 on CPU).
- :func:`torchrun_argv` builds ``python -m torch.distributed.run ...`` (torchrun with this
  interpreter): ``--standalone`` on one node, ``--nnodes`` / ``--rdzv-*`` passed through for a
  cluster; no elastic restarts (a failed rank fails the job; resume comes from checkpoints).
- :func:`launch` runs it in its own process group, streams every output line to a callback and
  enforces a wall-clock timeout; on a failure or timeout it stops torchrun and every rank (ranks
  run in sessions of their own, found through the pid files they write) and raises
  :class:`~ballast.errors.DistributedTrainingError`.
- :func:`train_data_parallel` is ``ballast.training.train`` over N processes: it writes the
  validated arrays to a private (0700) folder, launches :mod:`ballast.ddp_worker` on every rank,
  reads back rank 0's result as the same :class:`~ballast.training.TrainResult` and deletes the
  folder (the plaintext with it) on every exit path. A one-node launch whose rank crashed (SIGABRT,
  SIGSEGV, SIGBUS) before the first epoch ended, the signature of a transport fault while the
  ranks connect, is relaunched, up to twice (:func:`relaunchable`); one whose rank crashed so
  after rank 0 wrote its result (tearing the process group down) keeps the result
  (:func:`crashed_in_teardown`); anything else fails.

Nothing here imports pydantic, Prefect, MLflow or cryptography: a GPU image with only torch,
numpy, pandas and scikit-learn runs it (``benchmarks/ddp_bench.py``). Configuration is passed in
explicitly, never read from ``ballast.settings``.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ballast.errors import ConfigError, DistributedTrainingError, redact_uri_credentials

if TYPE_CHECKING:
    from ballast.data import ValidatedDataset
    from ballast.training import TrainResult

log = logging.getLogger(__name__)

WORKER_MODULE = "ballast.ddp_worker"
#: Files inside one launch's private folder.
SPEC_FILE, DATA_FILE, RESULT_FILE, PID_DIR = "job.json", "data.npz", "result.pt", "pids"
TAIL_LINES = 40
#: How many of a launch's error-looking lines its error message keeps (the first ones: the
#: cause comes before the ranks its failure took down and torchrun's summary).
ERROR_LINES = 5
# A rank's own report (ballast.ddp_worker prints "rank=N [stage] ..." for a BallastError and logs
# "rank=N ERROR ..."), listed first; then anything that looks like an error (a C++ abort, a
# Python exception), torchrun's own traceback included.
_RANK_ERROR_LINE = re.compile(r"^rank=\S+ (\[\w+\]|ERROR|CRITICAL)")
_ERROR_LINE = re.compile(
    r"terminate called|what\(\):|Traceback|Error|Exception|Segmentation fault|Aborted|Killed"
)
# torchrun's failure summary: "Failures:" and "Root Cause (first observed failure):", each
# rank's block with an "exitcode  : -6 (pid: ...)" line.
_FAILURES, _ROOT_CAUSE = "Failures:", "Root Cause (first observed failure):"
_EXITCODE = re.compile(r"^\s*exitcode\s*:\s*(-?\d+)(?:\s*\(pid:\s*(\d+)\))?")
# torchrun's own stop of the ranks still running once one failed.
_TERMINATING = re.compile(r"Sending process (\d+) closing signal SIGTERM")
SUMMARY_LINES = 20_000  # what is kept of torchrun's summary (7 lines per failed rank)
#: Signals that, before the first epoch, mean a fault in the ranks' transport or runtime (gloo
#: aborts on some connection races while the mesh forms) rather than a decision to stop
#: (SIGKILL, SIGTERM: an operator, the OOM killer) or an error in the job (an exit status).
RELAUNCH_SIGNALS = frozenset({signal.SIGABRT, signal.SIGSEGV, signal.SIGBUS})
_SIGNALS = frozenset(int(s) for s in signal.Signals)
_EPOCH_LINE = re.compile(r"^stage=train rank=0 .*\bepoch=\d+")
# Rank 0's last line, printed once its result file is in place (ballast.ddp_worker).
_DONE_LINE = re.compile(r"^stage=train rank=0 .*\bdone epochs=\d+")


def resolve_world_size(setting: str | int, *, device: str, visible_gpus: int) -> int:
    """Processes per node: ``auto`` is one per visible GPU (1 on CPU or without GPUs); an integer
    is taken as given, but CUDA training needs a GPU per process."""
    text = str(setting).strip().lower()
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device must be auto, cpu or cuda, got {device!r}")
    uses_gpu = device == "cuda" or (device == "auto" and visible_gpus > 0)
    if device == "cuda" and visible_gpus < 1:
        raise ConfigError("device 'cuda' requested but no CUDA device is visible")
    if text == "auto":
        return visible_gpus if uses_gpu else 1
    if not re.fullmatch(r"[0-9]+", text) or int(text) < 1:
        raise ConfigError(f"train world size must be 'auto' or a positive integer, got {setting!r}")
    n = int(text)
    if uses_gpu and n > visible_gpus:
        raise ConfigError(f"{n} CUDA processes per node need {n} GPUs; {visible_gpus} visible")
    return n


def backend_for(device: str) -> str:
    """nccl between GPUs, gloo between CPU processes."""
    return "nccl" if device == "cuda" else "gloo"


def threads_per_process(nproc: int, cpus: int | None) -> int:
    """CPU threads for each of ``nproc`` processes sharing ``cpus`` cores (at least one each)."""
    return max(1, (cpus or 1) // max(1, nproc))


@dataclass(frozen=True)
class Topology:
    """Where the ranks run. One node (the default) needs nothing else; several need a
    rendezvous endpoint (``host:port`` of a c10d store every node reaches) and a job id."""

    nproc_per_node: int
    nnodes: int = 1
    rdzv_endpoint: str = ""
    rdzv_id: str = ""
    rdzv_backend: str = "c10d"

    def __post_init__(self) -> None:
        if self.nproc_per_node < 1 or self.nnodes < 1:
            raise ConfigError(
                f"nproc_per_node and nnodes must be >= 1, got {self.nproc_per_node}, {self.nnodes}"
            )
        if self.nnodes > 1 and not (self.rdzv_endpoint and self.rdzv_id):
            raise ConfigError(
                f"{self.nnodes} nodes need a rendezvous endpoint (host:port) and a job id "
                "that every node shares"
            )
        if self.rdzv_id and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}", self.rdzv_id):
            # It names the shared launch folder the other nodes read the job from.
            raise ConfigError(f"rendezvous id must be [A-Za-z0-9_.-]{{1,63}}, got {self.rdzv_id!r}")

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes

    @property
    def distributed(self) -> bool:
        """False for one process on one node: plain ``train()``, no torchrun."""
        return self.world_size > 1


def torchrun_argv(
    topology: Topology,
    module_args: Iterable[str],
    *,
    module: str = WORKER_MODULE,
    python: str = sys.executable,
) -> list[str]:
    """The torchrun command line (as ``python -m torch.distributed.run``, so the same interpreter
    and environment run every rank)."""
    argv = [python, "-m", "torch.distributed.run"]
    if topology.nnodes == 1 and not topology.rdzv_endpoint:
        argv.append(
            "--standalone"
        )  # a rendezvous on a free port (its store listens on all interfaces: see the docs)
    else:
        argv += [
            f"--nnodes={topology.nnodes}",
            f"--rdzv-backend={topology.rdzv_backend}",
            f"--rdzv-endpoint={topology.rdzv_endpoint}",
            f"--rdzv-id={topology.rdzv_id}",
        ]
    # No elastic restarts: a failed rank fails the launch; checkpoints give the resume.
    argv += [f"--nproc-per-node={topology.nproc_per_node}", "--max-restarts=0"]
    return [*argv, "-m", module, *module_args]


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie does not; one of another user does)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie counts as gone: it holds no resources and its parent will reap it.
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    return True


def worker_pids(run_dir: Path) -> list[int]:
    """Pids the ranks of one launch wrote (``pids/rank-N.pid``), whether or not still alive."""
    pids = []
    for f in sorted((run_dir / PID_DIR).glob("rank-*.pid")):
        with contextlib.suppress(OSError, ValueError):
            pids.append(int(f.read_text().strip()))
    return pids


def _is_rank_of(pid: int, run_dir: Path) -> bool:
    # Guards against a recycled pid: the process must still be a rank of this launch.
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return False
    except OSError:
        return True  # no /proc here (macOS): trust the pid file
    return str(run_dir).encode() in cmdline


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def stop_all(proc: subprocess.Popen[bytes], run_dir: Path | None, *, grace_s: float = 10.0) -> None:
    """Stop torchrun (SIGTERM lets it stop its ranks; SIGKILL after ``grace_s``), then SIGKILL
    any rank still alive, and wait until none is."""
    if proc.poll() is None:
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait(timeout=grace_s)
    # Only this node's live ranks of this launch: a shared folder also holds other nodes' pids,
    # which here may name unrelated processes.
    pids = [
        p
        for p in (worker_pids(run_dir) if run_dir is not None else [])
        if pid_alive(p) and _is_rank_of(p, run_dir or Path())
    ]
    for pid in pids:
        _signal_group(pid, signal.SIGKILL)  # each rank leads its own session
    deadline = time.monotonic() + grace_s
    while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = [p for p in pids if pid_alive(p)]
    if left:
        log.error("ranks still alive after SIGKILL: %s", left)


def launch(
    argv: list[str],
    *,
    timeout_s: float,
    on_line: Callable[[str], None] | None = None,
    env: Mapping[str, str] | None = None,
    run_dir: Path | None = None,
    grace_s: float = 10.0,
) -> None:
    """Run ``argv`` (torchrun) to completion within ``timeout_s`` seconds.

    stdout and stderr of torchrun and every rank arrive line by line at ``on_line``. A non-zero
    exit, a timeout or an interrupt of the caller stops every process of the launch before
    :class:`DistributedTrainingError` (or the interrupt) propagates.
    """
    if timeout_s <= 0:
        raise ConfigError(f"timeout_s must be > 0, got {timeout_s}")
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    rank_errors: list[str] = []
    other_errors: list[str] = []
    # torchrun's failure summary from its last "Failures:" line on (one block per failed rank:
    # with many ranks it outgrows the tail), and the pids torchrun itself sent SIGTERM.
    summary: list[str] = []
    terminated: set[int] = set()
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=dict(env) if env is not None else None,
        start_new_session=True,  # its own group: one signal reaches torchrun and its helpers
    )

    def pump() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            # Redacted here, before anything keeps or logs it: a rank may print a URI with
            # credentials (a tracking server's, an object store's).
            line = redact_uri_credentials(raw.decode("utf-8", "replace").rstrip())
            tail.append(line)
            if line.strip() == _FAILURES:
                summary[:] = [line]
            elif summary and len(summary) < SUMMARY_LINES:
                summary.append(line)
            if (m := _TERMINATING.search(line)) is not None:
                terminated.add(int(m.group(1)))
            if len(rank_errors) < ERROR_LINES and _RANK_ERROR_LINE.match(line):
                rank_errors.append(line.strip())
            elif len(other_errors) < ERROR_LINES and _ERROR_LINE.search(line):
                other_errors.append(line.strip())
            if on_line is not None:
                try:
                    on_line(line)
                except Exception:  # a broken log handler must not stop draining the pipe
                    log.exception("on_line callback failed")

    reader = threading.Thread(target=pump, name="torchrun-output", daemon=True)
    reader.start()
    started = time.monotonic()
    rc: int | None = None
    try:
        rc = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        pass
    finally:
        # Also on success: a rank that outlived torchrun must not survive the launch.
        stop_all(proc, run_dir, grace_s=grace_s)
        reader.join(timeout=grace_s)
        if proc.stdout is not None:
            proc.stdout.close()
    seconds = time.monotonic() - started
    if rc is None:
        raise DistributedTrainingError(
            f"data-parallel training did not finish within {timeout_s:g} s; every rank was "
            f"stopped. Last output: {' | '.join(list(tail)[-5:])}",
            timed_out=True,
            tail=tuple(tail),
        )
    if rc != 0:
        errors = (rank_errors + other_errors)[:ERROR_LINES]
        root_code, failures = summary_failures(summary)
        root = _killed_by(root_code)
        killed = f", rank killed by {signal.Signals(root).name}" if root in _SIGNALS else ""
        raise DistributedTrainingError(
            f"data-parallel training failed after {seconds:.1f} s (torchrun exit {rc}{killed}); "
            f"every rank was stopped. First errors: {' | '.join(errors) or 'none printed'}. "
            f"Last output: {' | '.join(list(tail)[-5:])}",
            returncode=rc,
            tail=tuple(tail),
            errors=tuple(errors),
            root_signal=root,
            seconds=seconds,
            failures=failures,
            terminated=frozenset(terminated),
        )


def summary_failures(
    lines: Iterable[str],
) -> tuple[int | None, tuple[tuple[int, int | None], ...]]:
    """From torchrun's failure summary (read from its last ``Failures:`` line): the root-cause
    rank's exit code (negative: the signal that killed it; None: no summary) and every failed
    rank's (exit code, pid), the root's included."""
    section: str | None = None
    root: int | None = None
    failures: list[tuple[int, int | None]] = []
    for line in lines:
        if line.strip() == _FAILURES:
            section, root, failures = _FAILURES, None, []
        elif line.strip() == _ROOT_CAUSE and section is not None:
            section = _ROOT_CAUSE
        elif section is not None and (m := _EXITCODE.match(line)):
            failures.append((int(m.group(1)), int(m.group(2)) if m.group(2) else None))
            if section == _ROOT_CAUSE and root is None:
                root = failures[-1][0]
    return root, tuple(failures)


def root_cause_signal(lines: Iterable[str]) -> int | None:
    """The signal that killed torchrun's root-cause rank (None: it exited with a status, or
    there is no summary)."""
    return _killed_by(summary_failures(lines)[0])


def _killed_by(exitcode: int | None) -> int | None:
    """The signal a negative exit code stands for (None: an exit status, or no code)."""
    return -exitcode if exitcode is not None and exitcode < 0 else None


def relaunchable(err: DistributedTrainingError, *, epoch_ended: bool, nnodes: int) -> bool:
    """Whether a failed launch is worth one more: a rank crashed by a fault signal before any
    epoch ended, on a launch this process controls alone (one node: other nodes' agents fail
    with it and are started by someone else), and no rank failed otherwise. A timeout, an exit
    status (a Python error, an orphaned rank) of any rank, SIGKILL, or a crash after training
    began fail at once. Every rank's code counts, not only the root cause's: torchrun stamps
    failures to the second and breaks ties by rank, so a rank that raised and another that
    aborted when its peer vanished can show the abort as the root cause."""
    return nnodes == 1 and not epoch_ended and _only_faults(err)


def crashed_in_teardown(err: DistributedTrainingError, *, done: bool) -> bool:
    """Whether a failed launch's result stands: rank 0 had written it and said so (``done``:
    after the last collective of training, so every rank had finished training), and the
    failure is only a rank crashed by a fault signal (gloo has aborted ranks as they tear the
    process group down) or torchrun's own stop of the others. A timeout, an exit status or
    SIGKILL/SIGTERM from anyone else still fail the launch."""
    return done and _only_faults(err)


def _only_faults(err: DistributedTrainingError) -> bool:
    faults = {-int(s) for s in RELAUNCH_SIGNALS}

    def explained(code: int, pid: int | None) -> bool:
        # A fault signal, or the SIGTERM torchrun itself sent the ranks still running (a
        # SIGTERM from anyone else is a decision to stop).
        sigterm = code == -int(signal.SIGTERM) and pid is not None and pid in err.terminated
        return code in faults or sigterm

    return (
        not err.timed_out
        and err.root_signal is not None
        and err.root_signal in RELAUNCH_SIGNALS
        and bool(err.failures)
        and all(explained(code, pid) for code, pid in err.failures)
    )


#: How many times a one-node launch whose rank crashed while the ranks connect is started again.
#: Such crashes are rare (none in 50 launches on the 2-core box, 2026-11-29), but CI has seen
#: one in a relaunch: with a single relaunch that failed the training.
RELAUNCHES = 2


def _launch_relaunching(
    argv: list[str],
    topology: Topology,
    *,
    timeout_s: float,
    on_line: Callable[[str], None] | None,
    env: Mapping[str, str],
    run_dir: Path,
) -> None:
    """:func:`launch`, and again (up to :data:`RELAUNCHES` times) when :func:`relaunchable`
    says so, within ``timeout_s`` in all."""
    epoch_ended = threading.Event()
    done = threading.Event()  # this launch's rank 0 wrote its result

    def watch(line: str) -> None:
        if _EPOCH_LINE.match(line):
            epoch_ended.set()
        elif _DONE_LINE.match(line):
            done.set()
        if on_line is not None:
            on_line(line)

    started = time.monotonic()
    # The first failure (what the relaunches are for) and the latest one.
    failures: list[DistributedTrainingError] = []
    for attempt in range(RELAUNCHES + 1):
        left = timeout_s - (time.monotonic() - started)
        if failures:
            last = failures[-1]
            if left <= (last.seconds or 0.0):
                # Not even the time the failed start took is left: the crash stands.
                raise last if attempt == 1 else _relaunched(last, attempt - 1, failures[0])
            log.warning(
                "stage=train relaunch=%d reason=%s after_s=%.1f errors=%s",
                attempt,
                signal.Signals(last.root_signal or signal.SIGABRT).name,
                last.seconds or 0.0,
                " | ".join(last.errors) or "none printed",
            )
            shutil.rmtree(run_dir / PID_DIR, ignore_errors=True)  # the last launch's are stale
        done.clear()
        try:
            launch(argv, timeout_s=left, on_line=watch, env=env, run_dir=run_dir)
            return
        except DistributedTrainingError as err:
            if crashed_in_teardown(err, done=done.is_set()) and (run_dir / RESULT_FILE).is_file():
                # Training had ended on every rank: the result is read (and checked) as usual.
                log.warning(
                    "stage=train teardown_crash=%s result=kept errors=%s",
                    signal.Signals(err.root_signal or signal.SIGABRT).name,
                    " | ".join(err.errors) or "none printed",
                )
                return
            again = attempt < RELAUNCHES and relaunchable(
                err, epoch_ended=epoch_ended.is_set(), nnodes=topology.nnodes
            )
            if not again:
                if not failures:
                    raise
                raise _relaunched(err, attempt, failures[0]) from failures[0]
            failures.append(err)


def _relaunched(
    err: DistributedTrainingError, times: int, first: DistributedTrainingError
) -> DistributedTrainingError:
    """``err`` of the last launch, saying how often it was relaunched and why."""
    return DistributedTrainingError(
        f"{err.message} (relaunched {'once' if times == 1 else f'{times} times'} after the "
        f"first launch's rank crashed while starting: {first.message})",
        returncode=err.returncode,
        timed_out=err.timed_out,
        tail=err.tail,
        errors=err.errors,
        root_signal=err.root_signal,
        seconds=err.seconds,
        failures=err.failures,
        terminated=err.terminated,
    )


def merged_model_params(
    hidden: int | None, model_params: Mapping[str, Any] | None
) -> dict[str, Any]:
    """``train``'s rule: ``model_params`` win over the ``hidden`` shortcut."""
    merged = dict(model_params or {})
    if hidden is not None:
        merged.setdefault("hidden", hidden)
    return merged


def run_dir_for(work_dir: Path, rdzv_id: str) -> Path:
    """The launch folder every node of a multi-node job reads its spec from: named after the
    rendezvous id, so the other nodes (infra/k8s/training-job.yaml) know the path in advance."""
    return Path(work_dir).resolve() / f"ddp-{rdzv_id}"


def _launcher_alive(job: Path) -> bool:
    """Whether the launch whose spec is ``job`` may still be running (unknown: assume so)."""
    try:
        launcher = json.loads(job.read_text())["launcher"]
        pid, host = int(launcher["pid"]), str(launcher["host"])
    except (OSError, ValueError, KeyError, TypeError):
        return True
    return host != socket.gethostname() or pid_alive(pid)


def sweep_stale_runs(work_dir: Path) -> list[Path]:
    """Remove the private folders of launches whose launcher died without cleaning up (SIGKILL,
    OOM): their decrypted arrays must not stay on disk. Returns what was removed."""
    removed = []
    for run_dir in sorted(work_dir.glob("ddp-*")):
        job = run_dir / SPEC_FILE
        if job.is_file() and not _launcher_alive(job):
            shutil.rmtree(run_dir, ignore_errors=True)
            removed.append(run_dir)
    return removed


def _private_run_dir(work_dir: Path, topology: Topology) -> Path:
    work_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    for stale in sweep_stale_runs(work_dir):
        log.warning("stage=train removed the folder of a launch whose launcher died: %s", stale)
    if topology.nnodes == 1:
        return Path(tempfile.mkdtemp(prefix="ddp-", dir=work_dir)).resolve()  # 0700 by mkdtemp
    run_dir = run_dir_for(work_dir, topology.rdzv_id)
    try:
        run_dir.mkdir(mode=0o700)
    except FileExistsError:
        raise ConfigError(
            f"{run_dir} exists: rendezvous id {topology.rdzv_id!r} is in use by another launch"
        ) from None
    return run_dir


def _write_private(path: Path, write: Callable[[Any], None]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        write(fh)


def read_result(
    path: Path,
    ds: ValidatedDataset,
    *,
    model_params: Mapping[str, Any],
    test_fraction: float,
    val_fraction: float,
    seed: int,
) -> TrainResult:
    """Rank 0's result file back into a :class:`TrainResult` (model on CPU, eval mode): the model
    is rebuilt from its spec and the split recomputed (same seed, same rows, same split)."""
    import numpy as np
    import torch

    from ballast.models import get_spec
    from ballast.training import EpochRecord, TrainResult, class_count, split_dataset

    if not path.is_file():
        raise DistributedTrainingError(f"rank 0 wrote no result ({path.name} is missing)")
    out = torch.load(path, map_location="cpu", weights_only=True)
    spec = get_spec(str(out["model_name"]))
    split = split_dataset(ds, test_fraction=test_fraction, seed=seed, val_fraction=val_fraction)
    net = spec.build(
        spec.params(model_params),
        n_features=ds.features.shape[1],
        n_classes=class_count(ds),
        mean=np.asarray(split.x_train.mean(axis=0)),
        std=np.asarray(split.x_train.std(axis=0)),
    )
    net.load_state_dict(out["state_dict"])
    return TrainResult(
        model=net.to("cpu").eval(),
        metrics={k: float(v) for k, v in out["metrics"].items()},
        params={k: str(v) for k, v in out["params"].items()},
        device=str(out["device"]),
        seconds=float(out["seconds"]),
        split=split,
        history=tuple(EpochRecord(int(e), tl, vl, va) for e, tl, vl, va in out["history"]),
        model_name=spec.name,
        resumed_from_epoch=out["resumed_from_epoch"],
        stopped_early=bool(out["stopped_early"]),
        best_epoch=int(out["best_epoch"]),
        checkpoint_key=str(out["checkpoint_key"]),
    )


def train_data_parallel(
    ds: ValidatedDataset,
    *,
    topology: Topology,
    work_dir: Path,
    epochs: int,
    learning_rate: float,
    batch_size: int,
    seed: int,
    model: str,
    hidden: int | None = None,
    model_params: Mapping[str, Any] | None = None,
    device: str = "cpu",
    test_fraction: float = 0.25,
    val_fraction: float = 0.15,
    patience: int | None = 10,
    min_delta: float = 0.0,
    torch_compile: bool = False,
    checkpoint_dir: Path | None = None,
    timeout_s: float = 3600.0,
    threads: int | None = None,
    pause_after_epoch_s: float = 0.0,
    on_line: Callable[[str], None] | None = None,
) -> TrainResult:
    """``ballast.training.train`` on ``topology.world_size`` processes launched with torchrun.

    ``device`` is ``cpu`` (gloo) or ``cuda`` (nccl, one GPU per process); ``batch_size`` is the
    global batch, shared out among the ranks. ``work_dir`` gets a private folder for the launch
    (the arrays, the job spec, rank pids and rank 0's result), removed on every exit path. With
    several nodes it must be on storage every node mounts: the folder is then
    ``ddp-<rendezvous id>`` (:func:`run_dir_for`) and every other node runs the same torchrun
    command with ``--spec`` pointing into it (docs/distributed-training.md). ``threads``: torch CPU threads per
    process (default: this machine's cores shared out). ``pause_after_epoch_s`` slows each
    epoch so a test or demo can interrupt a run.
    """
    import numpy as np

    if device not in ("cpu", "cuda"):
        raise ConfigError(f"data-parallel device must be cpu or cuda, got {device!r}")
    if not (timeout_s > 0 and math.isfinite(timeout_s)):
        raise ConfigError(f"timeout_s must be a finite number > 0, got {timeout_s}")
    if device == "cuda":
        import torch

        # Here, not in a rank: there the missing GPU surfaced as torch internals failing
        # (AttributeError: torch._C has no _cuda_setDevice) after torchrun had started.
        resolve_world_size(
            topology.nproc_per_node, device="cuda", visible_gpus=torch.cuda.device_count()
        )
    params = merged_model_params(hidden, model_params)
    run_dir = _private_run_dir(Path(work_dir), topology)
    try:
        _write_private(
            run_dir / DATA_FILE,
            lambda fh: np.savez(fh, features=ds.features, labels=ds.labels),
        )
        job = {
            "run_dir": str(run_dir),
            "dataset": {
                "name": ds.name,
                "sha256": ds.sha256,
                "feature_names": list(ds.feature_names),
                "n_classes": ds.n_classes,
            },
            "train": {
                "epochs": epochs,
                "learning_rate": learning_rate,
                "batch_size": batch_size,
                "seed": seed,
                "model": model,
                "model_params": params,
                "device": device,
                "test_fraction": test_fraction,
                "val_fraction": val_fraction,
                "patience": patience,
                "min_delta": min_delta,
                "torch_compile": torch_compile,
                "checkpoint_dir": str(Path(checkpoint_dir).resolve()) if checkpoint_dir else None,
            },
            "backend": backend_for(device),
            "threads": threads or threads_per_process(topology.nproc_per_node, os.cpu_count()),
            "collective_timeout_s": timeout_s,
            "pause_after_epoch_s": pause_after_epoch_s,
            # Ranks on this host stop (and rank 0 removes this folder, plaintext included) if
            # the launcher dies without cleaning up: SIGKILL, OOM, a pod deleted.
            "launcher": {"pid": os.getpid(), "host": socket.gethostname()},
        }
        _write_private(run_dir / SPEC_FILE, lambda fh: fh.write(json.dumps(job).encode()))
        argv = torchrun_argv(topology, ["--spec", str(run_dir / SPEC_FILE)])
        env = {**os.environ, "OMP_NUM_THREADS": str(job["threads"]), "PYTHONUNBUFFERED": "1"}
        log.info(
            "stage=train launcher=torchrun world_size=%d nnodes=%d backend=%s run_dir=%s",
            topology.world_size,
            topology.nnodes,
            job["backend"],
            run_dir,
        )
        _launch_relaunching(
            argv, topology, timeout_s=timeout_s, on_line=on_line, env=env, run_dir=run_dir
        )
        return read_result(
            run_dir / RESULT_FILE,
            ds,
            model_params=params,
            test_fraction=test_fraction,
            val_fraction=val_fraction,
            seed=seed,
        )
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)  # the plaintext arrays never outlive the launch
