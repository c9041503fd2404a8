"""The gateway's wire contract (shared by the server in ``infra/gateway`` and its clients).

Desired state is a :class:`Deployment`: a champion, optionally a canary with a traffic weight and
a shadow that receives a mirrored fraction of requests (its answers are compared with the
primary's and discarded). Each :class:`VersionSpec` carries the artefact's path and sha256 so the
gateway can refuse anything that does not verify before it loads it.

Fields added after the first release (``shadow``, ``shadow_fraction``) have defaults, so a body
written by an older client still validates.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Fault = Literal["errors", "latency", "bad-weights"]
Backend = Literal["onnxruntime", "tensorrt", "aotinductor"]

#: Media type of the compact binary predict body: one 2-D float32 array in NumPy's ``.npy`` format.
NPY_MEDIA_TYPE = "application/x-npy"


#: What a model or version name may be: it goes into URL paths (``/v1/models/{model}``) and
#: response headers (``x-ballast-version``), so no ``/``, spaces or control characters. MLflow's
#: version numbers and the usual model names fit.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"


class VersionSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    version: str = Field(pattern=NAME_PATTERN)
    artifact_path: str = Field(min_length=1)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    backend: Backend = "onnxruntime"
    # Chaos injection for demos and tests, applied by the gateway to this version only
    # ("bad-weights" is baked into the artefact itself, so the gateway ignores it).
    fault: Fault | None = None

    def content(self) -> VersionSpec:
        """This spec with its path replaced by its content address (``sha256:<hex>``)."""
        return self.model_copy(update={"artifact_path": f"sha256:{self.sha256}"})


class Deployment(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = Field(pattern=NAME_PATTERN)
    champion: VersionSpec | None = None
    canary: VersionSpec | None = None
    canary_weight: int = Field(default=0, ge=0, le=100)
    # Mirrored traffic: this share of predict requests is also sent to ``shadow``; its answers
    # are recorded for comparison and never returned.
    shadow: VersionSpec | None = None
    shadow_fraction: float = Field(default=0.0, ge=0.0, le=1.0)
    # A trial (a canary or a shadow) may hold a lease: past this Unix time every replica drops
    # the trial by itself and serves the champion alone. The release controller renews it while
    # it runs, so a controller that dies mid-canary (flow process killed, machine lost, network
    # cut) cannot leave a half-released version taking traffic. None: no lease (manual changes).
    lease_expires_at: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    # Salts the hash that sends a routing key (``X-Ballast-Key``) to the canary or the
    # champion. The release controller draws one per canary, so each canary gets its own random
    # set of keys (a heavy or unusual client is not on the canary side of every release, nor
    # of every rerun of one); None salts with the canary's version.
    key_salt: str | None = Field(default=None, pattern=r"^[0-9a-f]{1,64}$")

    @model_validator(mode="after")
    def _consistent(self) -> Deployment:
        if self.canary is None and self.canary_weight:
            raise ValueError("canary_weight must be 0 when there is no canary")
        if self.canary is not None and self.champion is None and self.canary_weight != 100:
            raise ValueError("without a champion the canary must take 100% of traffic")
        if (
            self.canary is not None
            and self.champion is not None
            and self.canary.version == self.champion.version
        ):
            raise ValueError("canary and champion must be different versions")
        if self.shadow is None and self.shadow_fraction:
            raise ValueError("shadow_fraction must be 0 when there is no shadow")
        if self.shadow is not None:
            if self.champion is None and self.canary is None:
                raise ValueError("a shadow needs a champion or canary to compare with")
            serving = {s.version for s in (self.champion, self.canary) if s is not None}
            if self.shadow.version in serving:
                raise ValueError("the shadow must be a version that does not serve traffic")
        if self.lease_expires_at is not None and not self.has_trial():
            raise ValueError("only a deployment with a canary or a shadow can hold a lease")
        if self.key_salt is not None and self.canary is None:
            # Nothing to route keys between; a registry-backed gateway would not keep it.
            raise ValueError("only a deployment with a canary can hold a key_salt")
        return self

    def has_trial(self) -> bool:
        """A canary or a shadow is in it: something that is not the settled champion."""
        return self.canary is not None or self.shadow is not None

    def without_trial(self) -> Deployment:
        """The champion alone (nothing at all on a first release): what an expired lease leaves."""
        return Deployment(model=self.model, champion=self.champion)

    def lease_expired(self, now: float) -> bool:
        return self.lease_expires_at is not None and now >= self.lease_expires_at

    def content(self) -> Deployment:
        """This deployment with each artefact path replaced by its content address
        (``sha256:<hex>``): what it serves, whoever holds the files where.

        Replicas of a registry-backed gateway each fetch their own copy of a version (pods do
        not share a disk with each other or with the release flow), so two of them serving the
        same thing name different paths; compare and fingerprint this form, not the paths.
        """
        return self.model_copy(
            update={
                role: None if spec is None else spec.content()
                for role, spec in (
                    ("champion", self.champion),
                    ("canary", self.canary),
                    ("shadow", self.shadow),
                )
            }
        )

    def same_as(self, other: Deployment | None) -> bool:
        """Serves the same versions, traffic and lease as ``other`` (paths aside, see content)."""
        return other is not None and self.content() == other.content()

    def fingerprint(self) -> str:
        """A short content hash: two replicas with the same fingerprint serve the same thing
        (wherever each keeps the artefacts: see :meth:`content`)."""
        return hashlib.sha256(self.content().model_dump_json().encode()).hexdigest()[:16]

    def versions(self) -> tuple[VersionSpec, ...]:
        """Every version this deployment loads (champion, canary, shadow)."""
        return tuple(s for s in (self.champion, self.canary, self.shadow) if s is not None)


def deployment_etag(dep: Deployment | None) -> str:
    """The entity tag of a deployment as ``/admin/deployment`` serves it (``ETag``, unquoted):
    its fingerprint, or ``none`` when nothing is deployed."""
    return "none" if dep is None else dep.fingerprint()


def if_match_header(expect: Sequence[Deployment | None]) -> str:
    """The ``If-Match`` value naming ``expect`` (None: nothing deployed)."""
    return ", ".join(f'"{deployment_etag(d)}"' for d in expect)


def precondition_holds(tags: frozenset[str], current: Deployment | None, now: float) -> bool:
    """Whether a change sent with ``If-Match: tags`` may replace ``current`` (the desired state).

    ``*`` matches anything. A trial whose lease ran out is matched as what it has become, the
    champion alone: its controller may no longer renew or step it, and a release that saw the
    gateway serve the champion alone may begin over it.
    """
    if "*" in tags:
        return True
    if current is not None and current.has_trial() and current.lease_expired(now):
        current = current.without_trial()
    return deployment_etag(current) in tags


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    instances: list[list[float]] = Field(min_length=1, max_length=4096)


class PredictResponse(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: str
    predictions: list[int]
    probabilities: list[list[float]]
