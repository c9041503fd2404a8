"""Open a native compiled artefact in a child process before this process does.

AOTInductor packages and TensorRT engines are opened by native code. A crash there kills the
process that loads it: the whole flow run, or a gateway replica with every version it serves,
not only the step. Seen on a lent H200 (torch 2.11.0+cu130): loading a CUDA AOTInductor package
died with SIGSEGV inside ``aoti_load_package``, every time. So the artefact is first opened,
and run once on two rows of zeros, in a child (``python -X faulthandler``, :func:`main`); a signal, a non-zero exit or a timeout there becomes a :class:`CompileError` naming it,
with the child's last lines (faulthandler prints the Python stack of a crash).

ONNX Runtime artefacts are not probed: they are loaded and checked by ONNX Runtime's own
validation, and a child's interpreter start (about a second, plus the runtime's import) would
be paid on every compile for nothing.
"""

from __future__ import annotations

import importlib.metadata
import signal
import subprocess
import sys
from pathlib import Path

from ballast.errors import CompileError

#: Backends whose artefacts native code opens (a crash there takes the process with it).
NATIVE_BACKENDS = frozenset({"aotinductor", "tensorrt"})
PROBE_ROWS = 2
DEFAULT_TIMEOUT_S = 300.0
_TAIL_LINES = 12
_TAIL_CHARS = 2000
_OK = "probe ok"
# -c, not -m: runpy would warn that the module was already imported by the package.
_CHILD = "import sys; from ballast.compile.probe import main; sys.exit(main(sys.argv[1:]))"


def _torch_version() -> str:
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _tail(text: str) -> str:
    # faulthandler ends a crash report with one long "Extension modules: ..." line: noise here.
    lines = [
        ln.strip()
        for ln in text.splitlines()
        if ln.strip() and not ln.startswith("Extension modules:")
    ]
    return " | ".join(lines[-_TAIL_LINES:])[-_TAIL_CHARS:]


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
    try:
        done = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:  # run() has killed the child by now
        out = (
            exc.stderr
            if isinstance(exc.stderr, str)
            else (exc.stderr or b"").decode(errors="replace")
        )
        raise CompileError(
            f"opening the {backend} artefact {Path(path).name} did not finish within "
            f"{timeout_s:g} s; its last lines: {_tail(out) or 'no output'}"
        ) from None
    problem = probe_problem(backend, Path(path), done.returncode, done.stdout, done.stderr)
    if problem is not None:
        raise CompileError(problem)


def main(argv: list[str]) -> int:
    """The child: ``BACKEND PATH N_FEATURES|auto``; prints a marker line once the artefact ran."""
    import numpy as np

    from ballast.runtime import load_predictor

    backend, path = argv[0], Path(argv[1])
    predictor = load_predictor(path, backend)
    n_features = getattr(predictor, "n_features", None) if argv[2] == "auto" else int(argv[2])
    if not isinstance(n_features, int) or n_features < 1:
        print(f"the artefact declares no feature count ({n_features!r})", file=sys.stderr)
        return 3
    out = predictor.predict(np.zeros((PROBE_ROWS, n_features), dtype=np.float32))
    if len(out) != PROBE_ROWS:
        print(f"expected {PROBE_ROWS} rows of output, got shape {out.shape}", file=sys.stderr)
        return 3
    print(_OK, flush=True)
    return 0
