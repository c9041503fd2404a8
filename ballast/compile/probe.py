"""Open a native compiled artefact in a child process before this process does.

AOTInductor packages and TensorRT engines are opened by native code. A crash there kills the
process that loads it: the whole flow run, or a gateway replica with every version it serves,
not only the step. Seen on a lent H200 (torch 2.11.0+cu130): loading a CUDA AOTInductor package
died with SIGSEGV inside ``aoti_load_package``, every time. So the artefact is first opened,
and run on one row of zeros and on two, in a child (``python -X faulthandler``, :func:`main`);
a signal, a non-zero exit or a timeout there becomes a :class:`CompileError` naming it, with
the child's own account (faulthandler prints the Python stack of a crash, and of a hang shortly
before the timeout). The child has a process group of its own, all of it killed on a timeout,
and ends itself if the process that started it dies.

Known limit: the child needs a CUDA context of its own, so a GPU in EXCLUSIVE_PROCESS mode, or
one whose memory the served versions have nearly filled, fails the probe where loading in
process might have worked.

ONNX Runtime artefacts are not probed: they are loaded and checked by ONNX Runtime's own
validation, and a child's interpreter start (about a second, plus the runtime's import) would
be paid on every compile for nothing.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ballast.errors import CompileError

#: Backends whose artefacts native code opens (a crash there takes the process with it).
NATIVE_BACKENDS = frozenset({"aotinductor", "tensorrt"})
PROBE_ROWS = 2
DEFAULT_TIMEOUT_S = 300.0
_TAIL_LINES = 12
_TAIL_CHARS = 2000
_OK = "probe ok"
_POLL_S = 0.5
_WATCHER = "_exit_with_parent"
# -c, not -m: runpy would warn that the module was already imported by the package.
_CHILD = "import sys; from ballast.compile.probe import main; sys.exit(main(sys.argv[1:]))"


def _torch_version() -> str:
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _tail(text: str) -> str:
    """The lines that say most. For a faulthandler report (a crash, or the stacks dumped just
    before a timeout): its header, then the frames, innermost first, of every thread but this
    module's parent watcher. Anything else: the last lines."""
    # faulthandler ends a crash report with one long "Extension modules: ..." line: noise here.
    lines = [
        ln.strip()
        for ln in text.splitlines()
        if ln.strip() and not ln.startswith("Extension modules:")
    ]
    head = next(
        (i for i, ln in enumerate(lines) if ln.startswith(("Fatal Python error", "Timeout ("))),
        None,
    )
    if head is None:
        return " | ".join(lines[-_TAIL_LINES:])[-_TAIL_CHARS:]
    kept: list[str] = [lines[head]]
    block: list[str] = []
    for ln in [*lines[head + 1 :], ""]:
        if not ln or ln.startswith(("Thread 0x", "Current thread 0x", "Stack (")):
            if not any(_WATCHER in frame for frame in block):
                kept += block
            block = []
        if ln:
            block.append(ln)
    return " | ".join(kept[:_TAIL_LINES])[:_TAIL_CHARS]


def probe_problem(
    backend: str, path: Path, returncode: int, stdout: str, stderr: str
) -> str | None:
    """What went wrong in the child that opened ``path`` (None: it loaded and ran). Pure."""
    if returncode == 0 and _OK in stdout:
        return None
    if returncode < 0:
        try:
            how = f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            how = f"was killed by signal {-returncode}"
        what = "crashed"
    elif returncode == 0:
        how, what = "exited without running the artefact", "failed"
    else:
        how, what = f"exited with status {returncode}", "failed"
    said = _tail(stderr) or _tail(stdout) or "no output"
    return (
        f"opening the {backend} artefact {path.name} {what}: the process that loaded it {how} "
        f"(torch {_torch_version()}); its last lines: {said}"
    )


def probe_load(
    path: Path,
    backend: str,
    *,
    n_features: int | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    python: str = sys.executable,
) -> None:
    """Load ``path`` with ``backend``'s runtime and run it once, in a child process.

    ``n_features`` defaults to what the artefact declares. Raises :class:`CompileError` when the
    child crashes, fails or outlives ``timeout_s``; the message says how and ends with the
    child's last lines.
    """
    features = "auto" if n_features is None else str(n_features)
    argv = [python, "-X", "faulthandler", "-c", _CHILD, backend, str(path), features]
    argv += [str(timeout_s), str(os.getpid())]
    # Its own process group, killed whole when the probe ends: nothing it started outlives it,
    # and nothing left holding its pipes keeps this waiting once the child itself is done.
    child = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
        start_new_session=True,
    )
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                stdout, stderr = child.communicate(timeout=_POLL_S)
                break
            except subprocess.TimeoutExpired:
                if child.poll() is not None or time.monotonic() >= deadline:
                    _kill_group(child.pid)
                    try:
                        stdout, stderr = child.communicate(timeout=10.0)
                    except subprocess.TimeoutExpired:  # pragma: no cover - the group is gone
                        stdout, stderr = "", ""
                    break
    finally:
        _kill_group(child.pid)  # also when interrupted
        if child.poll() is None:  # pragma: no cover - killed just above
            child.wait()
    if child.returncode == -signal.SIGKILL and time.monotonic() >= deadline:
        raise CompileError(
            f"opening the {backend} artefact {Path(path).name} did not finish within "
            f"{timeout_s:g} s; its last lines: {_tail(stderr) or 'no output'}"
        )
    done = subprocess.CompletedProcess(argv, child.returncode, stdout, stderr)
    problem = probe_problem(backend, Path(path), done.returncode, done.stdout, done.stderr)
    if problem is not None:
        raise CompileError(problem)


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _exit_with_parent(parent: int) -> None:
    """Ends this child once the process that started it is gone (a killed flow run). The pid
    comes from the parent itself: one read here could already be init's."""
    while True:
        if os.getppid() != parent:
            os._exit(70)
        time.sleep(1.0)


def main(argv: list[str]) -> int:
    """The child: ``BACKEND PATH N_FEATURES|auto TIMEOUT_S PARENT_PID``; prints a marker line
    once the artefact ran at batch 1 and 2."""
    import faulthandler
    import threading

    import numpy as np

    from ballast.runtime import load_predictor

    timeout_s = float(argv[3]) if len(argv) > 3 else DEFAULT_TIMEOUT_S
    parent = int(argv[4]) if len(argv) > 4 else os.getppid()
    if os.getppid() != parent:  # the parent died while this interpreter started
        return 70
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    # A hang shows where it hangs: the stacks go to stderr shortly before the parent kills us.
    faulthandler.dump_traceback_later(max(0.5, timeout_s * 0.9), exit=False)
    backend, path = argv[0], Path(argv[1])
    predictor = load_predictor(path, backend)
    n_features = getattr(predictor, "n_features", None) if argv[2] == "auto" else int(argv[2])
    if not isinstance(n_features, int) or n_features < 1:
        print(f"the artefact declares no feature count ({n_features!r})", file=sys.stderr)
        return 3
    for rows in (1, PROBE_ROWS):  # the gateway's warm-up runs batch 1; batches run 2 and up
        out = predictor.predict(np.zeros((rows, n_features), dtype=np.float32))
        if len(out) != rows:
            print(f"expected {rows} rows of output, got shape {out.shape}", file=sys.stderr)
            return 3
    faulthandler.cancel_dump_traceback_later()
    print(_OK, flush=True)
    return 0
