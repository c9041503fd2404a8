"""``ballast bench serving``: the gateway against its peers, closed-loop wrk load, batch-1 JSON.

    ballast bench serving                          # gateway (1 version, 90/10 split), ceiling
    ballast bench serving --peers mlflow           # plus `mlflow models serve` (ONNX flavour)
    ballast bench serving --seconds 5 --json       # quick; one JSON object on the last line

Same model everywhere: a 30->256->256->2 MLP (ONNX, built in a temporary folder), the same
batch-1 JSON row. Each server runs alone on 127.0.0.1 and is loaded by wrk (C, a Lua body
script) at concurrency 1, 16 and 64 (c=64 twice) for ``--seconds`` each after a warm-up. The
client's CPU is measured and reported (``client_cpu``: cores wrk used). Rows: server,
concurrency, rps, p50_ms, p99_ms. The ceiling is the same ONNX Runtime session called
in-process (calls/s at batch 1, samples/s at batch 64).

The split's cost against one version is not read off two rows minutes apart (on a shared VM
they differ by up to +-20 %): both gateways run side by side and ``--split-rounds`` c=64 rounds
alternate between them; reported is the median of the per-round changes of req/s and of the
gateway's CPU per request, with the median's 95 % interval (``split_cost`` in the JSON).

PyTriton needs Python 3.12 and a venv of its own (``--pytriton-python PATH``: a venv with
``nvidia-pytriton``, ``onnxruntime`` and ``numpy``; the server is ``pytriton_peer.py`` beside this
file); without it that peer is reported as not run, never guessed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ballast.argtypes import counts, names
from ballast.bench.paired import PairedChange, paired_change
from ballast.bench.procstat import cpu_ticks, cpu_us_per_request

if TYPE_CHECKING:
    from ballast.gateway_process import GatewayProcess

__all__ = ["Row", "SplitCost", "main", "parse_wrk", "predict_body"]

CONCURRENCY = (1, 16, 64, 64)
HIDDEN = (256, 256)
N_FEATURES = 30


@dataclass
class Row:
    server: str
    concurrency: int
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int = 0
    seconds: float = 0.0
    client_cpu: float = 0.0  # cores the load generator used


@dataclass
class SplitCost:
    """The 90/10 split against one version at one concurrency, in paired alternating rounds:
    per-round percent changes of req/s and of the gateway's CPU per request (all processes)."""

    workers: int
    concurrency: int
    rounds: int  # pairs compared: a round with failed requests (either side) is left out
    seconds: float
    rps_change: PairedChange | None  # None: no round without failures
    cpu_change: PairedChange | None


def predict_body() -> bytes:
    """The batch-1 JSON predict body every gateway measurement sends."""
    return json.dumps({"instances": [[round(0.01 * i, 3) for i in range(N_FEATURES)]]}).encode()


# wrk prints times with the unit it picks (units.c): us/ms/s below a second, and from 0.85 of
# the next unit up, m and h (a 55 s run reads "0.92m").
_TIME_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if m is None:
        raise ValueError(f"unreadable wrk time {text!r}")
    return float(m.group(1)) * _TIME_MS[m.group(2)]


def _positive_int(text: str) -> int:
    # wrk's -d takes whole seconds: "-d2.5s" makes it print its usage and exit.
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be a whole number of seconds, at least 1")
    return value


