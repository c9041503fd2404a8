"""One frozen settings object per process, read from ``BALLAST_*`` environment variables.

Everything has an embedded default so one laptop runs the whole loop: state in ``./.ballast``,
MLflow on sqlite inside it, Prefect's ephemeral API, the gateway on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from ballast.errors import ConfigError
from ballast.private_files import PrivateFileError, read_private
from ballast.quality import METRICS, QualityPolicy
from ballast.serving import NAME_PATTERN

# The largest batch an artefact is exported for (ballast.compile.onnx_export.MAX_EXPORT_BATCH; a
# test holds the two equal). Not imported from there: that would load the compile package with
# every settings load.
MAX_EXPORT_BATCH = 4096


def _config_dir() -> Path:
    # Outside the repository on purpose: keys never sit beside the code that could commit them.
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "ballast"


def _default_keyring() -> Path:
    return _config_dir() / "keyring.json"


def _default_signing_key() -> Path:
    return _config_dir() / "signing-key.pem"


# BALLAST_* variables that other parts read, not these settings: the audit log's actor, the
# flow-run working directory set by the stack launcher, and its Prefect database URL.
OTHER_ENV = frozenset({"BALLAST_ACTOR", "BALLAST_HOME", "BALLAST_STACK_PREFECT_DB"})
# What Kubernetes puts in a pod's environment for a Service named ballast-* (service links;
# infra/k8s turns them off, other manifests may not): not settings, and not misspellings.
_SERVICE_LINK = re.compile(
    r"^BALLAST_\w+_(SERVICE_HOST|SERVICE_PORT(_\w+)?|PORT(_\d+_(TCP|UDP|SCTP)(_(PROTO|PORT|ADDR))?)?)$"
)


def check_name(v: str) -> str:
    # An empty or space-padded name would register, serve and audit under a model (or reach a
    # host) nobody asked for.
    if not v.strip() or v != v.strip():
        raise ValueError(f"must be a non-empty name without surrounding spaces, got {v!r}")
    return v


def check_host(v: str) -> str:
    """A host name or address the gateway may bind or be reached at (``ValueError`` if not)."""
    # gateway_url is built as http://{host}:{port}: a URL or a port here would break it.
    if any(c in v for c in "/:@") and not v.startswith("["):
        raise ValueError(f"must be a host name or address, not a URL, got {v!r}")
    return check_name(v)


class Settings(BaseSettings):
    # allow_inf_nan=False: no setting means anything at inf or nan, and some switched a safety
    # off unseen (BALLAST_CANARY_LEASE_S=inf sent the gateway no lease at all: inf is JSON null).
    model_config = SettingsConfigDict(
        env_prefix="BALLAST_", frozen=True, extra="forbid", allow_inf_nan=False
    )

    # Where run state lives (MLflow store, artefacts, audit log, gateway token). Git-ignored.
    state_dir: Path = Path(".ballast")
    keyring_path: Path = Field(default_factory=_default_keyring)
    # Ed25519 key that signs release manifests (created 0600 on first use).
    signing_key_path: Path = Field(default_factory=_default_signing_key)

    # Key provider: a KMS key id selects AWS KMS (endpoint optional, e.g. a local KMS-API server);
    # empty means the local keyring.
    kms_key_id: str = ""
    kms_endpoint_url: str = ""
    # More KMS keys whose objects may be decrypted (old keys while a rotation runs). Objects
    # whose header names any other key are refused, whatever KMS would allow.
    kms_trusted_key_ids: tuple[str, ...] = ()
    aws_region: str = "us-east-1"
    # S3-API endpoint for s3:// URIs (MinIO, moto, ...); empty means AWS's own.
    s3_endpoint_url: str = ""
    # Dataset the release flow fetches; empty means the demo's encrypted copy in state_dir.
    dataset_uri: str = ""

    # MLflow: empty means sqlite + local artefacts inside state_dir.
    mlflow_tracking_uri: str = ""
    model_name: str = "breast-cancer-mlp"
    dataset_name: str = "breast-cancer"

    # Serving gateway.
    gateway_host: str = "127.0.0.1"
    gateway_port: int = Field(default=8765, ge=1, le=65535)
    gateway_admin_token: SecretStr | None = None
    gateway_autostart: bool = True
    gateway_threads: int = Field(default=1, ge=1, le=64)
    # A name resolving to every gateway pod (a Kubernetes headless Service): the champion
    # watchdog and a live-traffic canary read each pod (and the watchdog heartbeats each), at
    # gateway_pods_port (the pods' own port: a headless Service forwards nothing; default
    # gateway_port). Unset: the gateway at gateway_url.
    gateway_pods_host: str | None = None
    gateway_pods_port: int | None = Field(default=None, ge=1, le=65535)

    # Training.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 7
    epochs: int = Field(default=60, ge=1)
    learning_rate: float = Field(default=3e-3, gt=0)
    hidden: int = Field(default=64, ge=2)
    batch_size: int = Field(default=64, ge=1)
    test_fraction: float = Field(default=0.25, gt=0, lt=1)
    model_spec: str = "tabular-mlp"  # a name in ballast.models
    val_fraction: float = Field(default=0.15, gt=0, lt=1)  # carved from the training part
    patience: int | None = Field(default=10, ge=1)  # early stopping on validation loss
    torch_compile: bool = False  # CUDA only

    # Quality gate: the candidate may not be worse than the champion beyond max_drop (in the
    # metric's units), nor on the wrong side of floor. The metric is one the trainer records
    # (ballast.quality.METRICS), which also says which way is better: accuracy, roc_auc,
    # val_accuracy (higher; floor is a minimum, 0.9 unless set) or log_loss, val_loss, train_loss
    # (lower; floor is a maximum, none unless set). BALLAST_QUALITY_FLOOR=none: no floor.
    quality_metric: str = "accuracy"
    quality_max_drop: float = Field(default=0.01, ge=0)
    quality_floor: float | None = 0.9  # the default for accuracy; see _floor_follows_the_metric

    # Compile.
    compile_backend: Literal["auto", "onnxruntime", "tensorrt", "aotinductor"] = "auto"
    # AOTInductor packages and TensorRT engines are first opened in a child process (at compile
    # and in the gateway), so a crash in their native loader fails one step, not the process
    # (ballast.compile.probe). Off only where a child cannot open them although this process
    # can: a GPU in EXCLUSIVE_PROCESS mode, or one the served versions have nearly filled.
    native_load_probe: bool = True
    # Relative error the compiled artefact may show against eager PyTorch (0 < rtol < 1: inf
    # would switch the parity gate off, 0 or less fail every compile).
    parity_rtol_fp32: float = Field(default=1e-4, gt=0, lt=1)
    parity_rtol_fp16: float = Field(default=1e-2, gt=0, lt=1)
    # Batch sizes the artefact is benchmarked at; the largest is the batch it is compiled for.
    bench_batches: tuple[int, ...] = (1, 64, 1024)
    # Cost gate (ballast.cost): a candidate whose compiled model takes more than this many times
    # the champion's time per call at any of bench_batches, measured side by side, stops the run
    # before registration. Raise it for a release that means to grow the model; none: off.
    cost_max_ratio: float | None = Field(default=2.0, gt=1)

    # Where this runs: dev (a laptop on the embedded defaults), staging or prod. Auto-approval
    # is for dev only: elsewhere a person approves every release, so approval_policy defaults
    # to manual there and refuses auto (ballast.decisions.approval_policy_for also refuses a
    # run that asks for auto, before it ingests anything).
    environment: Literal["dev", "staging", "prod"] = "dev"

    # Approval. Default: auto in dev, manual elsewhere (_policy_follows_the_environment).
    approval_policy: Literal["auto", "manual"] = "auto"
    approval_timeout_s: int = Field(default=3600, ge=1)
    # How often a paused run checks for an answer (Prefect moves resume and timeout in these steps).
    approval_poll_s: int = Field(default=10, ge=1)

    # Canary and its threshold judge.
    canary_steps: tuple[int, ...] = (5, 25, 50, 100)
    canary_min_samples: int = Field(default=40, ge=1)
    canary_step_max_seconds: float = Field(default=20.0, gt=0)
    canary_concurrency: int = Field(default=8, ge=1)
    # Optional shadow phase before the weight steps: the candidate sees a mirrored share of
    # traffic (its answers are discarded) for this long; 0 skips it.
    canary_shadow_seconds: float = Field(default=0.0, ge=0)
    canary_shadow_fraction: float = Field(default=1.0, gt=0, le=1)
    # The shadow phase rolls back when the candidate disagrees with the champion on more than
    # this share of mirrored requests (0.05: at most 5 % of predictions may change class).
    canary_shadow_max_disagreement: float = Field(default=0.05, ge=0, le=1)
    # The canary's lease: if the flow stops renewing it (process killed, machine lost), every
    # gateway replica drops the canary by itself this long after the last renewal. 0: no lease.
    canary_lease_s: float = Field(default=30.0, ge=0)
    # Share of a step's requests that may get no answer from any version (client timeout,
    # dropped connection) before the canary is rolled back (ballast.canary.UnattributedPolicy).
    canary_max_unattributed_share: float = Field(default=0.01, ge=0, le=1)
    # Release runs of every deployment (a person's release, the nightly retrain) take turns at
    # the gateway: a run whose canary would start while another's runs waits this long for its
    # turn, then fails (stage canary) without touching traffic.
    canary_turn_timeout_s: float = Field(default=3600.0, gt=0, le=7 * 86400, allow_inf_nan=False)
    # What the canary judges: "replay" sends held-out rows itself (labelled: accuracy too; what a
    # laptop with no users needs), "live" reads what real clients got from the gateway.
    canary_traffic: Literal["replay", "live"] = "replay"
    # threshold: fixed limits per step; sequential: always-valid tests on the request stream
    # (ballast.judge.SequentialJudge, false-rollback rate bounded at 1 % however often it looks).
    judge_kind: Literal["threshold", "sequential"] = "threshold"
    judge_max_error_rate: float = Field(default=0.02, ge=0, le=1)
    judge_max_latency_ratio: float = Field(default=2.0, gt=0)
    judge_latency_slack_ms: float = Field(default=5.0, ge=0)
    judge_max_accuracy_drop: float = Field(default=0.05, ge=0, le=1)
    # The threshold judge rolls back on errors only when the lower bound of the canary's error
    # rate at this one-sided confidence is above the limit (ballast.judge.ThresholdJudge).
    judge_error_confidence: float = Field(default=0.9, ge=0.5, lt=1)

    @model_validator(mode="before")
    @classmethod
    def _floor_follows_the_metric(cls, data: object) -> object:
        # An unset floor is the metric's default: 0.9 for accuracy-like scores, none for losses
        # (0.9 as a loss ceiling would mean nothing).
        if isinstance(data, dict) and "quality_floor" not in data:
            spec = METRICS.get(str(data.get("quality_metric", "accuracy")))
            if spec is not None:
                data = {**data, "quality_floor": spec.default_floor}
        return data

    @model_validator(mode="before")
    @classmethod
    def _policy_follows_the_environment(cls, data: object) -> object:
        if isinstance(data, dict) and "approval_policy" not in data:
            dev = str(data.get("environment", "dev")).strip().lower() == "dev"
            data = {**data, "approval_policy": "auto" if dev else "manual"}
        return data

    @field_validator("quality_floor", "cost_max_ratio", mode="before")
    @classmethod
    def _none_from_the_environment(cls, v: object) -> object:
        if isinstance(v, str) and v.strip().lower() in ("", "none", "null"):
            return None
        return v

    @field_validator("quality_metric")
    @classmethod
    def _metric_the_trainer_records(cls, v: str) -> str:
        if v not in METRICS:
            raise ValueError(
                f"quality_metric must be one the trainer records: {', '.join(sorted(METRICS))}"
            )
        return v

    # Checks across fields have no one field to blame: their messages name the variables.
    @model_validator(mode="after")
    def _floor_fits_the_metric(self) -> Settings:
        try:
            self.quality_policy()  # refuses a floor outside the metric's range (accuracy 1.5)
        except ConfigError as exc:
            raise ValueError(
                f"BALLAST_QUALITY_FLOOR (with BALLAST_QUALITY_METRIC): {exc.message}"
            ) from exc
        return self

    @model_validator(mode="after")
    def _auto_approval_in_dev_only(self) -> Settings:
        from ballast.decisions import approval_policy_for

        try:
            approval_policy_for(None, self.approval_policy, self.environment)
        except ConfigError as exc:
            raise ValueError(
                f"BALLAST_APPROVAL_POLICY (with BALLAST_ENVIRONMENT): {exc.message}"
            ) from exc
        return self

    @model_validator(mode="after")
    def _pods_port_needs_pods(self) -> Settings:
        # Left alone it would do nothing: the watchdog and the canary read the one gateway URL.
        if self.gateway_pods_port is not None and self.gateway_pods_host is None:
            raise ValueError(
                "BALLAST_GATEWAY_PODS_PORT is set without BALLAST_GATEWAY_PODS_HOST, the name "
                "of the gateway's pods it is the port of"
            )
        return self

    @model_validator(mode="after")
    def _training_topology(self) -> Settings:
        # Checked here, when settings load, not at the train stage after ingest has run.
        from ballast.distributed import Topology

        try:
            Topology(
                nproc_per_node=1,
                nnodes=self.train_nnodes,
                rdzv_endpoint=self.train_rdzv_endpoint,
                rdzv_id=self.train_rdzv_id,
            )
        except ConfigError as exc:
            raise ValueError(
                "BALLAST_TRAIN_NNODES / BALLAST_TRAIN_RDZV_ENDPOINT / BALLAST_TRAIN_RDZV_ID: "
                f"{exc.message}"
            ) from exc
        return self

    @model_validator(mode="after")
    def _no_unknown_ballast_variables(self) -> Settings:
        # extra="forbid" covers keyword arguments only: a misspelt variable would be ignored
        # and its setting would silently keep the default (BALLAST_CANARY_STEP=5,10 for
        # BALLAST_CANARY_STEPS). Names are matched as pydantic-settings does, ignoring case.
        known = {f"BALLAST_{name.upper()}" for name in type(self).model_fields} | OTHER_ENV
        unknown = sorted(
            k
            for k in os.environ
            if k.upper().startswith("BALLAST_")
            and k.upper() not in known
            and not _SERVICE_LINK.match(k.upper())
        )
        if unknown:
            named = []
            for k in unknown:
                close = difflib.get_close_matches(k.upper(), sorted(known), n=1, cutoff=0.75)
                named.append(f"{k} (did you mean {close[0]}?)" if close else k)
            raise ValueError(
                f"unknown BALLAST_* environment variable(s): {', '.join(named)}. Unset or "
                "rename them: a misspelt name would leave its setting at the default"
            )
        return self

    @field_validator("gateway_port", mode="before")
    @classmethod
    def _not_a_service_link(cls, v: object) -> object:
        if isinstance(v, str) and "://" in v:
            raise ValueError(
                f"{v!r} is a Kubernetes service link (a Service named ballast-gateway), not a "
                "port: set enableServiceLinks: false on the pod, or the port explicitly"
            )
        return v

    @field_validator("gateway_admin_token")
    @classmethod
    def _a_strong_admin_token(cls, v: SecretStr | None) -> SecretStr | None:
        # The admin role's token: as long as the token file's and the tokens file's (16+), so
        # this is not the one path that takes "a". Never echoed.
        if v is not None:
            token = v.get_secret_value().strip()
            if len(token) < 16 or any(c.isspace() for c in token):
                raise ValueError("must be at least 16 characters, with no whitespace inside")
        return v

    @field_validator("bench_batches")
    @classmethod
    def _bench_batches_exportable(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v or any(not 1 <= b <= MAX_EXPORT_BATCH for b in v):
            raise ValueError(
                f"bench_batches must be one or more batch sizes within 1..{MAX_EXPORT_BATCH}"
                f" (the largest is the batch the artefact is compiled for), got {list(v)}"
            )
        return v

    @field_validator("model_name")
    @classmethod
    def _a_name(cls, v: str) -> str:
        return check_name(v)

    @field_validator("gateway_host")
    @classmethod
    def _a_host(cls, v: str) -> str:
        return check_host(v)

    @field_validator("gateway_pods_host")
    @classmethod
    def _a_pods_host(cls, v: str | None) -> str | None:
        return None if v is None else check_host(v)

    @field_validator("model_name")
    @classmethod
    def _a_servable_name(cls, v: str) -> str:
        # Refused here rather than by the gateway at the canary, after training and registering.
        if not re.fullmatch(NAME_PATTERN, v):
            raise ValueError(
                "must be letters, digits, '.', '_' or '-' (at most 128, starting with a letter "
                f"or digit): the gateway serves it at /v1/models/<name>; got {v!r}"
            )
        return v

    @field_validator("dataset_name")
    @classmethod
    def _a_file_name(cls, v: str) -> str:
        # It names a file under state_dir/datasets: "../x" would write outside it, "" a
        # hidden ".csv.enc".
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}", v) or ".." in v:
            raise ValueError(
                "must be letters, digits, '.', '_' or '-' (at most 128, starting with a letter "
                f"or digit, no '..'): it names a file under state_dir/datasets; got {v!r}"
            )
        return v

    @field_validator("state_dir")
    @classmethod
    def _a_folder(cls, v: Path) -> Path:
        # Every command writes under it (audit log, keys, registry): a file here failed later,
        # half way, with a traceback.
        if v.exists() and not v.is_dir():
            raise ValueError(f"must be a folder (or not exist yet), but {str(v)!r} is a file")
        return v

    @field_validator("mlflow_tracking_uri", "s3_endpoint_url", "kms_endpoint_url")
    @classmethod
    def _a_uri_or_nothing(cls, v: str) -> str:
        # Empty: the embedded default. Anything else must say how to reach it: "localhost:5000"
        # would be read as a URI whose scheme is "localhost", a bare path as a local file store.
        if v and not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*://\S+|sqlite:/{3,4}\S+", v):
            # Not echoed: a value without a scheme ("user:password@host") is not redacted.
            raise ValueError("must be a URI with a scheme (http://host:port, sqlite:///...)")
        return v

    @field_validator("canary_steps")
    @classmethod
    def _steps_rise_to_100(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v or any(not 0 < s <= 100 for s in v) or list(v) != sorted(set(v)) or v[-1] != 100:
            raise ValueError("canary_steps must rise strictly within 1..100 and end at 100")
        return v

    def quality_policy(self) -> QualityPolicy:
        """The quality gate's policy: the metric's direction from :data:`ballast.quality.METRICS`."""
        return QualityPolicy.for_metric(
            self.quality_metric, max_drop=self.quality_max_drop, floor=self.quality_floor
        )

    @property
    def tracking_uri(self) -> str:
        if self.mlflow_tracking_uri:
            return self.mlflow_tracking_uri
        return f"sqlite:///{(self.state_dir / 'mlflow.db').resolve()}"

    @property
    def artifact_root(self) -> Path:
        return (self.state_dir / "mlartifacts").resolve()

    @property
    def default_dataset_uri(self) -> str:
        return self.dataset_uri or str(
            (self.state_dir / "datasets" / f"{self.dataset_name}.csv.enc").resolve()
        )

    @property
    def gateway_url(self) -> str:
        return f"http://{self.gateway_host}:{self.gateway_port}"

    @property
    def audit_log(self) -> Path:
        return self.state_dir / "audit.jsonl"

    def admin_token(self) -> str:
        """The gateway admin token: from the environment, else a random one kept in state_dir (0600)."""
        if self.gateway_admin_token is not None:
            # A Secret made from a file often ends in a newline: never part of the token (an
            # illegal header value, and the client would send it stripped).
            return self.gateway_admin_token.get_secret_value().strip()
        path = self.state_dir / "admin-token"
        try:
            return self._read_admin_token(path)
        except FileNotFoundError:
            pass
        import secrets

        self.state_dir.mkdir(parents=True, exist_ok=True)
        # Written whole under a private name, then linked into place: processes starting
        # together (the gateway's workers) never read a half-written file, and exactly one
        # token wins; the others read it.
        tmp = path.with_name(f".admin-token.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_urlsafe(32))
                fh.flush()
                os.fsync(fh.fileno())
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return self._read_admin_token(path)

    @staticmethod
    def _read_admin_token(path: Path) -> str:
        """FileNotFoundError when there is none yet; ConfigError when it is unusable."""
        try:
            token = read_private(path, "admin token file").decode("utf-8").strip()
        except PrivateFileError as exc:
            if exc.missing:
                raise FileNotFoundError(path) from None
            raise ConfigError(exc.message) from None
        except UnicodeDecodeError:
            raise ConfigError(f"admin token file {path} is not UTF-8 text") from None
        if len(token) < 16:
            raise ConfigError(f"admin token file {path} holds no token of 16 characters or more")
        return token

    # --- Approval roles (issue 9, approval gate; added by the approval helper) ---------------
    # A JSON file {"name": ["approver", "operator", "admin"], ...}, mode 0600, outside the repo;
    # None means no file. ``approvers`` grants the approver role to more names on top of it.
    roles_file: Path | None = None
    approvers: tuple[str, ...] = ()
    # Signed approvals (ballast.approval_signing): "registered" requires a signature from every
    # approver whose key the roles file registers (names without one answer by name, as
    # before); "required" refuses any unsigned answer. ``approver_key_file`` is this user's
    # private key (0600, outside the repository), read by ``ballast approve`` to sign.
    approval_signatures: Literal["registered", "required"] = "registered"
    approver_key_file: Path | None = None

    # --- Data-parallel training (issue 7; ballast.distributed, docs/distributed-training.md) ----
    # Processes per node: "auto" (one per visible GPU, 1 on CPU) or a positive integer. 1 on one
    # node (the default) is plain single-process training, no torchrun.
    train_world_size: str = "1"
    # Several nodes: every node runs the same torchrun; they meet at the c10d rendezvous endpoint
    # (host:port) under one job id, and state_dir must be storage every node mounts.
    train_nnodes: int = Field(default=1, ge=1)
    train_rdzv_endpoint: str = ""
    train_rdzv_id: str = ""
    # Wall-clock limit of one launch; past it every rank is stopped and the run fails.
    train_timeout_s: float = Field(default=3600.0, gt=0, le=7 * 86400, allow_inf_nan=False)
    # Demos and tests: sleep after each epoch so a run can be interrupted mid-way.
    train_pause_after_epoch_s: float = Field(default=0.0, ge=0)

    @field_validator("train_world_size")
    @classmethod
    def _world_size_auto_or_positive(cls, v: str) -> str:
        v = v.strip().lower()
        if v != "auto" and not (v.isdigit() and int(v) >= 1):
            raise ValueError("train_world_size must be 'auto' or a positive integer")
        return v


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (read once; tests call ``get_settings.cache_clear()``).

    Bad settings raise :class:`ConfigError` naming each variable and what is wrong with it (one
    line a problem), not pydantic's report with its input echoed: a value may be a secret.
    """
    try:
        return Settings()
    except ValidationError as exc:
        problems = _problems(exc)
    except SettingsError:
        # pydantic-settings stops at the first value it cannot parse as JSON (a list): read
        # again, leaving out every such value, so each problem is named at once.
        unparsable, rest = _read_leaving_out_unparsable()
        problems = [
            f"BALLAST_{f.upper()} is not valid JSON (a list is written "
            '[10,50,100] or ["alice","bob"])'
            for f in unparsable
        ] or ["a BALLAST_* variable is not valid JSON"]
        problems += _problems(rest) if rest is not None else []
    raise ConfigError("invalid settings: " + "; ".join(problems)) from None


