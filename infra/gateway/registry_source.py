"""Desired state read from the model registry (through ``model_registry``'s public facade only).

The scheme, for registered model ``M``:

============================  =================================================================
alias ``champion``            the champion (no alias: nothing is served)
alias ``candidate``           the canary, when that version carries tag ``ballast.canary_weight``
                              with an integer 1..100 (the percent of traffic it takes); absent or
                              ``0``: the candidate is not served
alias ``shadow``              the shadow, when that version carries tag ``ballast.shadow_fraction``
                              above 0 (up to 1: the share of requests mirrored to it); absent
                              or ``0``: it is not served
tag ``ballast.fault_injection``  per version, as everywhere in Ballast (demos and tests)
tag ``ballast.lease_expires_at``  the trial's lease (``Deployment.lease_expires_at``, Unix
                              seconds; ``none`` or absent: no lease), read from the canary when
                              one is served, else from the shadow
tag ``ballast.key_salt``      on the candidate: the canary's routing-key salt
                              (``Deployment.key_salt``; empty or absent: none)
============================  =================================================================

Every version is downloaded and its signed manifest verified against the trusted key
(``settings.signing_key_path``) before it can appear in a desired state; the artefact named by
tag ``ballast.artifact`` must be in the manifest with the sha256 of tag
``ballast.artifact_sha256``. A version that does not verify makes the whole read fail
(:class:`DesiredStateError`), so replicas keep serving what they have; its copy is removed,
and it is not fetched again for ``REFUSED_RETRY_S`` (30 s) unless its tags or the trusted key's
file change. Verified copies live in the source's own temporary folder, removed with it.

Publishing (an admin ``PUT`` on a gateway that uses this source) only writes tags (weight,
fraction, lease): the versions must be the ones the aliases already name. Moving aliases is the
registry's job (promotion, rollback), so a PUT naming other versions is refused with 409; the
release flow moves the aliases first, then PUTs. A PUT's artefact paths are its sender's (the
flow's pod): the replica that takes it swaps in its own verified copies (:meth:`resolve`), and
refuses a version whose sha256, backend or fault is not the registry's. The
lease goes on the candidate and on the shadow alike, so every replica reads the deployment a
leased PUT applied, lease included, and drops the trial when it runs out (the replica that
drops it first records the champion alone here: weight ``0``, lease ``none``).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from ballast.errors import BallastError
from ballast.locks import held
from ballast.release import (
    ALIAS_CANDIDATE,
    ALIAS_CHAMPION,
    ALIAS_SHADOW,
    NO_LEASE,
    TAG_CANARY_WEIGHT,
    TAG_FAULT,
    TAG_KEY_SALT,
    TAG_LEASE,
    TAG_SHADOW_FRACTION,
    VerifiedArtifact,
    verify_version,
)
from ballast.serving import Deployment, VersionSpec
from infra.gateway.desired import DesiredStateError
from model_registry.write_lock import serving_lock_name

if TYPE_CHECKING:
    from ballast.settings import Settings
    from model_registry import ModelVersionInfo

__all__ = [
    "ALIAS_SHADOW",
    "TAG_CANARY_WEIGHT",
    "TAG_LEASE",
    "TAG_SHADOW_FRACTION",
    "RegistryDesiredState",
    "RegistryFacade",
]

_NO_LEASE = NO_LEASE
# What each tag the gateway writes reads as when a version does not have it.
_NEUTRAL = {
    TAG_CANARY_WEIGHT: "0",
    TAG_SHADOW_FRACTION: "0",
    TAG_LEASE: _NO_LEASE,
    TAG_KEY_SALT: "",
}


class RegistryFacade(Protocol):
    """The part of ``model_registry.Registry`` this source uses."""

    def get_by_alias(self, name: str, alias: str) -> ModelVersionInfo | None: ...

    def get_version(self, name: str, version: str | int) -> ModelVersionInfo: ...

    def download(self, name: str, version: str | int, dst: Path | None = None) -> Path: ...

    def set_tags(self, name: str, version: str | int, tags: dict[str, str]) -> None: ...

    def exclusive(
        self, lock: str, *, holder: str, timeout_s: float, busy: BaseException
    ) -> contextlib.AbstractContextManager[None]: ...


class RegistryDesiredState:
    """Desired state of one model from registry aliases and tags (scheme in the module doc)."""

    def __init__(
        self,
        registry: RegistryFacade,
        model: str,
        trusted_key: Path,
        *,
        poll_interval_s: float = 1.0,
        lock_path: Path | None = None,
    ) -> None:
        if not 0 < poll_interval_s <= 1.0:
            raise ValueError("poll_interval_s must be in (0, 1]")
        self.registry = registry
        # Writes (and the look before a conditional one) hold a flock on this file, then the
        # registry's own lock: the registry has no conditional write, so these make an If-Match
        # atomic among replicas on this machine (the file) and on others (the registry's
        # lock). None: the registry's lock only.
        self.lock_path = lock_path
        self.model = model
        self.trusted_key = Path(trusted_key)
        self.poll_interval_s = poll_interval_s
        # Registered versions are immutable: verify each once (the gateway re-hashes the
        # artefact itself before it loads it).
        self._verified: dict[str, VerifiedArtifact] = {}
        # Versions that did not verify, with what was checked (their tags, the trusted key's
        # file) and when: polled every second, a refused version would otherwise be fetched
        # again each time. Retried at once when a tag or the key file changes.
        self._refused: dict[str, tuple[object, float, str]] = {}
        # This source's copies of the versions' files, one folder per version, removed when a
        # version is refused and with the source (a finalizer, also at interpreter exit).
        self._copies: tempfile.TemporaryDirectory[str] | None = None

    @classmethod
    def from_settings(cls, s: Settings, *, poll_interval_s: float = 1.0) -> RegistryDesiredState:
        from model_registry import Registry

        digest = hashlib.sha256(s.model_name.encode()).hexdigest()[:16]
        return cls(
            Registry(s.tracking_uri, s.artifact_root),
            s.model_name,
            s.signing_key_path,
            poll_interval_s=poll_interval_s,
            lock_path=s.state_dir.resolve() / "gateway" / f"registry-writes-{digest}.lock",
        )

    # How long a write waits for another replica's write on this machine (a few tag writes;
    # longer means the registry is failing).
    WRITE_LOCK_TIMEOUT_S = 30.0

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """Hold, for a write (and the look before a conditional one), the flock shared with
        this machine's replicas, then the registry's lock shared with every replica anywhere
        (:meth:`RegistryFacade.exclusive`: gateway pods on other machines)."""
        busy = DesiredStateError(
            f"another replica has been writing the desired state for over "
            f"{self.WRITE_LOCK_TIMEOUT_S:g} s; try again"
        )
        with contextlib.ExitStack() as locks:
            try:
                if self.lock_path is not None:
                    # First: replicas here queue on the file, not on the registry.
                    locks.enter_context(held(self.lock_path, self.WRITE_LOCK_TIMEOUT_S, busy))
                locks.enter_context(
                    self.registry.exclusive(
                        serving_lock_name(self.model),
                        holder="gateway",
                        timeout_s=self.WRITE_LOCK_TIMEOUT_S,
                        busy=busy,
                    )
                )
            except DesiredStateError:
                raise
            except (BallastError, OSError) as exc:  # the lock file, the registry
                raise DesiredStateError(f"cannot record the desired state: {exc}") from exc
            yield

    # How long a version that did not verify is refused without fetching it again, while its
    # tags and the trusted key's file stay as they were.
    REFUSED_RETRY_S = 30.0
    # Verified copies kept (most recently used): a deployment's three versions and room for
    # the versions before them, so a rollback needs no download.
    KEEP_VERSIONS = 6

    def describe(self) -> str:
        return f"registry model {self.model!r}"

    def _spec(self, info: ModelVersionInfo) -> VersionSpec:
        cached = self._verified.pop(info.version, None)
        if cached is None:
            cached = self._fetch_and_verify(info)
        self._verified[info.version] = cached  # most recently used last
        self._forget_old()
        fault = info.tags.get(TAG_FAULT) or None
        try:
            return VersionSpec(
                version=info.version,
                artifact_path=cached.path,
                sha256=cached.sha256,
                backend=cached.backend,
                fault=fault,
            )
        except ValueError as exc:
            raise DesiredStateError(f"{info.name} version {info.version}: {exc}") from exc

    def _fetch_and_verify(self, info: ModelVersionInfo) -> VerifiedArtifact:
        try:
            st = self.trusted_key.stat()
            key_file: object = (st.st_ino, st.st_size, st.st_mtime_ns)  # a new key: retried
        except OSError:
            key_file = None
        checked = (tuple(sorted(info.tags.items())), key_file)
        refused = self._refused.get(info.version)
        if (
            refused is not None
            and refused[0] == checked
            and time.monotonic() - refused[1] < self.REFUSED_RETRY_S
        ):
            raise DesiredStateError(refused[2])
        if self._copies is None:
            self._copies = tempfile.TemporaryDirectory(prefix="ballast-registry-")
        folder = Path(self._copies.name) / f"v{info.version}"
        shutil.rmtree(folder, ignore_errors=True)  # a copy cut off by an earlier failure
        verified = None
        try:
            local = Path(self.registry.download(info.name, info.version, folder))
            try:
                verified = verify_version(
                    local, info.tags, info.version, self.trusted_key, model=info.name
                )
            except BallastError as exc:
                message = f"{info.name} {exc.message}"
                self._refused[info.version] = (checked, time.monotonic(), message)
                raise DesiredStateError(message) from exc
        finally:
            if verified is None:
                shutil.rmtree(folder, ignore_errors=True)
        self._refused.pop(info.version, None)
        return verified

    def _forget_old(self) -> None:
        """Keep the copies of the most recently used versions only: a replica that follows
        the registry for months would otherwise keep every version it ever served. Beyond the
        three a deployment names, a few more stay for a rollback; one forgotten is fetched and
        verified again if it is ever named again."""
        while len(self._verified) > self.KEEP_VERSIONS:
            version = next(iter(self._verified))
            del self._verified[version]
            if self._copies is not None:
                shutil.rmtree(Path(self._copies.name) / f"v{version}", ignore_errors=True)

    def read(self) -> Deployment | None:
        try:
            champion = self.registry.get_by_alias(self.model, ALIAS_CHAMPION)
            candidate = self.registry.get_by_alias(self.model, ALIAS_CANDIDATE)
            shadow = self.registry.get_by_alias(self.model, ALIAS_SHADOW)
            weight = _weight(candidate)
            canary = candidate if weight and candidate is not None else None
            if champion is not None and canary is not None and canary.version == champion.version:
                canary, weight = None, 0  # promoted, candidate alias not cleared yet
            fraction = _fraction(shadow)
            serving = {v.version for v in (champion, canary) if v is not None}
            # A shadow at 0 is no shadow, as a candidate at weight 0 is no canary: the alias may
            # stand before and after a shadow phase, and must not load (or hold) a lease-less
            # trial that nothing would ever end.
            if shadow is not None and (not fraction or shadow.version in serving or not serving):
                shadow, fraction = None, 0.0
            if champion is None and canary is None:
                return None
            # The trial's lease, where publish wrote it (the canary's copy when one is served).
            holder = canary if canary is not None else shadow
            return Deployment(
                model=self.model,
                champion=None if champion is None else self._spec(champion),
                canary=None if canary is None else self._spec(canary),
                canary_weight=weight
                if canary is not None and champion is not None
                else (100 if canary is not None else 0),
                shadow=None if shadow is None else self._spec(shadow),
                shadow_fraction=fraction,
                lease_expires_at=_lease(holder),
                key_salt=(canary.tags.get(TAG_KEY_SALT) or None) if canary is not None else None,
            )
        except DesiredStateError:
            raise
        except (BallastError, ValueError, OSError) as exc:
            raise DesiredStateError(f"registry desired state of {self.model!r}: {exc}") from exc

    def resolve(self, deployment: Deployment) -> Deployment:
        """``deployment`` with each version at this replica's verified copy of it.

        A PUT names the paths its sender sees (the release flow's pod), which this replica's
        pod cannot read; the registry has the files, so fetch and verify them here. Refused
        with 409 when a version's registered artefact is not the one the PUT names (sha256 or
        backend), or its fault differs from the version's tag (every replica reads faults
        from the tag, so one set by a PUT alone would hold on this replica only).
        """
        if deployment.model != self.model:
            raise DesiredStateError(
                f"this gateway follows registry model {self.model!r}, not {deployment.model!r}",
                status=409,
            )
        # Checked here too, before the replica loads anything: a deployment publish would
        # refuse must never take traffic in between.
        try:
            self._aliases_for(deployment)
        except DesiredStateError:
            raise
        except (BallastError, OSError) as exc:
            raise DesiredStateError(f"cannot read the registry's aliases: {exc}") from exc

        def local(spec: VersionSpec | None) -> VersionSpec | None:
            if spec is None:
                return None
            mine = self._spec(self.registry.get_version(self.model, spec.version))
            for field in ("sha256", "backend", "fault"):
                theirs, ours = getattr(spec, field), getattr(mine, field)
                if theirs != ours:
                    where = f"tag {TAG_FAULT}" if field == "fault" else "its signed manifest"
                    raise DesiredStateError(
                        f"version {spec.version}: the deployment gives {field} {theirs!r}, the "
                        f"registry ({where}) {ours!r}",
                        status=409,
                    )
            return mine

        try:
            return deployment.model_copy(
                update={
                    "champion": local(deployment.champion),
                    "canary": local(deployment.canary),
                    "shadow": local(deployment.shadow),
                }
            )
        except DesiredStateError:
            raise
        except (BallastError, ValueError, OSError) as exc:
            raise DesiredStateError(f"registry versions of {self.model!r}: {exc}") from exc

    def _aliases_for(self, deployment: Deployment) -> dict[str, ModelVersionInfo | None]:
        """The aliases now, once each version ``deployment`` names is the one its alias names
        (409 otherwise: the gateway only sets weights)."""
        aliases = {
            alias: self.registry.get_by_alias(self.model, alias)
            for alias in (ALIAS_CHAMPION, ALIAS_CANDIDATE, ALIAS_SHADOW)
        }
        wanted = {
            ALIAS_CHAMPION: deployment.champion,
            ALIAS_CANDIDATE: deployment.canary,
            ALIAS_SHADOW: deployment.shadow,
        }
        for alias, spec in wanted.items():
            info = aliases[alias]
            if spec is not None and (info is None or info.version != spec.version):
                named = "no version" if info is None else f"version {info.version}"
                raise DesiredStateError(
                    f"alias {alias!r} names {named}, the deployment has version "
                    f"{spec.version}: move aliases in the registry (promote, rollback); "
                    "the gateway only sets weights",
                    status=409,
                )
        return aliases

    def publish(self, deployment: Deployment | None, *, actor: str) -> None:
        with self._writing():
            self._publish(deployment)

    def publish_if(
        self,
        holds: Callable[[Deployment | None], bool],
        deployment: Deployment | None,
        *,
        actor: str,
    ) -> bool:
        """Publish ``deployment`` only if ``holds(desired state read now)``; False, writing
        nothing, if it does not. Atomic among sources on the same registry and model, on
        this machine or another (every write of theirs takes the registry's lock); a writer
        that takes no lock (a person in the MLflow UI, a script) can still land between the
        look and the write."""
        with self._writing():
            if not holds(self.read()):
                return False
            self._publish(deployment)
            return True

    def replace_if(
        self, expected: Deployment, deployment: Deployment | None, *, actor: str
    ) -> bool:
        """Publish ``deployment`` only while the desired state is still ``expected``."""
        return self.publish_if(expected.same_as, deployment, actor=actor)

    def _publish(self, deployment: Deployment | None) -> None:
        if deployment is None:
            raise DesiredStateError(
                "a registry-backed gateway serves what the aliases name; remove the champion "
                "alias instead",
                status=409,
            )
        if deployment.model != self.model:
            raise DesiredStateError(
                f"this gateway follows registry model {self.model!r}, not {deployment.model!r}",
                status=409,
            )
        try:
            aliases = self._aliases_for(deployment)
            candidate, shadow = aliases[ALIAS_CANDIDATE], aliases[ALIAS_SHADOW]
            expires = deployment.lease_expires_at
            lease = {TAG_LEASE: _NO_LEASE if expires is None else repr(expires)}  # exact float
            writes: list[tuple[ModelVersionInfo, dict[str, str]]] = []
            if candidate is not None:
                weight = deployment.canary_weight if deployment.canary is not None else 0
                share = {TAG_CANARY_WEIGHT: str(weight)}
                # The salt rides with the lease, which goes first when a canary starts: no
                # replica reads the new weight with another canary's salt.
                salted = {TAG_KEY_SALT: deployment.key_salt or ""} | lease  # salt first
                writes += [(candidate, t) for t in _ordered(share, salted, ending=not weight)]
            if shadow is not None:
                fraction = deployment.shadow_fraction if deployment.shadow is not None else 0.0
                share = {TAG_SHADOW_FRACTION: repr(fraction)}
                writes += [(shadow, t) for t in _ordered(share, lease, ending=not fraction)]
        except DesiredStateError:
            raise
        except (BallastError, OSError) as exc:
            raise DesiredStateError(
                f"cannot record the desired state in the registry: {exc}"
            ) from exc
        self._write_all_or_none(writes)

    def _write_all_or_none(self, writes: list[tuple[ModelVersionInfo, dict[str, str]]]) -> None:
        """Make the tag writes in order; if one fails, put back what the earlier ones changed
        (newest first), so a refused change does not reach the replicas at their next poll."""
        done: list[tuple[ModelVersionInfo, dict[str, str]]] = []
        try:
            for info, tags in writes:
                self.registry.set_tags(self.model, info.version, tags)
                done.append((info, tags))
        except (BallastError, OSError) as exc:
            problems: list[str] = []
            for info, tags in reversed(done):
                # A tag the version did not have reads as its neutral value (0, no lease).
                old = {k: info.tags.get(k, _NEUTRAL[k]) for k in tags}
                try:
                    self.registry.set_tags(self.model, info.version, old)
                except (BallastError, OSError) as undo_exc:
                    problems.append(f"version {info.version}: {undo_exc}")
            if problems:
                raise DesiredStateError(
                    f"cannot record the desired state in the registry ({exc}), and putting back "
                    f"the tags already written failed too ({'; '.join(problems)}): the registry "
                    "may hold part of the change; PUT the deployment again",
                    status=500,
                ) from exc
            raise DesiredStateError(
                f"cannot record the desired state in the registry: {exc}"
            ) from exc


def _ordered(
    share: dict[str, str], lease: dict[str, str], *, ending: bool
) -> tuple[dict[str, str], dict[str, str]]:
    """A version's traffic share and its lease in the order that a replica reading between the
    two writes never sees its trial with a lease it must not hold: the share first when it
    goes to 0 (the trial ends here), else the lease first."""
    return (share, lease) if ending else (lease, share)


def _weight(info: ModelVersionInfo | None) -> int:
    if info is None:
        return 0
    raw = info.tags.get(TAG_CANARY_WEIGHT, "0")
    try:
        weight = int(raw)
    except ValueError:
        raise DesiredStateError(f"tag {TAG_CANARY_WEIGHT}={raw!r} is not an integer") from None
    if not 0 <= weight <= 100:
        raise DesiredStateError(f"tag {TAG_CANARY_WEIGHT}={weight} is outside 0..100")
    return weight


def _fraction(info: ModelVersionInfo | None) -> float:
    if info is None:
        return 0.0
    raw = info.tags.get(TAG_SHADOW_FRACTION, "0")
    try:
        fraction = float(raw)
    except ValueError:
        raise DesiredStateError(f"tag {TAG_SHADOW_FRACTION}={raw!r} is not a number") from None
    if not 0.0 <= fraction <= 1.0:
        raise DesiredStateError(f"tag {TAG_SHADOW_FRACTION}={fraction} is outside 0..1")
    return fraction


def _lease(info: ModelVersionInfo | None) -> float | None:
    if info is None:
        return None
    raw = info.tags.get(TAG_LEASE, _NO_LEASE)
    if raw in (_NO_LEASE, ""):
        return None
    try:
        expires = float(raw)
    except ValueError:
        raise DesiredStateError(f"tag {TAG_LEASE}={raw!r} is not a number") from None
    if not (math.isfinite(expires) and expires > 0):
        raise DesiredStateError(f"tag {TAG_LEASE}={raw!r} is not a time (Unix seconds)")
    return expires
