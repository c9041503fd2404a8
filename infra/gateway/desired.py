"""Desired state: where every replica reads what it should serve, and how replicas report back.

A :class:`DesiredStateSource` answers "what deployment should be live?". Every replica polls it
(at most every second) and converges: it verifies, loads and warms what changed, then swaps. An
admin ``PUT /admin/deployment`` applies on the replica that received it, then *publishes* to the
source, so the others follow within one poll; a restarted replica reads the source at start and
comes back to the right state by itself.

Two sources:

* :class:`FileDesiredState` — one JSON document in the state folder (tests, single machines)::

      {"revision": 7, "updated_at": "...", "updated_by": "ci", "deployment": {...}}

  written atomically (temporary file + rename) under an exclusive ``flock``, so concurrent
  publishers never interleave and readers never see half a file;
* ``infra.gateway.registry_source.RegistryDesiredState`` — the model registry's aliases and tags
  (see that module for the scheme).

:class:`ReplicaBoard` is a folder of small status files, one per live replica (pid, the
fingerprint of the deployment it serves, readiness, a heartbeat); a publisher waits on it until
its peers have converged, and ``GET /admin/replicas`` shows it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from pydantic import ValidationError

from ballast.serving import Deployment

__all__ = [
    "DesiredStateError",
    "DesiredStateSource",
    "FileDesiredState",
    "ReplicaBoard",
    "ReplicaStatus",
]


class DesiredStateError(Exception):
    """The source cannot be read or written; ``status`` is the HTTP answer for a publish."""

    def __init__(self, message: str, *, status: int = 503) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


@runtime_checkable
class DesiredStateSource(Protocol):
    """Where the deployment a gateway should serve is kept. Methods block: call off the loop."""

    #: How often replicas poll this source, in seconds (at most 1).
    poll_interval_s: float

    def describe(self) -> str:
        """A short human-readable name (for logs and /admin/replicas)."""
        ...

    def read(self) -> Deployment | None:
        """The desired deployment (None: nothing decided yet). DesiredStateError if unreadable."""
        ...

    def publish(self, deployment: Deployment | None, *, actor: str) -> None:
        """Make ``deployment`` the desired one (None: serve nothing). DesiredStateError if refused."""
        ...

    def resolve(self, deployment: Deployment) -> Deployment:
        """``deployment`` as this replica will load it: the same versions and sha256s, at paths
        this replica can read. A PUT names the paths its sender sees; a source that fetches
        versions itself (the registry) swaps in its own copies. DesiredStateError if one of
        the versions is not the one the source knows by that name.
        """
        ...


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class FileDesiredState:
    """The desired deployment as one JSON file (format in the module docstring)."""

    def __init__(self, path: Path, *, poll_interval_s: float = 0.2) -> None:
        if not 0 < poll_interval_s <= 1.0:
            raise ValueError("poll_interval_s must be in (0, 1]")
        self.path = Path(path)
        self.poll_interval_s = poll_interval_s
        self._lock_path = self.path.with_name(self.path.name + ".lock")
        self._cache: tuple[bytes, Deployment | None] | None = None

    def describe(self) -> str:
        return f"file {self.path}"

    def _raw(self) -> bytes | None:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise DesiredStateError(f"cannot read desired state {self.path}: {exc}") from exc

    def _parse(self, raw: bytes) -> tuple[int, Deployment | None]:
        try:
            doc = json.loads(raw)
            revision = int(doc["revision"])
            dep = doc["deployment"]
            return revision, None if dep is None else Deployment.model_validate(dep)
        # ArithmeticError: a revision of 1e400 (int() of infinity); RecursionError: nesting
        # deeper than the parser goes. Untyped, either answered a PUT with 500 and skipped the
        # repair of a corrupt file.
        except (
            ValueError,
            KeyError,
            TypeError,
            ValidationError,
            ArithmeticError,
            RecursionError,
        ) as exc:
            raise DesiredStateError(f"desired state {self.path} is malformed: {exc}") from exc

    def read(self) -> Deployment | None:
        raw = self._raw()
        if raw is None:
            return None
        # Polled several times a second: parse only when the bytes changed.
        if self._cache is not None and self._cache[0] == raw:
            return self._cache[1]
        _, dep = self._parse(raw)
        self._cache = (raw, dep)
        return dep

    def revision(self) -> int:
        raw = self._raw()
        return 0 if raw is None else self._parse(raw)[0]

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def resolve(self, deployment: Deployment) -> Deployment:
        return deployment  # the paths are shared: every replica reads this machine's files

    def publish(self, deployment: Deployment | None, *, actor: str) -> None:
        try:
            with self._locked():
                self._write_locked(self._raw(), deployment, actor)
        except OSError as exc:
            raise DesiredStateError(f"cannot write desired state {self.path}: {exc}") from exc

    def replace_if(
        self, expected: Deployment, deployment: Deployment | None, *, actor: str
    ) -> bool:
        """Publish ``deployment`` only while the file still holds ``expected`` (compared with
        ``same_as``, under the lock): a replica recording an expired lease must not overwrite
        a change published since it looked. False, writing nothing, if it changed."""
        return self.publish_if(expected.same_as, deployment, actor=actor)

    def publish_if(
        self,
        holds: Callable[[Deployment | None], bool],
        deployment: Deployment | None,
        *,
        actor: str,
    ) -> bool:
        """Publish ``deployment`` only if ``holds(current desired state)``, read and written
        under the lock (a compare-and-set). False, writing nothing, if it does not hold."""
        try:
            with self._locked():
                raw = self._raw()
                if not holds(None if raw is None else self._parse(raw)[1]):
                    return False
                self._write_locked(raw, deployment, actor)
                return True
        except OSError as exc:
            raise DesiredStateError(f"cannot write desired state {self.path}: {exc}") from exc

    def _write_locked(self, raw: bytes | None, deployment: Deployment | None, actor: str) -> None:
        revision = 0
        if raw is not None:
            try:
                revision = self._parse(raw)[0]
            except DesiredStateError:
                # A publish states the whole desired deployment, so it is what repairs a
                # corrupt file (refusing it left every PUT failing until someone deleted the
                # file by hand). The bytes are kept beside it for whoever looks into why.
                _atomic_write(
                    self.path.with_name(f"{self.path.name}.corrupt-{time.time_ns()}"), raw
                )
        doc = {
            "revision": revision + 1,
            "updated_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "updated_by": actor,
            "deployment": None if deployment is None else deployment.model_dump(mode="json"),
        }
        _atomic_write(self.path, json.dumps(doc, indent=1).encode() + b"\n")


@dataclass(frozen=True)
class ReplicaStatus:
    replica: str
    pid: int
    fingerprint: str | None  # of the deployment it serves (None: nothing)
    ready: bool
    heartbeat: float  # time.time() of the last report
    started: float
    error: str | None = None  # why the desired state is not applied, if it is not
    # Its shadow's counters (version, mirrored, rows, agree, failed): /admin/shadow on any
    # replica adds up every replica's, as the canary's shadow phase reads one of them.
    shadow: dict[str, Any] | None = None
    # Its per-version counters (as /admin/stats gives them): /admin/stats on any replica lists
    # every other replica's, for the champion watchdog.
    versions: dict[str, Any] | None = None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ReplicaBoard:
    """One status file per replica in ``folder``; stale or dead entries are ignored."""

    def __init__(self, folder: Path, *, stale_after_s: float = 3.0) -> None:
        self.folder = Path(folder)
        self.stale_after_s = stale_after_s

    def _path(self, replica: str) -> Path:
        return self.folder / f"{replica}.json"

    def report(self, status: ReplicaStatus) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        _atomic_write(self._path(status.replica), json.dumps(asdict(status)).encode())

    def remove(self, replica: str) -> None:
        self._path(replica).unlink(missing_ok=True)

    def live(self, now: float | None = None) -> list[ReplicaStatus]:
        """Replicas whose process runs and whose heartbeat is fresh, by replica id."""
        now = time.time() if now is None else now
        found: list[ReplicaStatus] = []
        if not self.folder.is_dir():
            return found
        for p in sorted(self.folder.glob("*.json")):
            try:
                data: dict[str, Any] = json.loads(p.read_bytes())
                status = ReplicaStatus(**data)
            except (OSError, ValueError, TypeError):
                continue  # being replaced right now, or not ours: skip it
            if not _alive(status.pid):
                p.unlink(missing_ok=True)  # a replica that died without cleaning up
            elif now - status.heartbeat <= self.stale_after_s:
                found.append(status)
        return found
