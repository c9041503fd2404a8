"""The supervisor's pure rule and its sockets (bound here on 127.0.0.1, never served)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from infra.gateway import supervisor
from infra.gateway.supervisor import _bind, _claim, _hold, give_up, restart_delay


def test_a_dying_slot_backs_off_and_only_a_start_that_never_works_stops_the_gateway() -> None:
    # One death is replaced at once; a crash loop backs off, up to 30 s.
    assert [restart_delay(n) for n in (1, 2, 3, 4, 5, 6, 7, 20)] == [
        0.5,
        1.0,
        2.0,
        4.0,
        8.0,
        16.0,
        30.0,
        30.0,
    ]
    # One slot crash-looping while another serves: keep serving (before: five deaths in 30 s
    # anywhere stopped every worker, the healthy ones too).
    assert not give_up([9, 0])
    # Every slot dying at every start: stop, for whoever runs it to see.
    assert give_up([5, 5]) and give_up([5, 7])
    assert not give_up([5, 4])  # one slot has a try left


@pytest.mark.integration
def test_a_supervisor_whose_workers_can_never_start_backs_off_then_gives_up() -> None:
    import time

    # Workers that exit at once (an option they refuse): each slot is restarted after 0.5, 1,
    # 2 and 4 s, then the supervisor gives up with exit 1 (before: five restarts at once).
    started = time.monotonic()
    code = supervisor.supervise(
        host="127.0.0.1",
        port=0,
        workers=2,
        worker_args=["--no-such-option"],
        graceful_timeout=1.0,
    )
    took = time.monotonic() - started
    assert code == 1
    assert took >= 0.5 + 1 + 2 + 4, f"no back-off: gave up after {took:.1f} s"


linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="SO_REUSEPORT balances on Linux only"
)


@linux_only
def test_no_other_server_can_take_the_port_while_no_worker_listens() -> None:
    # The supervisor's holder and a worker's socket, both bound, neither listening yet (the
    # worker is still starting): a stranger with SO_REUSEADDR must not get the port, or every
    # worker's listen() would fail once it is ready.
    holder = _hold("127.0.0.1", 0)
    port = holder.getsockname()[1]
    worker = _bind("127.0.0.1", port, listen=False)
    try:
        for host in ("127.0.0.1", "0.0.0.0"):
            stranger = socket.socket()
            stranger.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            with stranger, pytest.raises(OSError, match="in use"):
                stranger.bind((host, port))
        worker.listen()  # and the worker itself still can
    finally:
        worker.close()
        holder.close()


@linux_only
def test_two_supervisors_cannot_claim_one_port() -> None:
    first = _claim(54321)
    assert first is not None
    try:
        with pytest.raises(OSError, match="in use"):
            _claim(54321)
        other = _claim(54322)
        assert other is not None
        other.close()
    finally:
        first.close()
    again = _claim(54321)  # freed with its holder
    assert again is not None
    again.close()


def test_without_balancing_there_is_no_claim(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(supervisor, "BALANCED", False)
    assert _claim(54321) is None


def test_a_dead_supervisors_metrics_folder_is_swept_by_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    gone = tmp_path / f"{supervisor.METRICS_PREFIX}{dead.pid}-abc123"
    mine = tmp_path / f"{supervisor.METRICS_PREFIX}{os.getpid()}-def456"
    old = tmp_path / f"{supervisor.METRICS_PREFIX}tfzxfgib"  # before the pid was in the name
    for folder in (gone, mine, old):
        folder.mkdir()
        (folder / "counter_1.db").write_bytes(b"\0")
    supervisor._sweep_metrics_dirs()
    assert not gone.exists() and mine.exists() and old.exists()
