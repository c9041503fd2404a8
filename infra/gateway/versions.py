"""Loaded model versions and the deployment snapshot that routes between them.

A :class:`Live` snapshot is immutable once published: a request reads ``gateway.live`` once and
keeps using that snapshot, so a deployment swap is one reference assignment and never shows a
request half of the old state and half of the new. A request also keeps the
:class:`LoadedVersion` it was routed to (and that version's batch queue) until it is answered, so
a request in flight during a swap finishes on the version it started on.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import shutil
import tempfile
import time
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from ballast.runtime import Predictor, companion_files
from ballast.serving import Deployment, VersionSpec

if TYPE_CHECKING:
    from infra.gateway.batcher import Batcher

Role = Literal["champion", "canary", "shadow"]
Loader = Callable[[Path, str, int], Predictor]

# Sticky routing resolution: a key hashes to one of 10,000 buckets, so weights are exact to 0.01 %.
_BUCKETS = 10_000


class DeploymentRefusedError(Exception):
    """A deployment that cannot be applied; ``status`` is the HTTP answer (409 or 422)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def identity(spec: VersionSpec) -> tuple[str, str, str, str]:
    """What makes two specs the same loaded model (``fault`` is routing-time, not load-time)."""
    return (spec.version, spec.sha256, spec.backend, spec.artifact_path)


@dataclass(eq=False)
class LoadedVersion:
    """One verified, loaded and warmed version, with counters the canary controller can read."""

    spec: VersionSpec
    predictor: Predictor
    n_features: int
    fault_rng: random.Random
    window: int
    n_classes: int  # columns of its answers, learnt at warm-up
    loaded_at: float = field(default_factory=time.time)
    inflight: int = 0
    requests: int = 0
    errors: int = 0  # 5xx answers: what a canary judge counts against the version
    client_errors: int = 0  # 4xx answers (e.g. a feature count this version does not take)
    latencies: deque[float] = field(init=False)
    # Set by the gateway once the version is published (needs the running event loop).
    batcher: Batcher | None = None
    mirrored: int = 0  # requests mirrored to this version as a shadow
    shadow_rows: int = 0  # rows compared with the primary's answer
    shadow_agree: int = 0  # ... whose predicted class matched
    shadow_failed: int = 0
    # Rows answered 200 per predicted class, this load only (GatewayMetrics.observe_predictions
    # adds to it; /admin/stats reports it next to ``requests``, so a reader can difference both
    # against the same replica's and the same load's earlier counts).
    classes: dict[int, int] = field(default_factory=dict)
    # Set when a deployment no longer holds this version: it drains and is unloaded. A request
    # routed before the swap may still mirror to it as a shadow; it must not (see Gateway.infer).
    retired: bool = False

    def __post_init__(self) -> None:
        self.latencies = deque(maxlen=self.window)

    @property
    def version(self) -> str:
        return self.spec.version

    def record(self, status: int, seconds: float) -> None:
        self.requests += 1
        if status >= 500:
            self.errors += 1
        elif status >= 400:
            self.client_errors += 1
        self.latencies.append(seconds)

    def latency_ms(self) -> dict[str, float | None]:
        if not self.latencies:
            return {"p50": None, "p95": None, "p99": None}
        p50, p95, p99 = np.percentile(np.fromiter(self.latencies, dtype=np.float64), [50, 95, 99])
        return {"p50": p50 * 1e3, "p95": p95 * 1e3, "p99": p99 * 1e3}


@dataclass(frozen=True, eq=False)
class Slot:
    """A version in a role. The spec may differ from ``loaded.spec`` only in ``fault``."""

    role: Role
    spec: VersionSpec
    loaded: LoadedVersion


