"""Gateway configurations side by side: alternating wrk rounds, median req/s and CPU/request.

    .venv/bin/python benchmarks/gateway_ab.py                       # 1 version vs 90/10 split
    .venv/bin/python benchmarks/gateway_ab.py --rounds 8 \\
        "loop: one" "threads: one --inline-below-us 0"             # any gateway arguments

Each configuration is ``"LABEL: one|split[=W] [canary=W1,W2] [gateway args...]"`` (``split`` is a 90/10
canary split; ``split=W`` gives the canary W percent, 0 keeps it loaded but idle; the canary is a
copy of the champion, or with ``canary=8`` a model of those hidden widths, whose weights take
almost no cache) and runs as its own gateway
(``--workers`` replicas, the 30->256->256->2 MLP of ``ballast bench serving``), all started
before the first round. Rounds alternate between them (wrk, one thread, ``--concurrency`` 64, ``--seconds``
each), so slow drift of a shared machine hits every configuration alike; a single run minutes
apart can differ by +-20 % on these VMs. Reported per configuration: median req/s, median CPU
microseconds per request of all its gateway processes (from /proc: steadier than req/s), and
every round's req/s (with ``--together`` every configuration is loaded at the same time in
each round, a wrk each: they then share the cores at the same instants, which cancels the
machine's passing disturbances better than alternation); for each configuration after the first, the median of its per-round
changes against the first (the rounds next to each other in time) with the quartiles; the
machine's steal time; and, from ``/metrics``, the mean rows per model call of each version
(how well requests batch: the fixed cost of a call is shared by that many). ``--perf`` adds
each configuration's CPU per request by shared object (perf samples), ``--syscalls`` its system
calls (by kind), context switches and page faults per request (perf stat on kernel tracepoints,
which a VM without hardware counters still has).
"""

from __future__ import annotations

import argparse
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ballast.bench.onnx_mlp import build_mlp_onnx
from ballast.bench.paired import paired_change
from ballast.bench.procstat import cpu_ticks, cpu_us_per_request, machine_ticks, with_children
from ballast.bench.serving import HIDDEN, _deploy, _gateway_process, _lua, _wrk, predict_body

PERF_HZ = 1999  # samples per second of CPU time (--perf)


@contextmanager
def _perf_attached(cmd: list[str], pid: int) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``perf`` ``cmd`` on the gateway's processes (``pid`` and its replicas) for the block,
    stopped as perf wants (SIGINT) at its end."""
    proc = subprocess.Popen(
        [*cmd, "-p", ",".join(sorted(with_children([pid])))],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.3)  # attached before the load starts
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)


@contextmanager
def _perf(pid: int, out: Path | None) -> Iterator[None]:
    """Sample the gateway's processes on the CPU clock into ``out`` (None: do nothing)."""
    if out is None:
        yield
        return
    cmd = ["perf", "record", "-q", "-e", "cpu-clock", "-F", str(PERF_HZ), "-o", str(out)]
    with _perf_attached(cmd, pid) as proc:
        yield
    if not out.is_file():  # e.g. kernel.perf_event_paranoid forbids it for this user
        raise SystemExit(f"perf record wrote nothing (exit status {proc.returncode})")


def _perf_by_dso(files: list[Path]) -> Counter[str]:
    """Samples per shared object (the kernel, libpython, onnxruntime...) over ``files``."""
    total: Counter[str] = Counter()
    for f in files:
        out = subprocess.run(
            ["perf", "report", "-i", str(f), "--stdio", "-q", "--sort", "dso", "-F", "sample,dso"],
            capture_output=True,
            text=True,
        ).stdout
        for line in out.splitlines():
            count, _, dso = line.strip().partition(" ")
            if count.isdigit():
                total[dso.strip()] += int(count)
    return total


# Counted per request with --syscalls: every system call, then the ones a replica makes in
# its loop (libuv's epoll, socket reads and writes, futex hand-offs to threads, getpid from
# prometheus_client's multiprocess values), context switches and page faults.
SYSCALLS = ("epoll_pwait", "epoll_wait", "read", "write", "writev", "futex", "getpid", "madvise")
STAT_EVENTS = (
    "raw_syscalls:sys_enter",
    "context-switches",
    "page-faults",
    *(f"syscalls:sys_enter_{name}" for name in SYSCALLS),
)


