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


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP"])
def test_a_stop_signal_during_up_cleans_up_as_ctrl_c_and_exits_128_plus_it(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sig: str
) -> None:
    import signal
    import time

    import ballast.stack as stack

    signum = getattr(signal, sig)
    cleaned: list[str] = []

    def starting(*args: object) -> None:
        try:
            os.kill(os.getpid(), signum)
            time.sleep(5)  # the handler interrupts this
            raise AssertionError("the signal never arrived")
        except KeyboardInterrupt:  # where _up stops what it started on Ctrl-C
            cleaned.append("stopped what was started")
            raise

    def outer(signum: int, frame: object) -> None:  # reached only if `up` did not take over
        raise AssertionError(f"signal {signum} reached the handler in force before `up`")

    # A handler of the test's own (under `nohup` the signal would be ignored, and stay so).
    before = signal.signal(signum, outer)
    try:
        monkeypatch.setattr(stack, "_up", starting)
        config = StackConfig(root=tmp_path / "stack")
        config.root.mkdir()
        # Before: SIGHUP (the terminal closed) killed `up`, MLflow and the gateway left running.
        with pytest.raises(SystemExit) as info:
            up(settings, config)
        assert info.value.code == 128 + signum and cleaned == ["stopped what was started"]
        assert signal.getsignal(signum) is outer
    finally:
        signal.signal(signum, before)


def test_a_stop_signal_held_back_while_a_process_starts_is_raised_even_if_the_start_failed() -> (
    None
):
    # Review: a spawn that raised dropped the pending signal, so `up` exited 1 instead of
    # 128+signal, and its cleanup could then be cut short by the next one.
    import signal

    from ballast.stack import _StopSignals, _Terminated

    guard = _StopSignals()

    def failing_start() -> None:
        with guard.deferred():
            guard.handler(signal.SIGTERM, None)  # arrives while the process starts: held back
            raise RuntimeError("spawn failed")

    with pytest.raises(_Terminated) as info:
        failing_start()
    assert info.value.signum == signal.SIGTERM and guard.fired == signal.SIGTERM
    assert isinstance(info.value.__context__, RuntimeError)
    # Once a cleanup runs (after any failure), no signal interrupts it.
    calm = _StopSignals()
    calm.cleaning()
    calm.handler(signal.SIGINT, None)
    calm.handler(signal.SIGTERM, None)
    assert calm.fired is None