def parse_wrk(out: str) -> tuple[int, float, float, float, int]:
    """(requests, seconds, p50 ms, p99 ms, non-2xx) from ``wrk --latency`` output."""
    total = re.search(r"(\d+) requests in ([\d.]+(?:us|ms|s|m|h)),", out)
    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M)
    if not (total and p50 and p99):
        raise ValueError(f"could not parse wrk output:\n{out}")
    seconds = _ms(total.group(2)) / 1e3
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    failures = int(bad.group(1)) if bad else 0
    if errors:
        failures += sum(int(g) for g in errors.groups())
    return int(total.group(1)), seconds, _ms(p50.group(1)), _ms(p99.group(1)), failures


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wrk(url: str, script: Path, concurrency: int, seconds: float, server: str) -> Row:
    if seconds < 1 or seconds != int(seconds):
        raise ValueError(f"wrk runs whole seconds (at least 1), not {seconds:g}")
    wrk = shutil.which("wrk")
    if wrk is None:
        raise SystemExit("wrk not found (apt-get install wrk)")
    # One wrk thread drives even 64 connections: measured, two cost the client more CPU
    # (0.38 vs 0.36 cores at ~16k req/s, nearly all of it the kernel's loopback TCP work) for
    # no more load.
    threads = 1
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    cmd = [
        wrk,
        f"-t{threads}",
        f"-c{concurrency}",
        f"-d{int(seconds)}s",
        # wrk's default 2 s counts a slower answer as an error; such an answer belongs in the
        # latency tail (and a machine stall of 2 s failed a test that expects no errors).
        "--timeout",
        "10s",
        "--latency",
        "-s",
        str(script),
        url,
    ]
    out = subprocess.run(
        cmd, capture_output=True, text=True, timeout=seconds + 60, check=False
    ).stdout
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    n, secs, p50, p99, failures = parse_wrk(out)
    return Row(server, concurrency, n / secs if secs else 0.0, p50, p99, failures, secs, cpu / secs)


def _lua(path: Path, body: bytes, content_type: str = "application/json") -> Path:
    (path.parent / f"{path.stem}.body").write_bytes(body)
    path.write_text(
        'wrk.method = "POST"\n'
        f'wrk.headers["Content-Type"] = "{content_type}"\n'
        f'wrk.body = io.open("{path.parent / f"{path.stem}.body"}"):read("a")\n'
    )
    return path


def _measure(
    server: str,
    url: str,
    script: Path,
    seconds: float,
    concurrency: tuple[int, ...],
    progress: Callable[[str], None],
) -> list[Row]:
    progress(f"{server}: warm-up")
    _wrk(url, script, 16, min(3, seconds), server)
    rows = []
    for c in concurrency:
        progress(f"{server}: c={c} for {seconds:g} s")
        rows.append(_wrk(url, script, c, seconds, server))
    return rows


@contextmanager
def _gateway_process(
    workdir: Path, workers: int, extra: list[str]
) -> Iterator[tuple[GatewayProcess, str]]:
    """A gateway on a free port (the process, for its CPU time) and its admin token."""
    from ballast.gateway_process import GatewayProcess
    from ballast.settings import Settings

    s = Settings(
        state_dir=workdir / f"state-{secrets.token_hex(4)}",
        gateway_port=_free_port(),
        gateway_admin_token=secrets.token_urlsafe(16),
    )
    gw = GatewayProcess.start(
        s,
        log_path=workdir / "gateway.log",
        workers=workers,
        extra_args=["--desired-state", "file", *extra],
        exit_with_parent=True,
    )
    try:
        yield gw, s.admin_token()
    finally:
        gw.stop()


def _deploy(
    url: str,
    token: str,
    model: str,
    path: Path,
    canary_weight: int | None,
    canary_path: Path | None = None,
) -> None:
    """Deploy ``path`` as version 1; with ``canary_weight``, ``canary_path`` (default: a copy
    of ``path``) as canary version 2."""
    from ballast.gateway_client import GatewayClient
    from ballast.hashing import sha256_file
    from ballast.serving import Deployment, VersionSpec

    one = VersionSpec(version="1", artifact_path=str(path), sha256=sha256_file(path))
    dep = Deployment(model=model, champion=one)
    if canary_weight is not None:
        if canary_path is None:
            # A second copy of the same file: a second session, loaded and batched
            # separately, as a real canary would be.
            canary_path = path.with_name("canary.onnx")
            shutil.copyfile(path, canary_path)
        two = VersionSpec(
            version="2", artifact_path=str(canary_path), sha256=sha256_file(canary_path)
        )
        dep = Deployment(model=model, champion=one, canary=two, canary_weight=canary_weight)
    with GatewayClient(url, token, timeout=60) as client:
        client.set_deployment(dep)


