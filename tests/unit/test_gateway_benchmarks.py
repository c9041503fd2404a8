"""The gateway's A/B benchmark scripts: their argument parsing, statistics, and a short real run
of the in-process one (its figures are the benchmark's business, not a test's)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gateway_ab  # noqa: E402
import gateway_inproc  # noqa: E402

from ballast.bench.procstat import machine_ticks  # noqa: E402


def _bench(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``benchmarks/<script>`` with ``args`` (small settings), as anyone would."""
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        cwd=ROOT,
    )


@pytest.mark.parametrize(
    ("mode", "weight"),
    [("one", None), ("split", 10), ("split=0", 0), ("split=35", 35), ("split=100", 100)],
)
def test_ab_configuration_modes(mode: str, weight: int | None) -> None:
    assert gateway_ab._canary_weight(mode) == weight


@pytest.mark.parametrize("mode", ["two", "split=", "split=101", "split=-5", "split=x", "one=1"])
def test_ab_configuration_modes_refused(mode: str) -> None:
    assert gateway_ab._canary_weight(mode) == -1


@pytest.mark.parametrize(
    ("extra", "default", "widths", "left"),
    [
        ([], "", None, []),
        (["--workers", "2"], "", None, ["--workers", "2"]),
        (["canary=8"], "", (8,), []),
        (["canary=8,4", "--metrics-flush-ms", "0"], "", (8, 4), ["--metrics-flush-ms", "0"]),
        ([], "16", (16,), []),
        (["canary=8"], "16", (8,), []),  # the configuration's own wins
        (["canary="], "", (), []),
        (["canary=8,x"], "", (), []),
        (["canary=0"], "", (), []),
    ],
)
def test_ab_canary_widths(
    extra: list[str], default: str, widths: tuple[int, ...] | None, left: list[str]
) -> None:
    assert gateway_ab._canary_widths(extra, default) == widths
    assert extra == left  # what stays goes to the gateway


def test_ab_paired_change_reports_the_median_change_and_its_interval() -> None:
    base = [100.0, 200.0, 100.0, 200.0, 100.0, 200.0]
    # 10 % slower in every round, although the rounds themselves swing by 2x.
    text = gateway_ab._paired([90.0, 180.0, 90.0, 180.0, 90.0, 180.0], base)
    assert text.startswith("-10.0% [-10,-10] (95% CI -10.0..-10.0, 6 rounds)")