@dataclass(frozen=True, eq=False)
class Live:
    """The deployment in force and the loaded versions it routes to."""

    deployment: Deployment
    champion: Slot | None
    canary: Slot | None
    shadow: Slot | None = None

    @property
    def model(self) -> str:
        return self.deployment.model

    @property
    def weight(self) -> int:
        return self.deployment.canary_weight

    # Cached: read on every request, and a Live never changes (a new deployment is a new Live).
    @cached_property
    def slots(self) -> tuple[Slot, ...]:
        """The slots that take traffic (champion, canary)."""
        return tuple(s for s in (self.champion, self.canary) if s is not None)

    @cached_property
    def all_slots(self) -> tuple[Slot, ...]:
        """Every loaded slot, the shadow included."""
        return tuple(s for s in (self.champion, self.canary, self.shadow) if s is not None)

    @cached_property
    def _salt(self) -> bytes:
        dep = self.deployment
        salt = dep.key_salt or ("" if dep.canary is None else dep.canary.version)
        return salt.encode() + b"\0"

    def key_id(self, key: str) -> str:
        """A routing key's pseudonym under this deployment's salt: 16 hex digits, the same in
        every replica. It decides the key's version (:meth:`route`) and is what
        ``/admin/observations`` reports instead of the key, so that the canary's judge can
        tell sticky traffic apart (:class:`ballast.sequential.KeyedArms`)."""
        return hashlib.blake2b(self._salt + key.encode("latin-1"), digest_size=8).hexdigest()

    @cached_property
    def _routing(self) -> tuple[Slot | None, Slot | None, int]:
        """(where a request goes unless drawn for the canary, the canary when traffic is split,
        its weight): worked out once per deployment, not on every request."""
        champion, canary = self.champion, self.canary
        if canary is None or champion is None:
            return champion or canary, None, 0
        weight = self.weight
        if weight <= 0:
            return champion, None, 0
        if weight >= 100:
            return canary, None, 0
        return champion, canary, weight

    def route(self, key_id: str | None, rng: random.Random) -> Slot | None:
        """Pick the slot for one request: sticky by ``key_id`` (:meth:`key_id`) when given, else
        weighted random."""
        base, canary, weight = self._routing
        if canary is None:
            return base
        if key_id is not None:
            # Buckets below the weight go to the canary, so raising the weight only moves keys
            # from champion to canary, never back: a client does not flap between versions.
            bucket = int(key_id, 16) % _BUCKETS
            return canary if bucket < weight * (_BUCKETS // 100) else base
        return canary if rng.random() * 100.0 < weight else base


def _feature_count(predictor: Predictor) -> int | None:
    n = getattr(predictor, "n_features", None)
    return n if isinstance(n, int) and n > 0 else None


def _copy_hashing(src: Path, dst: Path) -> str:
    """Copy ``src`` to a new file ``dst`` (0600) through one open; the sha256 of what was copied."""
    digest = hashlib.sha256()
    with (
        src.open("rb") as fin,
        open(os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as fout,
    ):
        while chunk := fin.read(1 << 20):
            digest.update(chunk)
            fout.write(chunk)
    return digest.hexdigest()


def load_version(
    spec: VersionSpec,
    *,
    loader: Loader,
    intra_op_threads: int,
    seed: int,
    window: int,
    warm_batch: int = 1,
) -> LoadedVersion:
    """Verify, load and warm one version (blocking: call it off the event loop).

    Raises :class:`DeploymentRefusedError` with a message that names the version and what failed.
    """
    path = Path(spec.artifact_path)
    name = f"version {spec.version}"
    try:
        found = path.is_file()
    except OSError as exc:  # ENAMETOOLONG, EACCES, EIO...: is_file() swallows only "not there"
        raise DeploymentRefusedError(422, f"{name}: cannot read artefact {path}: {exc}") from exc
    if not found:
        raise DeploymentRefusedError(422, f"{name}: artefact not found at {path}")
    # The runtime loads a private copy made from the very bytes that were hashed. Hashing the
    # file and then letting the runtime open it again by name would serve whatever the path
    # holds by then: anyone able to write there could swap the file between the two opens.
    with tempfile.TemporaryDirectory(prefix="ballast-load-") as private:  # mode 0700
        copy = Path(private) / path.name
        try:
            actual = _copy_hashing(path, copy)
            for extra in companion_files(path, spec.backend):
                if extra.is_file():  # else the runtime says what is missing
                    shutil.copyfile(extra, Path(private) / extra.name)
        except OSError as exc:
            raise DeploymentRefusedError(
                422, f"{name}: cannot read artefact {path}: {exc}"
            ) from exc
        if actual != spec.sha256:
            raise DeploymentRefusedError(
                409,
                f"{name}: sha256 mismatch for {path}: expected {spec.sha256}, file has {actual}",
            )
        try:
            # Every runtime here reads its artefact whole while loading, so the copy can go
            # once this returns.
            predictor = loader(copy, spec.backend, intra_op_threads)
        except Exception as exc:
            raise DeploymentRefusedError(
                422, f"{name}: {spec.backend} could not load {path}: {type(exc).__name__}: {exc}"
            ) from exc
    n_features = _feature_count(predictor)
    if n_features is None:
        raise DeploymentRefusedError(
            422, f"{name}: the artefact does not declare a fixed feature count"
        )
    # Warm-up: the first run allocates and plans; doing it here keeps that off a user's request
    # and proves the artefact actually answers before it can take traffic.
    try:
        out = np.asarray(predictor.predict(np.zeros((1, n_features), dtype=np.float32)))
    except Exception as exc:
        raise DeploymentRefusedError(
            422, f"{name}: warm-up inference failed: {type(exc).__name__}: {exc}"
        ) from exc
    if out.ndim != 2 or out.shape[0] != 1 or out.shape[1] < 1:
        raise DeploymentRefusedError(
            422, f"{name}: warm-up returned shape {out.shape}, want [1, classes]"
        )
    if not all(math.isfinite(float(v)) for v in out[0]):
        raise DeploymentRefusedError(422, f"{name}: warm-up returned non-finite logits")
    if warm_batch > 1:
        # The largest batch the batcher will form: its buffers are planned here, not under load.
        try:
            big = np.asarray(predictor.predict(np.zeros((warm_batch, n_features), np.float32)))
        except Exception as exc:
            raise DeploymentRefusedError(
                422, f"{name}: warm-up at batch {warm_batch} failed: {type(exc).__name__}: {exc}"
            ) from exc
        if big.shape != (warm_batch, out.shape[1]):
            raise DeploymentRefusedError(
                422, f"{name}: warm-up at batch {warm_batch} returned shape {big.shape}"
            )
    # Per-version fault RNG, seeded from the version so runs are reproducible.
    rng = random.Random(seed * 1_000_003 + zlib.crc32(spec.version.encode()))
    return LoadedVersion(
        spec=spec,
        predictor=predictor,
        n_features=n_features,
        fault_rng=rng,
        window=window,
        n_classes=int(out.shape[1]),
    )
