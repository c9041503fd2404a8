"""MLflow behind a narrow facade.

Everything goes through one ``MlflowClient`` bound to the tracking URI given to :class:`Registry`;
nothing sets MLflow's process-wide tracking URI or active run, so two registries on two stores can
live in one process (tests do this).

A version's files are logged as plain run artefacts under ``model/`` and the model version's source
is that folder's artefact URI: no MLflow model flavour, so no pip-requirement inference (seconds
per version) and nothing is pickled. Registering on local sqlite takes a few tens of ms.

Alias moves are several MLflow calls and MLflow has no transaction across them: a failing step is
undone by restoring the aliases read before the move. A promotion, rollback or undo looks at the
aliases and moves them under the model's serving lock (:func:`serving_lock_name`, held in the
registry itself: :mod:`model_registry.write_lock`), which registry-backed gateways take for their
weight writes too, so two Ballast processes never interleave them, on one machine or several.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ballast.decisions import plan_promotion, plan_rollback_to_previous
from ballast.errors import (
    RegistryError,
    RegistryUnreachable,
    redact_uri_credentials,
    redacted_cause,
)
from model_registry.types import (
    CANDIDATE,
    CHAMPION,
    TAG_APPROVAL,
    ApprovalRecord,
    ModelVersionInfo,
    PromotionResult,
)
from model_registry.write_lock import RegistryLock, serving_lock_name

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion


log = logging.getLogger(__name__)

ARTIFACT_SUBDIR = "model"
#: Run tag naming the model version a run produced (lineage from run to version).
RUN_VERSION_TAG = "ballast.registered_version"
# Copies of versions fetched from a remote store kept besides the aliased ones (local_copy).
KEEP_COPIES = 5
KEEP_COPIES_FOR_S = 3600.0
_BATCH = 100  # MLflow's per-request limit is 100 params / 1000 metrics; 100 covers both


@contextmanager
def _mlflow_errors(action: str) -> Iterator[None]:
    """Re-raise MLflow's exceptions as RegistryError naming what we were doing."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as exc:
        raise RegistryError(f"{action}: {exc.message}") from redacted_cause(exc)


def _probe(tracking_uri: str, timeout_s: float) -> None:
    """Fail at once when nothing listens at a tracking server's address. MLflow retries a
    refused connection with back-off for minutes, which suits a release riding out a restart,
    not someone asking what is deployed."""
    parsed = urllib.parse.urlsplit(tracking_uri)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname or "", port), timeout=timeout_s).close()
    except OSError as exc:
        where = redact_uri_credentials(tracking_uri)
        raise RegistryUnreachable(
            f"the MLflow server at {where} does not answer ({exc.strerror or exc}); "
            "is it running, and is BALLAST_MLFLOW_TRACKING_URI right?"
        ) from None


def _quoted(value: str) -> str:
    # MLflow's filter grammar has no escape for quotes inside a quoted string.
    if "'" in value or "`" in value:
        raise RegistryError(f"names, tag keys and values may not contain quotes: {value!r}")
    return value


def _local_files(root: Path) -> dict[str, int]:
    return {
        p.relative_to(root).as_posix(): p.stat().st_size for p in root.rglob("*") if p.is_file()
    }


def _local_path(uri: str) -> Path | None:
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme == "file":
        return Path(urllib.request.url2pathname(parsed.path))
    if parsed.scheme == "":
        return Path(uri)
    return None