def _measure_peer(
    name: str,
    cmd: list[str],
    env: dict[str, str],
    log_path: Path,
    ready_url: str,
    infer_url: str,
    body: bytes,
    seconds: float,
    conc: tuple[int, ...],
    progress: Callable[[str], None],
    start_timeout: float = 120.0,
) -> list[Row]:
    """Start a peer server in its own session, wait until ``ready_url`` answers 200, check that
    it accepts ``body`` at ``infer_url``, measure it, and stop it (SIGTERM, then SIGKILL)."""
    import httpx

    log = log_path.open("wb")
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    try:
        deadline = time.monotonic() + start_timeout
        while True:
            try:
                if httpx.get(ready_url, trust_env=False, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start; log {log_path}")
            time.sleep(0.5)
        check = httpx.post(
            infer_url, content=body, headers={"content-type": "application/json"}, trust_env=False
        )
        if check.status_code != 200:
            raise RuntimeError(f"{name} refused the body: {check.text[:300]}")
        script = _lua(log_path.with_suffix(".lua"), body)
        return _measure(name, infer_url, script, seconds, conc, progress)
    finally:
        # SIGTERM lets each peer stop its own children (PyTriton: Triton and its stubs).
        os.killpg(proc.pid, 15)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait(10)
        log.close()


def _mlflow_serve(
    workdir: Path,
    path: Path,
    seconds: float,
    conc: tuple[int, ...],
    progress: Callable[[str], None],
) -> list[Row]:
    from model_registry import save_onnx_as_mlflow_model  # the only mlflow importer

    model_dir = save_onnx_as_mlflow_model(path, workdir / "mlflow-model")
    port = _free_port()
    bindir = Path(sys.executable).parent
    cmd = [str(bindir / "mlflow"), "models", "serve", "-m", str(model_dir)]
    cmd += ["-h", "127.0.0.1", "-p", str(port), "--env-manager", "local"]
    return _measure_peer(
        "mlflow models serve (onnx)",
        cmd,
        # It exits 127 unless the venv's bin is on PATH.
        {**os.environ, "PATH": f"{bindir}:{os.environ.get('PATH', '')}"},
        workdir / "mlflow.log",
        f"http://127.0.0.1:{port}/ping",
        f"http://127.0.0.1:{port}/invocations",
        json.dumps({"inputs": {"input": [[0.1] * N_FEATURES]}}).encode(),
        seconds,
        conc,
        progress,
        start_timeout=90,
    )


def _pytriton_serve(
    python: str,
    workdir: Path,
    path: Path,
    seconds: float,
    conc: tuple[int, ...],
    progress: Callable[[str], None],
) -> list[Row]:
    """PyTriton (a real Triton server, dynamic batching, the same ORT model) under ``python``."""
    base = subprocess.run(
        [python, "-c", "import sys; print(sys.base_prefix)"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout.strip()
    # Its Python backend stub links libpython3.12.so, which pyenv keeps in the base prefix.
    lib = os.pathsep.join(p for p in (f"{base}/lib", os.environ.get("LD_LIBRARY_PATH", "")) if p)
    ports = [_free_port() for _ in range(3)]
    server = Path(__file__).with_name("pytriton_peer.py")
    cmd = [python, str(server), str(path), "--port", str(ports[0])]
    cmd += ["--grpc-port", str(ports[1]), "--metrics-port", str(ports[2])]
    url = f"http://127.0.0.1:{ports[0]}/v2/models/mlp"
    row = [round(0.01 * i, 3) for i in range(N_FEATURES)]
    tensor = {"name": "input", "shape": [1, N_FEATURES], "datatype": "FP32", "data": row}
    return _measure_peer(
        "PyTriton (Triton, dynamic batching, ORT)",
        cmd,
        {**os.environ, "LD_LIBRARY_PATH": lib},
        workdir / "pytriton.log",
        f"{url}/ready",
        f"{url}/infer",
        json.dumps({"inputs": [tensor]}).encode(),
        seconds,
        conc,
        progress,
    )


def _ceiling(path: Path, seconds: float) -> list[Row]:
    from ballast.runtime import load_predictor

    predictor = load_predictor(path, "onnxruntime", intra_op_threads=1)
    rows = []
    for batch in (1, 64):
        x = (
            __import__("numpy")
            .random.default_rng(0)
            .standard_normal((batch, N_FEATURES))
            .astype("float32")
        )
        for _ in range(200):
            predictor.predict(x)
        # Every call timed on its own: p50 and p99 are percentiles of calls, and the rate
        # counts the calls' time alone (the ceiling: no loop or clock reads in it).
        calls: list[int] = []
        started = time.perf_counter()
        while time.perf_counter() - started < min(seconds, 5.0):
            for _ in range(100):
                t = time.perf_counter_ns()
                predictor.predict(x)
                calls.append(time.perf_counter_ns() - t)
        busy_s = sum(calls) / 1e9
        ordered = sorted(calls)
        rows.append(
            Row(
                f"ORT in-process, batch {batch} (samples/s)",
                0,
                len(calls) * batch / busy_s,
                ordered[len(ordered) // 2] / 1e6,
                ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] / 1e6,
                0,
                busy_s,
            )
        )
    return rows


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ballast bench serving",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--seconds", type=_positive_int, default=20, help="per measurement (default 20)")
    p.add_argument(
        "--concurrency",
        type=counts(),
        default=[1, 16, 64, 64],
        help="wrk connections per run, comma-separated",
    )
    p.add_argument(
        "--workers", type=counts(), default=[1], help="gateway replica counts to try, e.g. 1,2"
    )
    p.add_argument(
        "--peers", type=names("mlflow", "pytriton"), default=[], help="comma list: mlflow, pytriton"
    )
    p.add_argument("--pytriton-python", default="", help="a Python 3.12 with nvidia-pytriton")
    p.add_argument("--skip-split", action="store_true", help="only the one-version gateway")
    p.add_argument(
        "--split-rounds",
        type=int,
        default=20,
        help="alternating c=64 rounds that measure the split's cost against one version "
        "(default 20; 0: none). On the 2-core VM 20 pairs give a 95%% interval about 8 points "
        "wide, 100 about 4",
    )
    p.add_argument("--split-seconds", type=_positive_int, default=3, help="per round (default 3)")
    p.add_argument("--gateway-args", default="", help="extra args for python -m infra.gateway")
    p.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    return p


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console
    from rich.table import Table

    from ballast.bench.onnx_mlp import build_mlp_onnx

    args = _parser().parse_args(argv)
    conc = tuple(args.concurrency)
    peers = set(args.peers)
    console = Console(stderr=args.json)
    notes: list[str] = []
    rows: list[Row] = []
    costs: list[SplitCost] = []
    split_errors = 0
    body = predict_body()
    with tempfile.TemporaryDirectory(prefix="ballast-bench-serving-") as tmp:
        workdir = Path(tmp)
        path = build_mlp_onnx(workdir / "model.onnx", seed=0, hidden=HIDDEN)
        script = _lua(workdir / "predict.lua", body)
        with console.status("measuring") as status:
            for workers in args.workers:
                setups = [("gateway, 1 version", False)]
                if not args.skip_split:
                    setups.append(("gateway, 90/10 split + metrics", True))
                # Both gateways run for the whole comparison (the one not being loaded idles):
                # the split's cost is measured in rounds that alternate between them.
                with ExitStack() as gateways:
                    started: list[tuple[str, str, int]] = []
                    for label, split in setups:
                        name = f"{label}, {workers} worker{'s' if workers > 1 else ''}"
                        gw, token = gateways.enter_context(
                            _gateway_process(workdir, workers, args.gateway_args.split())
                        )
                        _deploy(gw.url, token, "m", path, 10 if split else None)
                        started.append((name, f"{gw.url}/v1/models/m/predict", gw.pid))
                    for name, url, _ in started:
                        rows += _measure(name, url, script, args.seconds, conc, status.update)
                    if len(started) == 2 and args.split_rounds > 0:
                        cost, errors = _split_cost(
                            workers,
                            started[0],
                            started[1],
                            script,
                            args.split_rounds,
                            args.split_seconds,
                            status.update,
                        )
                        costs.append(cost)
                        split_errors += errors
            if "mlflow" in peers:
                try:
                    rows += _mlflow_serve(workdir, path, args.seconds, conc, status.update)
                except Exception as exc:  # a peer that cannot run is reported, not faked
                    notes.append(f"mlflow models serve not measured: {type(exc).__name__}: {exc}")
            if args.pytriton_python:
                try:
                    rows += _pytriton_serve(
                        args.pytriton_python, workdir, path, args.seconds, conc, status.update
                    )
                except Exception as exc:  # a peer that cannot run is reported, not faked
                    notes.append(f"PyTriton not measured: {type(exc).__name__}: {exc}")
            elif "pytriton" in peers:
                notes.append(
                    "PyTriton not measured: pass --pytriton-python, a Python 3.12 venv with "
                    "nvidia-pytriton, onnxruntime and numpy (this benchmark does not install one)"
                )
            status.update("ORT in-process ceiling")
            ceiling = _ceiling(path, args.seconds)
    table = Table(title="batch-1 JSON predict, wrk closed loop, 30->256->256->2 MLP")
    for col in ("server", "c", "req/s", "p50 ms", "p99 ms", "errors", "wrk cores"):
        table.add_column(col, justify="left" if col == "server" else "right")
    for r in rows + ceiling:
        table.add_row(
            r.server,
            str(r.concurrency or "-"),
            f"{r.rps:,.0f}",
            f"{r.p50_ms:.3f}",
            f"{r.p99_ms:.3f}",
            str(r.errors),
            f"{r.client_cpu:.2f}" if r.concurrency else "-",
        )
    console.print(table)
    for note in notes:
        console.print(f"[yellow]{note}[/]")
    best_c64 = max(
        (r.rps for r in rows if r.concurrency == 64 and "gateway" in r.server), default=0.0
    )
    if best_c64 and ceiling:
        console.print(
            f"best gateway c=64: {best_c64:,.0f} req/s = {best_c64 / ceiling[0].rps:.1%} of ORT's in-process batch-1 calls/s"
        )
    for c in costs:
        if c.rps_change is None or c.cpu_change is None:
            console.print("[red]split's cost not measured: every round had failed requests[/]")
            continue
        console.print(
            f"split's cost at c={c.concurrency}, {c.workers} worker(s), {c.rounds} alternating "
            f"rounds of {c.seconds:g} s: req/s {c.rps_change.text()}; "
            f"CPU/request {c.cpu_change.text()}"
        )
    if args.json:
        print(
            json.dumps(
                {
                    "rows": [asdict(r) for r in rows + ceiling],
                    "split_cost": [asdict(c) for c in costs],
                    "notes": notes,
                }
            )
        )
    failed = split_errors or any(r.errors for r in rows if "gateway" in r.server)
    return 1 if failed else 0


def _split_cost(
    workers: int,
    one: tuple[str, str, int],
    split: tuple[str, str, int],
    script: Path,
    rounds: int,
    seconds: float,
    progress: Callable[[str], None],
) -> tuple[SplitCost, int]:
    """Alternate c=64 rounds between the one-version gateway and the split (every other round
    the split first), each round compared with its neighbour: a round alone moves by +-10 % with
    the machine, a few percent of cost shows only in the median of many pairs. Returns the
    comparison and the requests that failed."""
    concurrency = 64
    rps: tuple[list[float], list[float]] = ([], [])
    cpu: tuple[list[float], list[float]] = ([], [])
    errors = 0
    for r in range(rounds):
        measured: list[tuple[float, float]] = [(0.0, 0.0), (0.0, 0.0)]
        failed = False
        for i in (0, 1) if r % 2 == 0 else (1, 0):
            name, url, pid = (one, split)[i]
            progress(f"split's cost: round {r + 1}/{rounds}, {name}")
            before = cpu_ticks([pid])
            row = _wrk(url, script, concurrency, seconds, name)
            # A replica that died meanwhile takes its ticks with it: the difference can shrink.
            ticks = cpu_ticks([pid]) - before
            errors += row.errors
            failed |= row.errors > 0 or row.rps <= 0 or ticks <= 0
            measured[i] = (row.rps, cpu_us_per_request(ticks, row.rps * row.seconds))
        if not failed:
            for i in (0, 1):
                rps[i].append(measured[i][0])
                cpu[i].append(measured[i][1])
    cost = SplitCost(
        workers=workers,
        concurrency=concurrency,
        rounds=len(rps[0]),
        seconds=seconds,
        rps_change=paired_change(rps[1], rps[0]) if rps[0] else None,
        cpu_change=paired_change(cpu[1], cpu[0]) if cpu[0] else None,
    )
    return cost, errors


if __name__ == "__main__":
    raise SystemExit(main())
