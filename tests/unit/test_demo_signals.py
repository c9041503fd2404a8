"""`ballast demo` turns SIGTERM and SIGHUP into SystemExit, so its gateway is stopped on the way
out, and puts the previous handlers back (the whole demo runs as a real process in
tests/integration/test_demo.py)."""

from __future__ import annotations

import io
import os
import signal
import time
from collections.abc import Callable, Iterator
from types import FrameType

import pytest
from rich.console import Console

from ballast.settings import Settings


class Unhandled(BaseException):
    """The handler in force before the demo: reaching it means the demo did not take over."""


class FakeGateway:
    stopped = 0

    def stop(self) -> None:
        self.stopped += 1


Handler = Callable[[int, FrameType | None], None]


@pytest.fixture
def guard() -> Iterator[Handler]:
    def outer(signum: int, frame: FrameType | None) -> None:
        raise Unhandled(signum)

    before = {sig: signal.signal(sig, outer) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield outer
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_stop_signal_during_the_demo_stops_its_gateway_and_exits_128_plus_the_signal(
    sig: signal.Signals, settings: Settings, monkeypatch: pytest.MonkeyPatch, guard: Handler
) -> None:
    # Given a demo whose release is under way when the signal comes
    import ballast.cli_data
    import ballast.gateway_process
    import flows.release
    from ballast.demo import run_demo

    gateway = FakeGateway()
    asked: list[dict[str, object]] = []

    def ensure_gateway(s: Settings, **kw: object) -> FakeGateway:
        asked.append(kw)
        return gateway

    def release_flow(**kw: object) -> None:
        os.kill(os.getpid(), sig)
        time.sleep(5)  # the handler interrupts this
        raise AssertionError("the signal never arrived")

    monkeypatch.setattr(ballast.cli_data, "prepare_dataset", lambda s: "file:///unused")
    monkeypatch.setattr(ballast.gateway_process, "ensure_gateway", ensure_gateway)
    monkeypatch.setattr(flows.release, "release_flow", release_flow)
    # When it runs
    with pytest.raises(SystemExit) as info:
        run_demo(settings, fault="errors", console=Console(file=io.StringIO()))
    # Then it exits as a process killed by the signal would report, its gateway stopped
    assert info.value.code == 128 + sig
    assert gateway.stopped == 1, "the demo's finally did not stop its gateway"
    assert asked == [{"exit_with_parent": True}], "the gateway would outlive a killed demo"
    # And the handlers in force before are back
    assert signal.getsignal(signal.SIGTERM) is guard
    assert signal.getsignal(signal.SIGHUP) is guard


def test_a_signal_the_launcher_ignores_stays_ignored(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `nohup ballast demo`: SIGHUP is ignored before the demo starts and must stay so throughout.
    import ballast.cli_data
    import ballast.gateway_process
    import flows.release
    from ballast.demo import run_demo

    seen: list[object] = []

    def release_flow(**kw: object) -> None:
        seen.append(signal.getsignal(signal.SIGHUP))
        os.kill(os.getpid(), signal.SIGHUP)  # ignored: nothing happens
        raise RuntimeError("release stopped here on purpose")

    monkeypatch.setattr(ballast.cli_data, "prepare_dataset", lambda s: "file:///unused")
    monkeypatch.setattr(ballast.gateway_process, "ensure_gateway", lambda s, **kw: FakeGateway())
    monkeypatch.setattr(flows.release, "release_flow", release_flow)
    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with pytest.raises(RuntimeError, match="on purpose"):
            run_demo(settings, fault="errors", console=Console(file=io.StringIO()))
        assert seen == [signal.SIG_IGN]
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, before)
