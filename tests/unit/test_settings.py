"""Settings refuse, when they load, values that would only fail (or mislead) later."""

from __future__ import annotations

import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from ballast.errors import ConfigError
from ballast.settings import OTHER_ENV, Settings, get_settings


@pytest.fixture(autouse=True)
def _fresh_settings() -> Iterator[None]:
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()  # no test leaves its environment's settings cached


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("BALLAST_MODEL_NAME", ""),
        ("BALLAST_MODEL_NAME", " breast-cancer-mlp"),
        ("BALLAST_PARITY_RTOL_FP32", "inf"),
        ("BALLAST_PARITY_RTOL_FP16", "0"),
        ("BALLAST_MODEL_NAME", "team/model"),  # the gateway serves it at /v1/models/<name>
        ("BALLAST_MODEL_NAME", "model\tv2"),
        ("BALLAST_GATEWAY_HOST", "   "),
        ("BALLAST_MLFLOW_TRACKING_URI", "localhost:5000"),
        ("BALLAST_MLFLOW_TRACKING_URI", "/srv/mlruns"),
        ("BALLAST_S3_ENDPOINT_URL", "127.0.0.1:9000"),
        ("BALLAST_KMS_ENDPOINT_URL", "localhost:4566"),
        ("BALLAST_GATEWAY_HOST", "http://127.0.0.1"),
        ("BALLAST_GATEWAY_HOST", "127.0.0.1:8765"),
        ("BALLAST_GATEWAY_PODS_HOST", "ballast-gateway-pods:8765"),  # the port is its own
        ("BALLAST_GATEWAY_PODS_HOST", ""),
        ("BALLAST_GATEWAY_PODS_PORT", "0"),
        ("BALLAST_DATASET_NAME", "../../escape"),  # a file under state_dir/datasets
        ("BALLAST_DATASET_NAME", ""),
        ("BALLAST_DATASET_NAME", "a/b"),
    ],
)
def test_settings_refuse_names_and_uris_that_would_reach_the_wrong_place(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=name.removeprefix("BALLAST_").lower()):
        Settings()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("BALLAST_MLFLOW_TRACKING_URI", "http://ballast-mlflow:5000"),
        ("BALLAST_MLFLOW_TRACKING_URI", "sqlite:////var/lib/ballast/mlflow.db"),
        ("BALLAST_MLFLOW_TRACKING_URI", ""),
        ("BALLAST_S3_ENDPOINT_URL", "http://127.0.0.1:9000"),
        ("BALLAST_GATEWAY_HOST", "ballast-gateway"),
        ("BALLAST_GATEWAY_PODS_HOST", "ballast-gateway-pods.ballast.svc"),
        ("BALLAST_DATASET_NAME", "credit.v2"),
    ],
)
def test_settings_accept_uris_with_a_scheme_and_plain_names(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    assert getattr(Settings(), name.removeprefix("BALLAST_").lower()) == value


@pytest.mark.parametrize(
    ("name", "hint"),
    [
        ("BALLAST_CANARY_STEP", "BALLAST_CANARY_STEPS"),
        ("ballast_epoch", "BALLAST_EPOCHS"),  # matched ignoring case, as the settings are read
        ("BALLAST_NO_SUCH_THING", None),
    ],
)
def test_an_unknown_ballast_variable_is_refused_with_the_name_it_may_mean(
    monkeypatch: pytest.MonkeyPatch, name: str, hint: str | None
) -> None:
    # A misspelt variable would otherwise be ignored: its setting keeps the default unseen.
    monkeypatch.setenv(name, "5")
    with pytest.raises(ConfigError, match="unknown BALLAST_") as info:
        get_settings()
    assert name in info.value.message
    assert (
        (f"did you mean {hint}?" in info.value.message)
        if hint
        else "did you mean" not in (info.value.message)
    )


def test_variables_read_elsewhere_are_not_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in OTHER_ENV:
        monkeypatch.setenv(name, "x")
    assert get_settings().model_name


def test_bad_settings_are_one_config_error_naming_each_variable_and_never_echo_a_value(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("BALLAST_MODEL_NAME", " padded ")
    monkeypatch.setenv("BALLAST_CANARY_STEPS", "[50, 5]")
    monkeypatch.setenv("BALLAST_GATEWAY_ADMIN_TOKEN", "s3cr3t-token-value")
    monkeypatch.setenv("BALLAST_EPOCHS", "many")
    with pytest.raises(ConfigError) as info:
        get_settings()
    msg = info.value.message
    for name in ("BALLAST_MODEL_NAME", "BALLAST_CANARY_STEPS", "BALLAST_EPOCHS"):
        assert name in msg, msg
    assert "s3cr3t" not in msg and "many" not in msg, msg

    monkeypatch.setenv("BALLAST_CANARY_STEPS", '[10, "x"]')  # an item's error names the list
    with pytest.raises(ConfigError, match=r"BALLAST_CANARY_STEPS: ") as item:
        get_settings()
    assert "BALLAST_CANARY_STEPS_1" not in item.value.message

    monkeypatch.setenv("BALLAST_CANARY_STEPS", "5,50,100")  # not JSON: pydantic-settings refuses
    with pytest.raises(ConfigError, match=r"BALLAST_CANARY_STEPS is not valid JSON"):
        get_settings()

    # Before: pydantic-settings stopped at the first list it could not parse, so the other list
    # and the bad number were only named on the next tries.
    monkeypatch.setenv("BALLAST_APPROVERS", "carol,dave")
    with pytest.raises(ConfigError) as every:
        get_settings()
    msg = every.value.message
    assert "BALLAST_CANARY_STEPS is not valid JSON" in msg, msg
    assert "BALLAST_APPROVERS is not valid JSON" in msg, msg
    assert "BALLAST_EPOCHS: " in msg and "BALLAST_MODEL_NAME: " in msg, msg
    assert "s3cr3t" not in msg and "carol" not in msg, msg


def test_a_kubernetes_service_link_in_the_gateway_port_is_named_as_such(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A Service named ballast-gateway gives pods BALLAST_GATEWAY_PORT=tcp://IP:PORT.
    monkeypatch.setenv("BALLAST_GATEWAY_PORT", "tcp://10.0.0.1:80")
    with pytest.raises(ConfigError, match="Kubernetes service link"):
        get_settings()


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"BALLAST_TRAIN_NNODES": "3"}, "BALLAST_TRAIN_NNODES"),
        ({"BALLAST_TRAIN_RDZV_ID": "bad id!"}, "BALLAST_TRAIN_RDZV_ID"),
        ({"BALLAST_QUALITY_FLOOR": "1.5"}, "BALLAST_QUALITY_FLOOR"),
        ({"BALLAST_GATEWAY_PODS_PORT": "8765"}, "BALLAST_GATEWAY_PODS_PORT is set without"),
    ],
)
def test_settings_checked_across_fields_are_refused_at_load_naming_their_variables(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], names: str
) -> None:
    # Before: a bad multi-node set-up loaded fine and failed at the train stage, after ingest;
    # a bad floor was refused without naming its variable.
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=names):
        get_settings()