def _problems(exc: ValidationError) -> list[str]:
    problems = []
    for e in exc.errors(include_input=False, include_url=False):
        # The variable only: a list item's index is not part of its name.
        where = f"BALLAST_{str(e['loc'][0]).upper()}" if e["loc"] else ""
        msg = str(e["msg"]).removeprefix("Value error, ")
        problems.append(f"{where}: {msg}" if where else msg)
    return problems


def _read_leaving_out_unparsable() -> tuple[list[str], ValidationError | None]:
    """The fields whose variable is not valid JSON, and what else is wrong with the settings
    read without them (None: nothing)."""
    unparsable: list[str] = []

    class Lenient(EnvSettingsSource):
        def prepare_field_value(
            self, field_name: str, field: FieldInfo, value: Any, value_is_complex: bool
        ) -> Any:
            try:
                return super().prepare_field_value(field_name, field, value, value_is_complex)
            except ValueError:
                unparsable.append(field_name)
                return None  # left out: the field keeps its default

    class Reading(Settings):
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            return (init_settings, Lenient(settings_cls), dotenv_settings, file_secret_settings)

    try:
        Reading()
    except ValidationError as exc:
        return unparsable, exc
    except SettingsError:
        pass  # what the lenient source cannot catch is reported as "not valid JSON" anyway
    return unparsable, None