def test_machine_ticks_reads_proc_stat() -> None:
    total, stolen = machine_ticks()
    assert total > 0 and 0 <= stolen <= total


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("one version: one", gateway_inproc.Config("one version", None)),
        ("s: split", gateway_inproc.Config("s", 10)),
        ("s: split=0 canary=same", gateway_inproc.Config("s", 0, canary="same")),
        (
            "tiny: split=25 canary=8,8 run=public",
            gateway_inproc.Config("tiny", 25, "8,8", "public"),
        ),
        ("p: one run=public", gateway_inproc.Config("p", None, run="public")),
        ("n: split canary=noop", gateway_inproc.Config("n", 10, canary="noop")),
    ],
)
def test_inproc_configurations(text: str, want: gateway_inproc.Config) -> None:
    assert gateway_inproc.parse_config(text) == want


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("no label", "want 'LABEL"),
        (": one", "want 'LABEL"),
        ("x:", "want 'LABEL"),
        ("x: two", "unknown mode"),
        ("x: split=101", "unknown mode"),
        ("x: split canary=huge", "canary= takes"),
        ("x: split canary=8,0", "canary= takes"),
        ("x: split run=fast", "run= takes"),
        ("x: split color=red", "unknown option"),
        ("x: one canary=same", "needs split"),
    ],
)
def test_inproc_configurations_refused(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        gateway_inproc.parse_config(text)


def test_inproc_benchmark_runs_its_configurations_and_reports_the_changes() -> None:
    out = _bench(
        "gateway_inproc.py",
        "--blocks",
        "4",
        "--seconds",
        "0.05",
        "--clients",
        "8",
        "one version: one",
        "90/10 split: split",
        "same: split=50 canary=same run=public",
        "noop: split=50 canary=noop",
    ).stdout
    one = re.search(
        r"one version\s+([\d.]+) us CPU/request \(app only\)   rows/call v1:([\d.]+)", out
    )
    split = re.search(
        r"90/10 split\s+([\d.]+) us CPU/request \(app only\)  [+-][\d.]+ us = [+-][\d.]+% \["
        r".* rows/call v1:([\d.]+) v2:([\d.]+)   call us v1:(\d+) v2:(\d+)\n",
        out,
    )
    same = re.search(r"same\s+([\d.]+) us .* rows/call v1:([\d.]+) v2:([\d.]+)", out)
    assert one and split and same, out
    assert float(one[1]) > 0 and float(split[1]) > 0
    # Eight callers at once batch together on the loop: more than one row per model call.
    assert 1 < float(one[2]) <= 8
    assert float(split[3]) >= 1  # the canary got traffic and its own model calls
    assert 0 < int(split[4]) < 250 and 0 < int(split[5]) < 250  # timed, and on the loop
    assert float(same[3]) >= 1  # the champion's session answers as the canary too
    noop = re.search(r"noop\s+([\d.]+) us .* rows/call v1:[\d.]+ v2:([\d.]+)", out)
    assert noop and float(noop[2]) >= 1, out


def test_canary_cost_visibility_benchmark_reports_both_versions_per_canary() -> None:
    out = _bench(
        "canary_cost_visibility.py",
        "--canaries",
        "16,16",
        "512,512",
        "--rounds",
        "2",
        "--seconds",
        "0.1",
        "--clients",
        "8",
    ).stdout
    line = (
        r"canary +{} +on loop True +call us champion +(\d+) canary +(\d+) \([\d.]+x; rows/call "
        r"([\d.]+) / ([\d.]+)\) +p50 us champion +(\d+) canary +(\d+) \(canary - champion +[+-]\d+\)"
    )
    small, large = (re.search(line.format(re.escape(w)), out) for w in ("16,16", "512,512"))
    assert small and large, out
    # The wider canary's calls take longer, and both versions answered through their batchers.
    assert int(large[2]) > int(small[2]), out
    assert all(float(m[4]) >= 1 and int(m[5]) > 0 and int(m[6]) > 0 for m in (small, large))


def test_fused_call_benchmark_checks_both_answers_and_reports_every_case() -> None:
    # The script asserts the merged session answers what the two sessions answer, then times.
    out = _bench(
        "ort_fused.py",
        "--rows",
        "4,2",
        "--blocks",
        "2",
        "--calls",
        "20",
    )
    assert "Shape mismatch" not in out.stderr, out.stderr[-2000:]  # one batch axis per input
    rows = dict(
        re.findall(r"^ *(champion|two calls|fused|fused, no canary) +([\d.]+) ", out.stdout, re.M)
    )
    assert set(rows) == {"champion", "two calls", "fused", "fused, no canary"}, out.stdout
    assert all(float(v) > 0 for v in rows.values())


def test_perf_stat_counts_sum_rounds_and_skip_what_was_not_counted(tmp_path: Path) -> None:
    # perf stat -x, output, as Linux perf 6 writes it; two rounds of one configuration.
    one, two = tmp_path / "stat-0-0.csv", tmp_path / "stat-0-1.csv"
    one.write_text(
        "# started on Sun Nov 29 16:17:22 2026\n\n"
        "109,,raw_syscalls:sys_enter,953849,100.00,,\n"
        "2,,context-switches,953849,100.00,,\n"
        "7,,syscalls:sys_enter_getpid,953849,100.00,,\n"
        "<not supported>,,L2-misses,0,100.00,,\n"
    )
    two.write_text(
        "11,,raw_syscalls:sys_enter,1,100.00,,\n3,,syscalls:sys_enter_futex,1,100.00,,\n"
    )
    assert gateway_ab._stat_counts([one, two]) == {
        "all syscalls": 120,
        "context-switches": 2,
        "getpid": 7,
        "futex": 3,
    }
