"""`ballast stack up` / `down` hold the stack folder's lock: two at once left a gateway that
`down` could not see (the loser's pid file overwrote the winner's). The full stack's start and
stop are tested against real servers in tests/ops/test_stack.py."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest

from ballast.settings import Settings
from ballast.stack import StackConfig, StackError, down, up


def test_up_and_down_refuse_while_another_holds_the_stack(
    settings: Settings, tmp_path: Path
) -> None:
    config = StackConfig(root=tmp_path / "stack")
    config.root.mkdir()
    (config.root / "gateway.pid").write_text("{}")  # something for down to look at
    held = os.open(config.root / "stack.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(StackError, match="another `ballast stack up` or `down` is running"):
            up(settings, config)
        with pytest.raises(StackError, match="another `ballast stack up` or `down`"):
            down(config)
    finally:
        os.close(held)
    assert sorted(p.name for p in config.root.iterdir()) == ["gateway.pid", "stack.lock"]
