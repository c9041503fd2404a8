"""The gateway's wire contract (shared by the server in ``infra/gateway`` and its clients).

Desired state is a :class:`Deployment`: a champion, optionally a canary with a traffic weight.
Each :class:`VersionSpec` carries the artefact's path and sha256 so the gateway can refuse
anything that does not verify before it loads it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Fault = Literal["errors", "latency", "bad-weights"]


class VersionSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    version: str = Field(min_length=1)
    artifact_path: str = Field(min_length=1)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    backend: Literal["onnxruntime", "tensorrt"] = "onnxruntime"
    # Chaos injection for demos and tests, applied by the gateway to this version only
    # ("bad-weights" is baked into the artefact itself, so the gateway ignores it).
    fault: Fault | None = None


class Deployment(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = Field(min_length=1)
    champion: VersionSpec | None = None
    canary: VersionSpec | None = None
    canary_weight: int = Field(default=0, ge=0, le=100)

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
        return self


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    instances: list[list[float]] = Field(min_length=1, max_length=4096)


class PredictResponse(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: str
    predictions: list[int]
    probabilities: list[list[float]]
