"""CPU time of server processes and of the machine, read from /proc (Linux): what the serving
benchmarks divide by the requests served to report CPU per request."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterable
from pathlib import Path

__all__ = ["cpu_ticks", "cpu_us_per_request", "machine_ticks", "with_children"]


def with_children(pids: Iterable[int | str]) -> set[str]:
    """``pids`` and their direct children (a supervisor's replicas, a server's workers)."""
    roots = [str(p) for p in pids]
    every = set(roots)
    for pid in roots:
        out = subprocess.run(["pgrep", "-P", pid], capture_output=True, text=True, check=False)
        every.update(out.stdout.split())
    return every


def cpu_ticks(pids: Iterable[int | str]) -> int:
    """User + system clock ticks of ``pids`` and their direct children (replicas, workers).

    The roots' counts include the children they have reaped (cutime, cstime): a replica that
    exits between two reads moves its ticks into its parent's, instead of taking them along
    and making the difference shrink. Divide by ``os.sysconf("SC_CLK_TCK")``.
    """
    roots = {str(p) for p in pids}
    total = 0
    for pid in with_children(roots):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except FileNotFoundError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        total += int(fields[11]) + int(fields[12])  # utime, stime
        if pid in roots:
            total += int(fields[13]) + int(fields[14])  # cutime, cstime: reaped children
    return total


def cpu_us_per_request(ticks: int, requests: float) -> float:
    """Microseconds of CPU per request, from clock ticks spent serving ``requests``."""
    return ticks / os.sysconf("SC_CLK_TCK") / max(1, round(requests)) * 1e6


def machine_ticks() -> tuple[int, int]:
    """(all CPU ticks, ticks stolen by the hypervisor) of the machine so far, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(fields[:8]), fields[7]  # user nice system idle iowait irq softirq steal