class Registry:
    """A model registry on one MLflow store.

    ``tracking_uri`` is used for both tracking and the registry (e.g. ``sqlite:///…/mlflow.db``);
    runs of the experiment keep their artefacts under ``artifact_root/<experiment>`` when this
    registry creates the experiment.
    """

    def __init__(
        self,
        tracking_uri: str,
        artifact_root: Path,
        *,
        experiment_name: str = "ballast",
        probe_timeout_s: float | None = None,
    ) -> None:
        from mlflow import MlflowClient

        self.tracking_uri = tracking_uri
        self.artifact_root = Path(artifact_root).resolve()
        self.experiment_name = experiment_name
        # An MLflow tracking server over HTTP (else an embedded store such as sqlite).
        self.remote = tracking_uri.startswith(("http://", "https://"))
        if self.remote and probe_timeout_s is not None:
            _probe(tracking_uri, probe_timeout_s)
        if tracking_uri.startswith("sqlite:///"):
            # MLflow creates the database file but not the folder it lives in.
            Path(tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        self._client: MlflowClient = MlflowClient(
            tracking_uri=tracking_uri, registry_uri=tracking_uri
        )
        self.experiment_id = self._ensure_experiment()
        self._locks: dict[tuple[str, float], RegistryLock] = {}

    # --- set-up --------------------------------------------------------------------------------

    def _ensure_experiment(self) -> str:
        from mlflow.exceptions import MlflowException

        with _mlflow_errors(f"setting up experiment {self.experiment_name!r}"):
            exp = self._client.get_experiment_by_name(self.experiment_name)
            if exp is None:
                # A tracking server keeps the artefacts where it was told to (proxied over its
                # own API): a local path here would only work on the server's own machine.
                location = (
                    None if self.remote else (self.artifact_root / self.experiment_name).as_uri()
                )
                try:
                    return str(self._client.create_experiment(self.experiment_name, location))
                except MlflowException:
                    # Another process created it between our look-up and create.
                    exp = self._client.get_experiment_by_name(self.experiment_name)
                    if exp is None:
                        raise
            if exp.lifecycle_stage == "deleted":
                self._client.restore_experiment(exp.experiment_id)
            return str(exp.experiment_id)

    # --- reading -------------------------------------------------------------------------------

    def _aliases(self, name: str, *, missing_ok: bool = True) -> dict[str, str]:
        """alias -> version of a registered model; {} for an unknown model when ``missing_ok``."""
        from mlflow.exceptions import MlflowException

        try:
            model = self._client.get_registered_model(name)
        except MlflowException as exc:
            if missing_ok and exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return {}
            raise RegistryError(f"reading aliases of {name!r}: {exc.message}") from redacted_cause(
                exc
            )
        return {alias: str(v) for alias, v in (model.aliases or {}).items()}

    @staticmethod
    def _info(mv: ModelVersion, aliases: Mapping[str, str] | None = None) -> ModelVersionInfo:
        version = str(mv.version)
        if aliases is None:
            names = tuple(mv.aliases or ())
        else:
            # search results carry no aliases: take them from the registered model
            names = tuple(a for a, v in aliases.items() if v == version)
        return ModelVersionInfo(
            name=mv.name,
            version=version,
            aliases=tuple(sorted(names)),
            tags=dict(mv.tags or {}),
            run_id=mv.run_id,
            source=mv.source or "",
            created_ms=int(mv.creation_timestamp),
        )

    def get_version(self, name: str, version: str | int) -> ModelVersionInfo:
        with _mlflow_errors(f"reading {name!r} version {version}"):
            return self._info(self._client.get_model_version(name, str(version)))

    def get_by_alias(self, name: str, alias: str) -> ModelVersionInfo | None:
        """The version ``alias`` points at, or None when the alias (or the model) does not exist."""
        version = self._aliases(name).get(alias)
        return None if version is None else self.get_version(name, version)

    def _search(self, filter_string: str, name: str) -> list[ModelVersionInfo]:
        aliases = self._aliases(name)
        found: list[ModelVersionInfo] = []
        token: str | None = None
        with _mlflow_errors(f"searching versions of {name!r}"):
            while True:
                page = self._client.search_model_versions(filter_string, page_token=token)
                found.extend(self._info(mv, aliases) for mv in page)
                token = page.token
                if not token:
                    break
        return sorted(found, key=lambda v: int(v.version))

    def list_versions(self, name: str) -> list[ModelVersionInfo]:
        """All versions of ``name``, oldest first, with their aliases ([] for an unknown model)."""
        return self._search(f"name='{_quoted(name)}'", name)

    def version_metrics(self, name: str, version: str | int) -> dict[str, float]:
        """The latest value of each metric of the run that produced ``version``."""
        info = self.get_version(name, version)
        if not info.run_id:
            return {}
        with _mlflow_errors(f"reading metrics of {name!r} version {version}"):
            return {k: float(v) for k, v in self._client.get_run(info.run_id).data.metrics.items()}

    def metric_history(self, name: str, version: str | int, key: str) -> list[tuple[int, float]]:
        """``(step, value)`` of metric ``key`` in the run that produced ``version``, by step."""
        info = self.get_version(name, version)
        if not info.run_id:
            return []
        with _mlflow_errors(f"reading metric {key!r} of {name!r} version {version}"):
            points = self._client.get_metric_history(info.run_id, key)
        return sorted((int(p.step), float(p.value)) for p in points)

    def find_by_tag(self, name: str, key: str, value: str) -> list[ModelVersionInfo]:
        """Versions of ``name`` whose tag ``key`` equals ``value``, oldest first."""
        flt = f"name='{_quoted(name)}' and tag.`{_quoted(key)}`='{_quoted(value)}'"
        return self._search(flt, name)

    def download(self, name: str, version: str | int, dst: Path | None = None) -> Path:
        """A local folder holding the version's files.

        Without ``dst`` and on a local artefact store this is the store's own folder: read it,
        never write to it. With ``dst`` (or for a remote store) the files are copied to
        ``dst/model`` (a new temporary folder when ``dst`` is None) and that folder is returned.
        """
        return self._fetch(name, version, self._download_uri(name, version), dst)

    def _download_uri(self, name: str, version: str | int) -> str:
        with _mlflow_errors(f"locating {name!r} version {version}"):
            return str(self._client.get_model_version_download_uri(name, str(version)))

    def _fetch(self, name: str, version: str | int, uri: str, dst: Path | None) -> Path:
        local = _local_path(uri)
        if local is not None:
            if not local.is_dir():
                raise RegistryError(f"{name!r} version {version}: artefacts missing at {local}")
            if dst is None:
                return local
            target = Path(dst) / ARTIFACT_SUBDIR
            shutil.copytree(local, target, dirs_exist_ok=True)
            return target
        from mlflow.artifacts import download_artifacts

        dst_dir = Path(dst) if dst is not None else Path(tempfile.mkdtemp(prefix="ballast-model-"))
        dst_dir.mkdir(parents=True, exist_ok=True)
        with _mlflow_errors(f"downloading {name!r} version {version}"):
            path = download_artifacts(
                artifact_uri=uri, dst_path=str(dst_dir), tracking_uri=self.tracking_uri
            )
        return Path(path)

    def local_copy(self, name: str, version: str | int, cache: Path) -> Path:
        """The version's files on this machine, kept for as long as something may serve them.

        On a local artefact store: the store's own folder (read it, never write to it). From a
        remote store: ``cache/<name>/<version>``, downloaded once and reused (registered files
        never change; callers verify them before use). The download goes to a temporary sibling
        that is renamed into place, so one cut off never looks complete, and two processes
        fetching at once keep one copy. :meth:`download` without ``dst`` leaves a new temporary
        folder per call, gone at the next reboot while a gateway's desired state still names it.
        """
        uri = self._download_uri(name, version)
        if _local_path(uri) is not None:
            return self._fetch(name, version, uri, None)
        target = Path(cache) / name / str(version)
        if target.is_dir():
            self._used(name, target)
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        # A process killed mid-download leaves its partial folder; one an hour old is dead.
        stale = time.time() - 3600
        for old in target.parent.glob(f".{version}.partial-*"):
            with contextlib.suppress(OSError):
                if old.stat().st_mtime < stale:
                    shutil.rmtree(old, ignore_errors=True)
        partial = Path(tempfile.mkdtemp(prefix=f".{version}.partial-", dir=target.parent))
        try:
            got = self._fetch(name, version, uri, partial)
            try:
                got.rename(target)
            except OSError:
                if not target.is_dir():  # not another process's copy: a real failure
                    raise
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        self._used(name, target)
        return target

    def _used(self, name: str, target: Path) -> None:
        """Mark ``target`` used now and remove the model's other copies nothing is likely to
        need: one folder per version ever released filled the disk. Kept: the versions an alias
        names (a rollback's target, what a restarted file-backed gateway reloads), the
        ``KEEP_COPIES`` most recently used, and any used within ``KEEP_COPIES_FOR_S`` (another
        run's canary). A removed version is fetched again if it is ever named. Best effort: a
        failure here never fails the caller."""
        now = time.time()
        with contextlib.suppress(OSError):
            os.utime(target, (now, now))
        try:
            keep = set(self._aliases(name).values()) | {target.name}
        except RegistryError:
            return  # without the aliases nothing is known to be unused
        copies: list[tuple[float, Path]] = []
        for folder in target.parent.iterdir():
            if folder.name.isdigit() and folder.name not in keep:
                with contextlib.suppress(OSError):
                    copies.append((folder.stat().st_mtime, folder))
        copies.sort(reverse=True)
        for used_at, folder in copies[KEEP_COPIES:]:
            if used_at < now - KEEP_COPIES_FOR_S:
                shutil.rmtree(folder, ignore_errors=True)

    # --- writing -------------------------------------------------------------------------------

    def register_version(
        self,
        name: str,
        *,
        artifact_dir: Path,
        params: Mapping[str, Any],
        metrics: Mapping[str, float],
        tags: Mapping[str, str],
        description: str = "",
        run_name: str | None = None,
        metric_history: Mapping[str, Sequence[tuple[int, float]]] | None = None,
    ) -> ModelVersionInfo:
        """Log one run with ``artifact_dir`` under ``model/`` and make it a new version of ``name``.

        ``metrics`` are logged at step 0; ``metric_history`` maps a metric name to its
        ``(step, value)`` series (per-epoch training curves). Give the series names of their own
        (``epoch_val_loss``): MLflow reports a metric's value at its highest step as the latest.

        All or nothing: if a step fails once the run has started, a version created by this call
        is deleted, a registered model created by this call is deleted, the run is marked FAILED
        (its artefacts stay, for diagnosis) and :class:`RegistryError` says which step failed.
        """
        from mlflow.entities import Metric, Param
        from mlflow.exceptions import MlflowException

        artifact_dir = Path(artifact_dir)
        local = _local_files(artifact_dir) if artifact_dir.is_dir() else {}
        if not local:
            raise RegistryError(f"artefact folder is missing or empty: {artifact_dir}")

        step = "starting the run"
        run_id: str | None = None
        created_model = False
        version: str | None = None
        try:
            run = self._client.create_run(
                self.experiment_id,
                run_name=run_name,
                tags={"ballast.model_name": name},
            )
            run_id = run.info.run_id

            step = "logging params and metrics"
            now = int(time.time() * 1000)
            p = [Param(str(k), str(v)) for k, v in params.items()]
            m = [Metric(str(k), float(v), now, 0) for k, v in metrics.items()]
            for key, series in (metric_history or {}).items():
                m += [Metric(str(key), float(v), now, int(step)) for step, v in series]
            for i in range(0, max(len(p), len(m)), _BATCH):
                self._client.log_batch(run_id, metrics=m[i : i + _BATCH], params=p[i : i + _BATCH])

            step = "uploading artefacts"
            self._client.log_artifacts(run_id, str(artifact_dir), ARTIFACT_SUBDIR)
            uploaded = self._remote_files(run_id, ARTIFACT_SUBDIR)
            if uploaded != local:
                # The folder changed while it was copied (or the copy was partial).
                missing = sorted(set(local) - set(uploaded))
                extra = sorted(set(uploaded) - set(local))
                resized = sorted(k for k in set(local) & set(uploaded) if local[k] != uploaded[k])
                raise RegistryError(
                    f"uploaded artefacts differ from {artifact_dir}: "
                    f"missing {missing}, unexpected {extra}, size changed {resized}"
                )

            step = "creating the registered model"
            try:
                self._client.create_registered_model(name)
                created_model = True
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise

            step = "creating the model version"
            mv = self._client.create_model_version(
                name,
                source=f"{run.info.artifact_uri}/{ARTIFACT_SUBDIR}",
                run_id=run_id,
                tags=dict(tags),
                description=description or None,
            )
            version = str(mv.version)

            step = "finishing the run"
            self._client.set_tag(run_id, RUN_VERSION_TAG, version)
            self._client.set_terminated(run_id, "FINISHED")
            log.info("registered %s version %s (run %s)", name, version, run_id)
            return self.get_version(name, version)
        except Exception as exc:
            undo = self._undo_registration(name, run_id, version, created_model)
            detail = getattr(exc, "message", None) or str(exc)
            msg = f"registering {name!r} failed while {step}: {detail}"
            if undo:
                msg += f" (and undoing it failed: {'; '.join(undo)})"
            raise RegistryError(msg) from redacted_cause(exc)
        except BaseException:
            # Stopped part-way (Prefect's TerminationSignal on SIGTERM, Ctrl-C, a cancelled
            # task): undone as a failure is, then the stop goes on. Left, the version would stand
            # with its run RUNNING, and a rerun would reuse it by its flow-run or content key.
            self._undo_registration(name, run_id, version, created_model)
            raise

    def _remote_files(self, run_id: str, path: str) -> dict[str, int]:
        found: dict[str, int] = {}
        for info in self._client.list_artifacts(run_id, path):
            if info.is_dir:
                found.update(self._remote_files(run_id, info.path))
            else:
                found[info.path.removeprefix(f"{ARTIFACT_SUBDIR}/")] = int(info.file_size or 0)
        return found

    def _undo_registration(
        self, name: str, run_id: str | None, version: str | None, created_model: bool
    ) -> list[str]:
        """Best-effort rollback of a failed registration; returns what could not be undone."""
        problems: list[str] = []
        versions = [] if version is None else [version]
        if version is None and run_id is not None:
            # create_model_version may have failed after the version was saved (a lost answer,
            # a timed-out wait for it to be ready): found by its run, or it would stay behind,
            # complete with its content key, and a rerun would reuse it as if registered.
            try:
                found = self._client.search_model_versions(f"run_id = '{run_id}'")
                versions = [str(mv.version) for mv in found if mv.name == name]
            except Exception as exc:
                problems.append(f"look for a version of run {run_id}: {exc}")
        for v in versions:
            try:
                self._client.delete_model_version(name, v)
            except Exception as exc:
                problems.append(f"delete version {v}: {exc}")
        if created_model:
            try:
                if not self.list_versions(name):
                    self._client.delete_registered_model(name)
            except Exception as exc:
                problems.append(f"delete registered model: {exc}")
        if run_id is not None:
            try:
                self._client.set_terminated(run_id, "FAILED")
            except Exception as exc:
                problems.append(f"mark run {run_id} FAILED: {exc}")
        return problems

    def discard_version(self, name: str, info: ModelVersionInfo) -> None:
        """Delete a version this process registered a moment ago and nobody uses yet (no alias,
        no decision): its run is marked FAILED and keeps its artefacts, as after a failed
        registration. Raises :class:`RegistryError` if any of it fails."""
        if info.aliases:
            raise RegistryError(f"version {info.version} of {name!r} holds {info.aliases}")
        with _mlflow_errors(f"discarding version {info.version} of {name!r}"):
            try:
                self._client.delete_model_version(name, info.version)
            except OSError as exc:  # a connection reset: a retry may succeed
                raise RegistryError(
                    f"discarding version {info.version}: {exc}"
                ) from redacted_cause(exc)
        # Only once it is gone: a version still listed must not point at a FAILED run.
        if info.run_id is not None:
            with contextlib.suppress(Exception):
                self._client.set_terminated(info.run_id, "FAILED")

    def set_tags(self, name: str, version: str | int, tags: Mapping[str, str]) -> None:
        with _mlflow_errors(f"tagging {name!r} version {version}"):
            for key, value in tags.items():
                self._client.set_model_version_tag(name, str(version), key, value)

    def set_approval(self, name: str, version: str | int, record: ApprovalRecord) -> None:
        """Record the version's approval status (pending, approved, rejected), who, when, why.

        MLflow writes one tag per call, so the record is written evidence first and status last:
        until the status tag changes, readers see the old record. If a write fails, the previous
        record's tags are put back (best effort) and :class:`RegistryError` says what happened.
        """
        version = str(version)
        new = record.as_tags()
        before = self.get_version(name, version).tags
        order = [k for k in new if k != TAG_APPROVAL] + [TAG_APPROVAL]
        try:
            for key in order:
                self._client.set_model_version_tag(name, version, key, new[key])
        except Exception as exc:
            problems = self._restore_approval(name, version, before, order)
            detail = getattr(exc, "message", None) or str(exc)
            what = f"recording approval of {name!r} version {version} failed"
            if problems:
                raise RegistryError(
                    f"{what} ({detail}) and restoring the previous record failed too "
                    f"({'; '.join(problems)})"
                ) from redacted_cause(exc)
            raise RegistryError(f"{what}, record restored: {detail}") from redacted_cause(exc)

    def _restore_approval(
        self, name: str, version: str, before: Mapping[str, str], keys: Sequence[str]
    ) -> list[str]:
        """Put the approval tags back as ``before`` had them; returns what could not be restored.

        The status first: if even that fails, the evidence is left as written, since it then
        matches the (possibly new) status better than the old evidence would."""
        from mlflow.exceptions import MlflowException

        problems: list[str] = []
        for key in [TAG_APPROVAL, *(k for k in keys if k != TAG_APPROVAL)]:
            old = before.get(key)
            try:
                if old is None:
                    try:
                        self._client.delete_model_version_tag(name, version, key)
                    except MlflowException as exc:
                        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                            raise
                else:
                    self._client.set_model_version_tag(name, version, key, old)
            except Exception as exc:
                problems.append(f"{key}: {getattr(exc, 'message', None) or exc}")
                if key == TAG_APPROVAL:
                    break
        return problems

    def get_approval(self, name: str, version: str | int) -> ApprovalRecord | None:
        return ApprovalRecord.from_tags(self.get_version(name, version).tags)

    def set_alias(self, name: str, alias: str, version: str | int) -> None:
        with _mlflow_errors(f"setting alias {alias!r} of {name!r} to version {version}"):
            self._client.set_registered_model_alias(name, alias, str(version))

    def delete_alias(self, name: str, alias: str) -> None:
        """Remove ``alias`` (no error when it does not exist)."""
        with _mlflow_errors(f"deleting alias {alias!r} of {name!r}"):
            self._client.delete_registered_model_alias(name, alias)

    # --- a lock across machines ----------------------------------------------------------------

    def exclusive(
        self,
        lock: str,
        *,
        holder: str,
        timeout_s: float,
        busy: BaseException,
        lease_s: float = 30.0,
    ) -> contextlib.AbstractContextManager[None]:
        """Hold the registry-wide lock called ``lock`` for a ``with`` block, against every process
        on this store whatever machine it runs on (:mod:`model_registry.write_lock`); wait up to
        ``timeout_s``, then raise ``busy``. Keep the block short: a holder that stops stamping
        its ticket for ``lease_s`` is taken for dead."""
        key = (lock, lease_s)
        found = self._locks.get(key)
        if found is None:
            found = self._locks[key] = RegistryLock(
                self._client, self.experiment_id, lock, lease_s=lease_s
            )
        return found.held(
            holder=f"{socket.gethostname()}:{os.getpid()}:{holder}", timeout_s=timeout_s, busy=busy
        )

    # How long a promotion, rollback or undo waits for another process changing what the model
    # serves (a gateway's weight write, another alias move: each a few registry calls).
    SERVING_LOCK_TIMEOUT_S = 60.0

    def serving_lock(self, name: str) -> contextlib.AbstractContextManager[None]:
        """Hold ``name``'s serving lock (:func:`serving_lock_name`) for a ``with`` block: for a
        look at the aliases and the writes it decides (promote, rollback and undo take it
        themselves; do not call them inside the block: the lock is not re-entrant)."""
        return self.exclusive(
            serving_lock_name(name),
            holder="aliases",
            timeout_s=self.SERVING_LOCK_TIMEOUT_S,
            busy=RegistryError(
                f"another process has been changing what {name!r} serves for over "
                f"{self.SERVING_LOCK_TIMEOUT_S:g} s; no alias moved"
            ),
        )

    # --- alias moves -----------------------------------------------------------------------------

    def _move_aliases(
        self, name: str, before: Mapping[str, str], target: Mapping[str, str | None]
    ) -> None:
        """Apply ``target`` (alias -> version, None = remove) in order; on failure put the aliases
        in ``target`` back as ``before`` had them, and raise."""
        try:
            for alias, version in target.items():
                if before.get(alias) == version:
                    continue
                if version is None:
                    self._client.delete_registered_model_alias(name, alias)
                else:
                    self._client.set_registered_model_alias(name, alias, version)
        except Exception as exc:
            problems = []
            for alias in target:
                try:
                    old = before.get(alias)
                    if old is None:
                        self._client.delete_registered_model_alias(name, alias)
                    else:
                        self._client.set_registered_model_alias(name, alias, old)
                except Exception as restore_exc:
                    problems.append(f"{alias}: {restore_exc}")
            detail = getattr(exc, "message", None) or str(exc)
            msg = f"moving aliases of {name!r} failed, aliases restored: {detail}"
            if problems:
                msg = (
                    f"moving aliases of {name!r} failed ({detail}) and restoring them failed "
                    f"too ({'; '.join(problems)}); aliases before were {before}"
                )
            raise RegistryError(msg) from redacted_cause(exc)

    def promote(self, name: str, version: str | int) -> PromotionResult:
        """Make ``version`` the champion; the old champion becomes ``previous``; a ``candidate``
        alias on ``version`` is removed (:func:`ballast.decisions.plan_promotion`). Undone as a
        whole if any step fails."""
        version = str(version)
        with self.serving_lock(name):
            before = self._aliases(name, missing_ok=False)
            plan = plan_promotion(before, version)
            target = plan.target()
            self._move_aliases(name, before, target)
        old = before.get(CHAMPION)
        log.info("promoted %s version %s (previous champion %s)", name, version, old)
        return PromotionResult(
            name=name,
            version=version,
            previous_champion=old,
            candidate_cleared=CANDIDATE in plan.delete,
            changed=old != version,
            moved_from={alias: before.get(alias) for alias in target},
            moved_to=target,
        )

    def rollback_to_previous(
        self, name: str, *, expect: Mapping[str, str | None] | None = None
    ) -> PromotionResult:
        """Point ``champion`` back at ``previous`` and remove ``previous``
        (:func:`ballast.decisions.plan_rollback_to_previous`).

        ``expect`` (alias -> version, None: unset) is what the caller decided on, e.g. the
        versions it verified and will deploy: if any of them has moved since (another run
        promoted meanwhile), :class:`RegistryError` and nothing moves. Looked at and moved
        under the model's serving lock, so no other Ballast process moves them in between.
        """
        with self.serving_lock(name):
            before = self._aliases(name, missing_ok=False)
            if expect is not None:
                now = {alias: before.get(alias) for alias in expect}
                if now != dict(expect):
                    raise RegistryError(
                        f"not rolling back {name!r}: the aliases are {now} now, not "
                        f"{dict(expect)} as when the rollback was decided; nothing moved"
                    )
            try:
                plan = plan_rollback_to_previous(before)
            except ValueError as exc:
                raise RegistryError(f"{name!r} cannot roll back: {exc}") from None
            target = plan.target()
            self._move_aliases(name, before, target)
        prev = plan.set[CHAMPION]
        log.info("rolled %s back to version %s from %s", name, prev, before.get(CHAMPION))
        return PromotionResult(
            name=name,
            version=prev,
            previous_champion=before.get(CHAMPION),
            candidate_cleared=False,
            changed=before.get(CHAMPION) != prev,
            moved_from={alias: before.get(alias) for alias in target},
            moved_to=target,
        )

    def undo(self, result: PromotionResult) -> None:
        """Put back the aliases that ``result``'s move changed (a promotion or rollback whose
        gateway side then failed), as one move that is itself undone if it fails.

        Refused (:class:`RegistryError`, nothing moved) when any of them has moved again since:
        that is someone else's change, not this one to take back.
        """
        with self.serving_lock(result.name):
            self._undo(result)

    def _undo(self, result: PromotionResult) -> None:
        now = self._aliases(result.name, missing_ok=False)
        # An alias the move only removed (a promotion clears `candidate`) may since have been
        # set by someone else (the next release's registration): theirs, left as it is, and
        # no reason to leave champion and previous on a version the gateway does not serve.
        cleared = {a for a, v in result.moved_to.items() if v is None}
        taken = {a for a in cleared if now.get(a) is not None}
        moved = {a: now.get(a) for a in result.moved_to if a not in taken}
        expected = {a: v for a, v in result.moved_to.items() if a not in taken}
        if moved != expected:
            raise RegistryError(
                f"not undoing the alias move of {result.name!r}: the aliases are {moved} now, "
                f"not {expected} as the move left them"
            )
        back = {a: v for a, v in result.moved_from.items() if a not in taken}
        self._move_aliases(result.name, now, back)
        log.info("undid the alias move of %s: %s", result.name, dict(result.moved_from))