def test_auto_approval_is_the_default_in_dev_only_and_refused_elsewhere(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Before: no notion of environment; auto (the default) approved releases anywhere.
    assert (get_settings().environment, get_settings().approval_policy) == ("dev", "auto")
    for env in ("staging", "prod"):
        monkeypatch.setenv("BALLAST_ENVIRONMENT", env)
        get_settings.cache_clear()
        assert get_settings().approval_policy == "manual"  # the default follows
        monkeypatch.setenv("BALLAST_APPROVAL_POLICY", "auto")
        get_settings.cache_clear()
        with pytest.raises(ConfigError, match=r"BALLAST_APPROVAL_POLICY.*dev only") as info:
            get_settings()
        assert "BALLAST_ENVIRONMENT" in info.value.message
        monkeypatch.delenv("BALLAST_APPROVAL_POLICY")
    monkeypatch.setenv("BALLAST_ENVIRONMENT", "production")  # not a known environment
    get_settings.cache_clear()
    with pytest.raises(ConfigError, match="BALLAST_ENVIRONMENT"):
        get_settings()


@pytest.mark.parametrize("token", ["xq7", "fifteen-chars-x", "sixteen chars xx"])
def test_a_weak_admin_token_in_the_environment_is_refused_without_echoing_it(
    monkeypatch: pytest.MonkeyPatch, token: str
) -> None:
    # Before: any non-empty value was the admin role's token; the token file and the tokens
    # file already required 16 characters.
    monkeypatch.setenv("BALLAST_GATEWAY_ADMIN_TOKEN", token)
    with pytest.raises(ConfigError, match="BALLAST_GATEWAY_ADMIN_TOKEN") as info:
        get_settings()
    assert token not in info.value.message
    monkeypatch.setenv("BALLAST_GATEWAY_ADMIN_TOKEN", " sixteen-chars-xx\n")  # as from a file
    get_settings.cache_clear()
    assert get_settings().admin_token() == "sixteen-chars-xx"


def test_the_admin_token_file_must_be_owner_only(tmp_path: Path) -> None:
    s = Settings(state_dir=tmp_path)
    token = s.admin_token()
    path = tmp_path / "admin-token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(token) >= 16
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        s.admin_token()  # before: read and used as it was


def test_processes_starting_together_share_one_admin_token(tmp_path: Path) -> None:
    # Before: O_EXCL create, then write: a racer crashed (FileExistsError) or read '' (and the
    # gateway refused to start on an empty token).
    for trial in range(10):
        s = Settings(state_dir=tmp_path / str(trial))
        start = threading.Barrier(6)
        got: list[str | BaseException] = []

        def racer(
            settings: Settings = s,
            barrier: threading.Barrier = start,
            out: list[str | BaseException] = got,
        ) -> None:
            barrier.wait()
            try:
                out.append(settings.admin_token())
            except BaseException as exc:  # reported below
                out.append(exc)

        threads = [threading.Thread(target=racer) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=10)
        assert len(got) == 6 and len(set(got)) == 1, got
        assert isinstance(got[0], str) and len(got[0]) >= 16
        assert [p.name for p in (tmp_path / str(trial)).iterdir()] == ["admin-token"]


def test_a_state_dir_that_is_a_file_is_refused_at_load(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Before: commands failed later, half way, with FileExistsError tracebacks.
    afile = tmp_path / "afile"
    afile.write_text("x")
    monkeypatch.setenv("BALLAST_STATE_DIR", str(afile))
    with pytest.raises(ValueError, match="state_dir"):
        Settings()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("BALLAST_CANARY_LEASE_S", "inf"),  # before: loaded, and the gateway got no lease
        ("BALLAST_CANARY_STEP_MAX_SECONDS", "inf"),
        ("BALLAST_JUDGE_MAX_LATENCY_RATIO", "nan"),
        ("BALLAST_CANARY_SHADOW_SECONDS", "Infinity"),
    ],
)
def test_no_setting_takes_inf_or_nan(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=name):
        get_settings()


def test_a_uri_without_a_scheme_is_refused_without_echoing_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Before: "got 'ops:s3cret@mlflow.internal:5000'": redaction only knows scheme://user:pass@.
    monkeypatch.setenv("BALLAST_MLFLOW_TRACKING_URI", "ops:s3cret@mlflow.internal:5000")
    with pytest.raises(ConfigError, match="BALLAST_MLFLOW_TRACKING_URI") as info:
        get_settings()
    assert "s3cret" not in info.value.message