@contextmanager
def _perf_stat(pid: int, out: Path | None) -> Iterator[None]:
    """Count ``STAT_EVENTS`` (kernel tracepoints: no hardware counters needed, so it works on
    a VM) over the gateway's processes into ``out`` as CSV (None: do nothing)."""
    if out is None:
        yield
        return
    cmd = ["perf", "stat", "-x,", "-o", str(out), "-e", ",".join(STAT_EVENTS)]
    with _perf_attached(cmd, pid) as proc:
        yield
    counts = _stat_counts([out]) if out.is_file() else Counter()
    if not counts:  # tracefs not mounted, or kernel.perf_event_paranoid forbids it
        raise SystemExit(f"perf stat counted nothing (exit status {proc.returncode})")


def _stat_counts(files: list[Path]) -> Counter[str]:
    """Event -> count summed over ``perf stat -x,`` outputs (``<not supported>`` rows skipped)."""
    total: Counter[str] = Counter()
    for f in files:
        for line in f.read_text().splitlines():
            fields = line.split(",")
            if len(fields) < 3:
                continue
            try:
                value = float(fields[0])
            except ValueError:
                continue
            event = fields[2].removeprefix("syscalls:sys_enter_")
            total["all syscalls" if event == "raw_syscalls:sys_enter" else event] += int(value)
    return total


def _paired(values: list[float], base: list[float]) -> str:
    """Median change against the first configuration, each round against the same round's
    (neighbours in time, so the machine's slow drift cancels), with the quartiles' spread and
    the median's 95 % interval (:mod:`ballast.bench.paired`)."""
    return paired_change(values, base).text()


Run = tuple[str, str, int, list[float], list[float]]  # label, url, pid, req/s, CPU us/req


def _round(
    runs: list[Run],
    script: Path,
    seconds: int,
    concurrency: int,
    perf: list[Path | None],
    stat: list[Path | None] | None = None,
) -> float:
    """Load ``runs`` at once (a wrk each; one run: alone) and record each one's req/s and CPU
    per request (``perf``: where to record each one's CPU samples, if anywhere). Returns the
    machine's steal time over the round, in percent."""
    pids = [pid for _, _, pid, _, _ in runs]
    # The gateway process and its replicas (cpu_ticks adds the children).
    before, machine = [cpu_ticks([pid]) for pid in pids], machine_ticks()
    with ExitStack() as sampling, ThreadPoolExecutor(len(runs)) as pool:
        for pid, out, counts in zip(pids, perf, stat or [None] * len(pids), strict=True):
            sampling.enter_context(_perf(pid, out))
            sampling.enter_context(_perf_stat(pid, counts))
        futures = [
            pool.submit(_wrk, f"{url}/v1/models/m/predict", script, concurrency, seconds, label)
            for label, url, _, _, _ in runs
        ]
        rows = [f.result() for f in futures]
    after = [cpu_ticks([pid]) for pid in pids]
    total, stolen = (b - a for a, b in zip(machine, machine_ticks(), strict=True))
    for (label, _, _, rps, cpu), row, t0, t1 in zip(runs, rows, before, after, strict=True):
        if row.errors:
            raise SystemExit(f"{label}: {row.errors} failed requests")
        rps.append(row.rps)
        cpu.append(cpu_us_per_request(t1 - t0, row.rps * row.seconds))
    return 100 * stolen / max(1, total)


def _canary_weight(mode: str) -> int | None:
    """None for 'one', the canary's percent for 'split' (10) or 'split=W'; -1 if unreadable."""
    if mode == "one":
        return None
    if mode == "split":
        return 10
    name, _, value = mode.partition("=")
    if name == "split" and value.isdigit() and int(value) <= 100:
        return int(value)
    return -1


def _canary_widths(extra: list[str], default: str) -> tuple[int, ...] | None:
    """The canary's hidden widths from a configuration's ``canary=W1,W2`` (removed from
    ``extra``, the gateway's arguments) or ``--canary-hidden``; None: a copy of the champion;
    () if unreadable."""
    text = default
    if extra and extra[0].startswith("canary="):
        text = extra.pop(0).partition("=")[2]
        if not text:
            return ()
    if not text:
        return None
    parts = text.split(",")
    if not all(w.isdigit() and int(w) > 0 for w in parts):
        return ()
    return tuple(int(w) for w in parts)


