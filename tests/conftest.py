"""Shared fixtures. Every test gets its own state folder and keyring; nothing touches ~/.config."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from ballast.settings import Settings, get_settings


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    """Settings isolated in tmp_path, exported through the environment as a real process sees them."""
    monkeypatch.setenv("BALLAST_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("BALLAST_KEYRING_PATH", str(tmp_path / "keys" / "keyring.json"))
    monkeypatch.setenv("BALLAST_SIGNING_KEY_PATH", str(tmp_path / "keys" / "signing-key.pem"))
    monkeypatch.setenv("BALLAST_GATEWAY_PORT", str(free_port()))
    monkeypatch.setenv("BALLAST_GATEWAY_ADMIN_TOKEN", "test-admin-token")
    monkeypatch.setenv("BALLAST_EPOCHS", "15")
    get_settings.cache_clear()
    yield get_settings()
    get_settings.cache_clear()
