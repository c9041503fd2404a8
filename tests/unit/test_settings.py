"""Settings refuse, when they load, values that would only fail (or mislead) later."""

from __future__ import annotations

import pytest

from ballast.settings import Settings


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("BALLAST_MODEL_NAME", ""),
        ("BALLAST_MODEL_NAME", " breast-cancer-mlp"),
        ("BALLAST_GATEWAY_HOST", "   "),
        ("BALLAST_MLFLOW_TRACKING_URI", "localhost:5000"),
        ("BALLAST_MLFLOW_TRACKING_URI", "/srv/mlruns"),
        ("BALLAST_S3_ENDPOINT_URL", "127.0.0.1:9000"),
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
    ],
)
def test_settings_accept_uris_with_a_scheme_and_plain_names(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    assert getattr(Settings(), name.removeprefix("BALLAST_").lower()) == value