def _rows_per_call(url: str) -> dict[str, float]:
    """Mean rows per model call of each version since the gateway started (warm-up included)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    text = httpx.get(f"{url}/metrics", timeout=30).text
    for family in text_string_to_metric_families(text):
        if family.name != "ballast_batch_size_rows":
            continue
        for sample in family.samples:
            version = sample.labels.get("version", "?")
            if sample.name.endswith("_sum"):
                sums[version] = sums.get(version, 0.0) + sample.value
            elif sample.name.endswith("_count"):
                counts[version] = counts.get(version, 0.0) + sample.value
    return {v: sums[v] / counts[v] for v in sums if counts.get(v)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("configs", nargs="*", default=["one version: one", "90/10 split: split"])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=int, default=4)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=64, help="wrk connections (64)")
    p.add_argument(
        "--canary-hidden",
        default="",
        help="the canary's hidden widths, e.g. 8, for configurations without canary= "
        "(default: a copy of the champion): a tiny canary shows how much of a split's cost is "
        "its weights in the cache",
    )
    p.add_argument(
        "--perf",
        action="store_true",
        help="also sample each configuration's processes with `perf record -e cpu-clock` "
        "(Linux perf) and report its CPU per request by shared object",
    )
    p.add_argument(
        "--syscalls",
        action="store_true",
        help="also count each configuration's system calls, context switches and page faults "
        "per request (`perf stat` on kernel tracepoints)",
    )
    p.add_argument(
        "--together",
        action="store_true",
        help="load every configuration at once in each round instead of one after another",
    )
    args = p.parse_args(argv)
    if (args.perf or args.syscalls) and shutil.which("perf") is None:
        p.error("--perf and --syscalls need Linux perf on PATH (Debian: apt install linux-perf)")
    with tempfile.TemporaryDirectory(prefix="ballast-ab-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        model = build_mlp_onnx(work / "model.onnx", seed=0, hidden=HIDDEN)
        script = _lua(work / "predict.lua", predict_body())
        canaries: dict[tuple[int, ...], Path] = {}
        runs: list[Run] = []
        for i, spec in enumerate(args.configs):
            label, _, rest = spec.partition(":")
            mode, *extra = rest.split() or [""]
            weight = _canary_weight(mode)
            if weight == -1:
                p.error(f"{spec!r}: say 'one', 'split' or 'split=W' (0-100) after the label")
            if weight is None and extra and extra[0].startswith("canary="):
                p.error(f"{spec!r}: canary= needs split")
            widths = _canary_widths(extra, args.canary_hidden)
            if widths == ():
                p.error(f"{spec!r}: canary= takes hidden widths such as 8 or 8,8")
            canary = None
            if widths is not None and weight is not None:
                if widths not in canaries:
                    name = "canary-" + "-".join(map(str, widths)) + ".onnx"
                    canaries[widths] = build_mlp_onnx(work / name, seed=1, hidden=widths)
                canary = canaries[widths]
            folder = work / f"c{i}"
            folder.mkdir()
            gw, token = stack.enter_context(_gateway_process(folder, args.workers, extra))
            _deploy(gw.url, token, "m", model, weight, canary)
            runs.append((label.strip(), gw.url, gw.pid, [], []))
        for _, url, _, _, _ in runs:  # warm-up
            _wrk(f"{url}/v1/models/m/predict", script, 16, 2, "warm-up")
        steal: list[float] = []
        samples: dict[str, list[Path]] = {label: [] for label, *_ in runs}

        def perf_files(chosen: list[Run], r: int) -> list[Path | None]:
            if not args.perf:
                return [None] * len(chosen)
            files = [work / f"perf-{runs.index(run)}-{r}.data" for run in chosen]
            for run, f in zip(chosen, files, strict=True):
                samples[run[0]].append(f)
            return list(files)

        stats: dict[str, list[Path]] = {label: [] for label, *_ in runs}

        def stat_files(chosen: list[Run], r: int) -> list[Path | None]:
            if not args.syscalls:
                return [None] * len(chosen)
            files = [work / f"stat-{runs.index(run)}-{r}.csv" for run in chosen]
            for run, f in zip(chosen, files, strict=True):
                stats[run[0]].append(f)
            return list(files)

        for r in range(args.rounds):
            if args.together:  # every configuration at the same instants
                chosen = runs
                steal.append(
                    _round(
                        chosen,
                        script,
                        args.seconds,
                        args.concurrency,
                        perf_files(chosen, r),
                        stat_files(chosen, r),
                    )
                )
                continue
            # One after another; every other round in reverse order, so none always goes first.
            for run in runs if r % 2 == 0 else runs[::-1]:
                files, counts = perf_files([run], r), stat_files([run], r)
                steal.append(_round([run], script, args.seconds, args.concurrency, files, counts))
        batching = [_rows_per_call(url) for _, url, _, _, _ in runs]
        by_dso = {label: _perf_by_dso(files) for label, files in samples.items()}
        by_event = {label: _stat_counts(files) for label, files in stats.items()}
    base_rps, base_cpu = runs[0][3], runs[0][4]
    print(f"{'configuration':24s} {'req/s':>8s} {'CPU us/req':>11s}  rows/call  req/s per round")
    for (label, _, _, rps, cpu), per_call in zip(runs, batching, strict=True):
        rounds = " ".join(f"{r:,.0f}" for r in rps)
        calls = " ".join(f"v{v}:{n:.1f}" for v, n in sorted(per_call.items()))
        print(
            f"{label:24s} {statistics.median(rps):8,.0f} {statistics.median(cpu):11.1f}"
            f"  {calls:9s}  {rounds}"
        )
    for label, _, _, rps, cpu in runs[1:]:
        print(f"{label} vs {runs[0][0]}, per round: req/s {_paired(rps, base_rps)}")
        print(f"{'':{len(label) + len(runs[0][0]) + 16}s}CPU/request {_paired(cpu, base_cpu)}")
    print(
        f"steal time: median {statistics.median(steal):.1f} % of the machine, max {max(steal):.1f} %"
    )
    if args.perf:
        _print_perf(runs, by_dso, args.seconds)
    if args.syscalls:
        _print_per_request(runs, by_event, args.seconds)
    return 0


def _print_per_request(runs: list[Run], by_event: dict[str, Counter[str]], seconds: int) -> None:
    """Each counted event per request (all rounds together), and its change against the first."""
    per: dict[str, dict[str, float]] = {}
    for label, _, _, rps, _ in runs:
        requests = sum(rps) * seconds
        per[label] = {e: n / requests for e, n in by_event[label].items()}
    base = runs[0][0]
    print("per request (perf stat over every round), change against the first:")
    print(f"{'':24s}" + "".join(f"{label[:20]:>22s}" for label, *_ in runs))
    events = ["all syscalls", *SYSCALLS, "context-switches", "page-faults"]
    for event in events:
        cells = []
        for label, *_ in runs:
            v, b = per[label].get(event, 0.0), per[base].get(event, 0.0)
            change = f" ({v - b:+.3f})" if label != base else ""
            cells.append(f"{v:.3f}{change}".rjust(22))
        print(f"{event:24s}" + "".join(cells))


def _print_perf(runs: list[Run], by_dso: dict[str, Counter[str]], seconds: int) -> None:
    """CPU microseconds per request by shared object, from the perf samples of every round."""
    us: dict[str, dict[str, float]] = {}
    for label, _, _, rps, _ in runs:
        requests = sum(rps) * seconds
        us[label] = {d: n / PERF_HZ * 1e6 / requests for d, n in by_dso[label].items()}
    base = runs[0][0]
    dsos = sorted(set().union(*us.values()), key=lambda d: -us[base].get(d, 0.0))
    print("CPU us per request by shared object (perf samples), change against the first:")
    print(f"{'':44s}" + "".join(f"{label[:20]:>22s}" for label, *_ in runs))
    for dso in [*dsos[:12], "all"]:
        cells = []
        for label, *_ in runs:
            v = sum(us[label].values()) if dso == "all" else us[label].get(dso, 0.0)
            b = sum(us[base].values()) if dso == "all" else us[base].get(dso, 0.0)
            change = f" ({100 * (v / b - 1):+.0f}%)" if label != base and b else ""
            cells.append(f"{v:.2f}{change}".rjust(22))
        print(f"{dso[-44:]:44s}" + "".join(cells))


if __name__ == "__main__":
    raise SystemExit(main())
