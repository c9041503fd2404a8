"""The serving benchmark's reading of wrk's output and of /proc CPU counters."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ballast.bench.procstat import cpu_ticks
from ballast.bench.serving import main, parse_wrk

WRK = """Running 55s test @ http://127.0.0.1:8000/v1/models/m/predict
  1 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     4.10ms    1.02ms  40.11ms   90.00%
    Req/Sec    15.60k     1.10k   17.00k    70.00%
  Latency Distribution
     50%  {p50}
     75%    4.50ms
     90%    5.10ms
     99%  {p99}
  {n} requests in {total}, 123.45MB read
{extra}Requests/sec:  15600.00
Transfer/sec:      2.24MB
"""


@pytest.mark.parametrize(
    ("total", "seconds"),
    [("20.00s", 20.0), ("0.92m", 55.2), ("1.00m", 60.0), ("850.10ms", 0.8501), ("1.10h", 3960.0)],
)
def test_wrk_run_lengths_in_every_unit_it_prints(total: str, seconds: float) -> None:
    # wrk switches to minutes from 0.85 of one (a 51 s run reads "0.85m"): before, the parser
    # raised on it after the whole benchmark had run.
    out = WRK.format(p50="850.00us", p99="1.20s", n=858000, total=total, extra="")
    n, secs, p50, p99, failures = parse_wrk(out)
    assert (n, failures) == (858000, 0)
    assert secs == pytest.approx(seconds)
    assert (p50, p99) == (pytest.approx(0.85), pytest.approx(1200.0))


def test_wrk_failures_are_socket_errors_plus_non_2xx() -> None:
    extra = (
        "  Socket errors: connect 1, read 2, write 3, timeout 4\n  Non-2xx or 3xx responses: 90\n"
    )
    out = WRK.format(p50="4.00ms", p99="9.00ms", n=1000, total="2.00s", extra=extra)
    assert parse_wrk(out)[4] == 100


@pytest.mark.parametrize("seconds", ["2.5", "0", "-3"])
def test_run_lengths_wrk_cannot_take_are_refused_before_anything_starts(
    seconds: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # "-d2.5s" makes wrk print its usage and exit: refused by the argument parser instead.
    with pytest.raises(SystemExit) as info:
        main(["--seconds", seconds])
    assert info.value.code == 2
    assert "whole number of seconds" in capsys.readouterr().err or seconds == "2.5"


@pytest.mark.parametrize("conc", ["abc", "1,,64", "0", "16,-1"])
def test_concurrencies_that_are_not_counts_are_refused_before_anything_starts(
    conc: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Before: "abc" was a ValueError traceback, "0" and "-1" were accepted.
    with pytest.raises(SystemExit) as info:
        main(["--concurrency", conc])
    assert info.value.code == 2
    assert "--concurrency" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("option", "value", "named"),
    [
        ("--peers", "triton", "triton"),  # before: ignored, the run measured no peer
        ("--peers", "mlflow,pytritn", "pytritn"),
        ("--workers", "two", "--workers"),  # before: a ValueError traceback after the build
        ("--workers", "0", "--workers"),
    ],
)
def test_peers_and_replica_counts_are_checked_before_anything_starts(
    option: str, value: str, named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main([option, value])
    assert info.value.code == 2
    assert named in capsys.readouterr().err


def test_cpu_of_a_child_that_exits_stays_counted_in_its_parent() -> None:
    # A replica that exits between two reads used to take its ticks with it (the difference
    # shrank, or went negative); its parent's reaped-children counters keep them.
    code = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.6: pass\n"
    child = subprocess.Popen([sys.executable, "-c", code])
    tck = os.sysconf("SC_CLK_TCK")
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and cpu_ticks([child.pid]) < 0.3 * tck:
            time.sleep(0.02)
        before = cpu_ticks([os.getpid()])  # this process and its live child
        child.wait(timeout=20)  # reaped: its ticks move into this process's cutime
        after = cpu_ticks([os.getpid()])
    finally:
        child.kill()
        child.wait()
    assert after >= before, (before, after)


@pytest.mark.parametrize(
    "args",
    [["--dir", "/no/such/folder"], ["--repeat", "0"], ["--repeat", "-3"], ["--rows", "0"]],
)
def test_bench_data_refuses_bad_arguments_before_anything_starts(
    args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    # Before: a missing --dir was a FileNotFoundError traceback; --repeat 0 was accepted.
    from ballast.bench.data import main as data_main

    with pytest.raises(SystemExit) as info:
        data_main(args)
    assert info.value.code == 2
    assert args[0] in capsys.readouterr().err


def test_bench_data_measures_peak_memory_in_child_processes(tmp_path: Path) -> None:
    # The children run a script held in a string; an import line pasted into it at the wrong
    # indent (a refactor did) broke `ballast bench data` while every other test passed.
    from ballast.bench.data import bench_rss

    row = bench_rss(1 << 20, tmp_path)
    assert row.size_bytes == 1 << 20 and row.verified
    assert row.encrypt_peak_rss_mib > 0 and row.decrypt_peak_rss_mib > 0
