"""``GET /admin/failures``: a pod's fault report from its replicas' failure files.

Two gateway apps (TestClient, the real app and ONNX Runtime) share one failure folder as the
replicas of one pod do; their reports are read back through the route and merged as the
watchdog merges pods' answers (``ballast.localise.merge_reports``).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from ballast.localise import FaultReport, localise, merge_reports
from infra.gateway.faillog import FailureFiles, _Lines
from infra.gateway.testing import build_mlp_onnx
from tests.child import run_python
from tests.unit.test_gateway_app import (
    AUTH,
    MODEL,
    PREDICT,
    ROW,
    champion_only,
    deploy,
    make_client,
)

ROUTE = "/admin/failures"


def since(minutes: float = 5) -> str:
    return (datetime.now(UTC) - timedelta(minutes=minutes)).isoformat().replace("+00:00", "Z")


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("artefacts")
    return {
        "a": build_mlp_onnx(root / "a.onnx", seed=1),
        "b": build_mlp_onnx(root / "b.onnx", seed=2),
    }


@pytest.fixture
def pod(tmp_path: Path, artefacts: dict[str, Path]) -> Iterator[tuple[TestClient, TestClient]]:
    """Two replicas of one pod: every request to version 1 fails (an injected fault)."""
    folder = tmp_path / "failures"
    a, _ = make_client(failure_dir=folder, replica_id="pod-r1", fault_error_rate=1.0)
    b, _ = make_client(failure_dir=folder, replica_id="pod-r2", fault_error_rate=1.0)
    with a, b:
        for client in (a, b):
            deploy(client, champion_only(artefacts, fault="errors"))
        yield a, b


def report(client: TestClient, **params: str) -> FaultReport:
    query = {"model": MODEL, "version": "1", "since": since(), **params}
    resp = client.get(ROUTE, params=query, headers=AUTH)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["pod"] and body["replica"] in {"pod-r1", "pod-r2"}
    return FaultReport.from_dict(body)


def fail(client: TestClient, n: int) -> None:
    for _ in range(n):
        assert client.post(PREDICT, json={"instances": [ROW]}).status_code == 500


def test_any_replica_reports_every_replicas_failures_of_the_version(
    pod: tuple[TestClient, TestClient],
) -> None:
    a, b = pod
    fail(a, 3)
    fail(b, 5)
    # Refused before routing (no version): not kept, it cannot be localised to a version.
    assert a.post("/v1/models/nope/predict", json={"instances": [ROW]}).status_code == 404
    for client in (a, b):
        got = report(client)
        assert got.failures == got.logged == 8
        assert {r.replica: r.failures for r in got.replicas} == {"pod-r2": 5, "pod-r1": 3}
        assert got.reasons == {"injected_fault": 8} and got.statuses == {500: 8}
        assert len(got.first_request_ids) == len(got.first_request_times) == 8
        assert got.context and '"request.failed"' in got.context[0]
        assert len(got.files) == 2
    # Another version, a window before the failures, only 4xx: nothing.
    assert report(a, version="2").failures == 0
    assert report(a, since=since(60), until=since(30)).failures == 0
    assert report(a, min_status="501").failures == 0
    # Context: the file of the first failure (pod-r1's 3 lines), up to the count asked for.
    assert len(report(a).context) == 3 and len(report(a, context="2").context) == 2


def test_reports_of_several_pods_merge_into_one(pod: tuple[TestClient, TestClient]) -> None:
    a, b = pod
    fail(a, 2)
    first = report(a)
    time.sleep(0.01)  # the next failures' times lie strictly after the first report's
    fail(b, 4)
    # As if a second pod had answered with only b's later failures.
    after = first.first_request_times[-1] + timedelta(milliseconds=1)
    later = report(b, since=after.isoformat().replace("+00:00", "Z"))
    assert later.failures == 4
    merged = merge_reports([("pod-1", first), ("pod-2", later)], metric="error_rate")
    assert merged.failures == 6 and merged.logged == 6
    # Replicas named by pod: the supervisor's worker names alone need not say which pod.
    assert {r.replica: r.failures for r in merged.replicas} == {
        "pod-2/pod-r2": 4,
        "pod-1/pod-r1": 2,
    }
    assert merged.first_failure == first.first_failure
    assert merged.context_source is not None and merged.context_source.startswith("pod-1: ")
    assert list(merged.first_request_times) == sorted(merged.first_request_times)
    assert merged.metric == "error_rate"
    assert all(f.startswith(("pod-1: ", "pod-2: ")) for f in merged.files)


def test_two_reads_at_once_wait_for_each_other_then_answer_429(
    tmp_path: Path, artefacts: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import infra.gateway.app as app_module

    real = app_module._read_failures

    def slow(*args: Any) -> dict[str, Any]:
        time.sleep(0.6)
        return real(*args)

    monkeypatch.setattr(app_module, "_read_failures", slow)
    client, _ = make_client(failure_dir=tmp_path / "f", failure_read_wait_s=0.2)
    params = {"model": MODEL, "version": "1", "since": since()}
    with client, ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda _: client.get(ROUTE, params=params, headers=AUTH), range(2)))
    codes = sorted(r.status_code for r in answers)
    assert codes == [200, 429], [r.text for r in answers]
    busy = next(r for r in answers if r.status_code == 429)
    assert busy.headers["Retry-After"] == "1" and "try again" in busy.json()["error"]


@pytest.mark.parametrize(
    ("params", "status", "message"),
    [
        ({"version": "1", "since": "now"}, 400, "model and version are required"),
        ({"model": MODEL, "version": "1"}, 400, "since is required"),
        ({"model": MODEL, "version": "1", "since": "yesterday"}, 400, "not an ISO 8601 time"),
        # A '+' sent unencoded arrives as a space: the message says what to write instead.
        (
            {"model": MODEL, "version": "1", "since": "2026-11-29T10:00:00 00:00"},
            400,
            "%2B",
        ),
        (
            {
                "model": MODEL,
                "version": "1",
                "since": "2026-11-29T10:00:00Z",
                "until": "2026-11-29",
            },
            400,
            "until is before since",
        ),
        (
            {"model": MODEL, "version": "1", "since": "2026-11-29", "min_status": "99"},
            400,
            "100..599",
        ),
        ({"model": MODEL, "version": "1", "since": "2026-11-29", "context": "-1"}, 400, "integers"),
        (
            {"model": MODEL, "version": "1", "since": "2026-11-29", "lines": "5"},
            400,
            "each at most once",
        ),
        ({"model": MODEL, "version": "x" * 257, "since": "2026-11-29"}, 400, "1 to 256"),
    ],
)
def test_malformed_queries_are_400_with_the_reason(
    pod: tuple[TestClient, TestClient], params: dict[str, str], status: int, message: str
) -> None:
    resp = pod[0].get(ROUTE, params=params, headers=AUTH)
    assert resp.status_code == status and message in resp.json()["error"], resp.text


def test_a_gateway_without_a_failure_folder_says_so(artefacts: dict[str, Path]) -> None:
    client, _ = make_client()
    with client:
        resp = client.get(
            ROUTE, params={"model": MODEL, "version": "1", "since": since()}, headers=AUTH
        )
    assert resp.status_code == 409 and "no failure files" in resp.json()["error"]


def line(version: str | None, i: int) -> dict[str, object]:
    return {
        "ts": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "event": "request.failed",
        "request_id": f"id-{i}",
        "model": MODEL,
        "version": version,
        "role": "champion",
        "replica": "r",
        "route": "predict",
        "status": 500,
        "reason": "model_error",
        "error": "x" * 200,
    }


def test_files_rotate_once_and_stay_bounded(tmp_path: Path) -> None:
    files = FailureFiles(tmp_path / "f", "host/1", max_bytes=4096)
    files.sweep()
    for i in range(200):  # ~400 bytes each: rotates many times
        files.write(line("1", i))
    files.close()
    paths = files.paths()
    assert [p.name for p in paths] == ["host_1.jsonl", "host_1.jsonl.1"]
    assert all(p.stat().st_size <= 4096 for p in paths)
    # The newest lines are kept, whole: every one parses.
    ids = [json.loads(raw)["request_id"] for p in paths for raw in p.read_text().splitlines()]
    assert "id-199" in ids and "id-0" not in ids
    got = localise(paths, MODEL, "1", datetime.now(UTC) - timedelta(minutes=1))
    assert got.failures == len(ids)


def test_unrouted_lines_are_not_kept_and_a_removed_file_is_reopened(tmp_path: Path) -> None:
    files = FailureFiles(tmp_path / "f", "r1")
    files.sweep()
    files.write(line(None, 0))
    assert files.paths() == []  # nothing routed: no file at all
    files.write(line("1", 1))
    assert files.drain(5.0)
    files.path.unlink()  # an operator's clean-up, or a peer's sweep
    files.write(line("1", 2))
    files.close()
    kept = [json.loads(raw)["request_id"] for raw in files.path.read_text().splitlines()]
    assert kept == ["id-2"]


def test_sweep_removes_only_files_untouched_for_keep_s(tmp_path: Path) -> None:
    folder = tmp_path / "f"
    files = FailureFiles(folder, "live", keep_s=3600)
    files.sweep()
    old, fresh = folder / "gone-1.jsonl", folder / "gone-2.jsonl.1"
    for p in (old, fresh):
        p.write_text("{}\n")
    (folder / "notes.txt").write_text("not ours")
    hours_ago = time.time() - 2 * 3600
    os.utime(old, (hours_ago, hours_ago))
    assert files.sweep() == 1
    assert sorted(p.name for p in folder.iterdir()) == ["gone-2.jsonl.1", "notes.txt"]
    with pytest.raises(ValueError, match="max_bytes"):
        FailureFiles(folder, "r", max_bytes=10)


def test_sweep_keeps_at_most_max_files_and_never_its_own(tmp_path: Path) -> None:
    folder = tmp_path / "f"
    files = FailureFiles(folder, "live", max_files=3)
    files.sweep()
    files.write(line("1", 0))
    assert files.drain(5.0)
    now = time.time()
    for i in range(5):  # replicas restarted in a loop, each with a new name
        p = folder / f"gone-{i}.jsonl"
        p.write_text("{}\n")
        os.utime(p, (now - 100 + i, now - 100 + i))
    os.utime(files.path, (now - 1000, now - 1000))  # its own file, the oldest of all
    assert files.sweep() == 3
    assert sorted(p.name for p in files.paths()) == ["gone-3.jsonl", "gone-4.jsonl", "live.jsonl"]
    files.close()


def test_replicas_sharing_a_folder_share_its_id(tmp_path: Path) -> None:
    one, two = (FailureFiles(tmp_path / "f", r) for r in ("r1", "r2"))
    one.sweep()
    other = FailureFiles(tmp_path / "g", "r3")
    other.sweep()
    assert one.folder_id() == two.folder_id() != other.folder_id()
    assert len(one.folder_id()) == 32
    assert sorted(p.name for p in (tmp_path / "f").iterdir()) == [".folder-id"]


def test_a_folder_that_cannot_be_made_leaves_serving_and_the_route_working(
    tmp_path: Path, artefacts: dict[str, Path]
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file where the folder should be")
    client, _ = make_client(failure_dir=blocker / "failures", fault_error_rate=1.0)
    with client:
        deploy(client, champion_only(artefacts, fault="errors"))
        fail(client, 2)  # answered 500 as usual: the failure file cannot be written
        resp = client.get(
            ROUTE, params={"model": MODEL, "version": "1", "since": since()}, headers=AUTH
        )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["failures"] == 0 and body["files"] == []
    assert body["folder"].endswith(str(blocker / "failures"))
    # and it says that lines were lost, so no one reads "no failure" as a healthy version.
    (lost,) = body["unreadable"]
    assert "2 failure line(s) of replica" in lost and "could not be written" in lost


@contextmanager
def stalled(path: Path, release: Callable[[], None]) -> Iterator[None]:
    """``path`` as a FIFO nobody reads: opening it for writing blocks, as a stalled disk would
    block a write. On the way out a reader lets the stuck writer go on, and ``release`` (the
    files' ``close``) ends it while the pipe is read dry."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)
    try:
        yield
    finally:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        try:
            closer = threading.Thread(target=release)
            closer.start()
            deadline = time.monotonic() + 10
            while closer.is_alive() and time.monotonic() < deadline:
                try:
                    if not os.read(fd, 1 << 16):
                        time.sleep(0.01)
                except BlockingIOError:
                    time.sleep(0.01)
            closer.join(1.0)
            assert not closer.is_alive(), "the writer did not finish once the stall ended"
        finally:
            os.close(fd)


def test_a_stalled_disk_never_blocks_the_writer_and_a_full_queue_is_counted_lost(
    tmp_path: Path,
) -> None:
    files = FailureFiles(tmp_path / "f", "r1", queue_lines=10)
    files.sweep()
    with stalled(files.path, lambda: files.close(timeout_s=5.0)):
        # On the serving loop before: one stalled write held every request of the replica.
        writes = threading.Thread(target=lambda: [files.write(line("1", i)) for i in range(50)])
        writes.start()
        writes.join(5.0)
        assert not writes.is_alive(), "write() blocked on the stalled file"
        assert not files.drain(0.05)
        # One line is held by the stuck writer, ten wait in the queue, the rest are dropped.
        assert files.queued in (10, 11) and files.dropped == 50 - files.queued
        assert files.lost == files.dropped and files.waiting == files.queued
        started = time.monotonic()
        files.close(timeout_s=0.2)  # gives up on the stuck writer instead of hanging
        assert time.monotonic() - started < 3.0


@contextmanager
def slow_disk(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """Every failure-file write waits until the event is set: a stand-in for a slow disk (a
    FIFO cannot serve here: the route's own non-blocking open counts as its reader)."""
    go = threading.Event()
    real = _Lines.write

    def write(self: _Lines, line: bytes) -> None:
        go.wait(10.0)
        real(self, line)

    monkeypatch.setattr(_Lines, "write", write)
    try:
        yield go
    finally:
        go.set()


@contextmanager
def failing_slowly(
    tmp_path: Path, artefacts: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[TestClient, FailureFiles, threading.Event]]:
    """A replica whose version 1 has just failed 3 requests, their lines held up by a slow
    disk until the event is set."""
    client, _ = make_client(
        failure_dir=tmp_path / "failures", replica_id="pod-r1", fault_error_rate=1.0
    )
    files = client.app.gateway.failure_files  # type: ignore[attr-defined]
    with slow_disk(monkeypatch) as go, client:
        deploy(client, champion_only(artefacts, fault="errors"))
        fail(client, 3)
        yield client, files, go


def test_the_route_waits_for_lines_still_being_written(
    tmp_path: Path, artefacts: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A wait longer than the product's 1 s, so a stalled CI machine cannot fail this test:
    # what it checks is that the route waits at all.
    monkeypatch.setattr("infra.gateway.app.FAILURE_DRAIN_S", 30.0)
    with failing_slowly(tmp_path, artefacts, monkeypatch) as (client, _, go):
        threading.Timer(0.3, go.set).start()  # the disk answers while the route waits
        got = report(client)
    assert got.failures == 3, "the report holds the failures the caller has just seen"


def test_the_route_says_when_lines_still_wait_behind_a_slow_disk(
    tmp_path: Path, artefacts: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    with failing_slowly(tmp_path, artefacts, monkeypatch) as (client, files, go):
        resp = client.get(
            ROUTE, params={"model": MODEL, "version": "1", "since": since()}, headers=AUTH
        )
        go.set()
        assert resp.status_code == 200, resp.text
        unreadable = resp.json()["unreadable"]
        assert any(
            "3 failure line(s) of replica pod-r1 were still waiting" in u for u in unreadable
        ), unreadable
        assert files.drain(5.0) and files.lost == 0, "written once the disk answers again"


def test_a_full_disk_loses_lines_counted_and_the_writer_recovers(tmp_path: Path) -> None:
    files = FailureFiles(tmp_path / "f", "r1")
    files.sweep()
    files.path.symlink_to("/dev/full")  # every write: ENOSPC, as on a full disk
    for i in range(3):
        files.write(line("1", i))
    assert files.drain(5.0)
    assert files.lost == 3 and files.dropped == 0
    # The operator frees the space by removing the file: the same writer goes on with a new one
    # (before, the writer thread died here and every later line waited for ever).
    files.path.unlink()
    files.write(line("1", 3))
    assert files.drain(5.0) and files.lost == 3
    files.close()
    assert [json.loads(raw)["request_id"] for raw in files.path.read_text().splitlines()] == [
        "id-3"
    ]


def test_a_writer_given_up_on_is_replaced_and_old_stop_markers_are_ignored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = FailureFiles(tmp_path / "f", "r1")
    files.sweep()
    with slow_disk(monkeypatch) as go:
        files.write(line("1", 0))
        files.close(timeout_s=0.05)  # gives up on the stuck writer
        files.close(timeout_s=0.05)  # and again: two stop markers queued
        files.write(line("1", 1))  # queued behind both markers, the writer still stuck
        go.set()
        assert files.drain(5.0), "the writer stopped at an old marker and stranded the line"
        files.write(line("1", 2))
        assert files.drain(5.0)
        files.close()
    assert [json.loads(raw)["request_id"] for raw in files.path.read_text().splitlines()] == [
        "id-0",
        "id-1",
        "id-2",
    ]


def test_a_process_whose_writer_is_stuck_still_exits(tmp_path: Path) -> None:
    # logging.shutdown() at exit took the (logging-handler) writer's lock, which a writer stuck
    # on a stalled disk held: the process never exited.
    fifo = tmp_path / "f" / "r1.jsonl"
    fifo.parent.mkdir()
    os.mkfifo(fifo)  # opening it for writing blocks: a stalled disk
    code = (
        "import time\n"
        "from pathlib import Path\n"
        "from infra.gateway.faillog import FailureFiles\n"
        f"files = FailureFiles(Path({str(fifo.parent)!r}), 'r1')\n"
        "files.write({'version': '1', 'request_id': 'x'})\n"
        "time.sleep(0.2)\n"
        "files.close(timeout_s=0.2)\n"
    )
    done = run_python(code, timeout=30)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "failure_file.close_timeout" in done.stderr


def test_a_line_cut_short_by_a_filling_disk_does_not_swallow_the_next(tmp_path: Path) -> None:
    # In a child: a file-size limit makes a write short (part of a line), then fail, as a
    # disk filling up does. Before, the next line was appended to the cut one and both were
    # lost to readers.
    code = (
        "import resource, signal, json\n"
        "from pathlib import Path\n"
        "from infra.gateway.faillog import FailureFiles\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        f"files = FailureFiles(Path({str(tmp_path / 'f')!r}), 'r1')\n"
        "files.sweep()\n"
        "line = lambda i: {'version': '1', 'request_id': f'id-{i}', 'pad': 'x' * 150}\n"
        "files.write(line(0)); assert files.drain(5)\n"
        "size = files.path.stat().st_size\n"
        "hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (size + 40, hard))\n"
        "files.write(line(1)); assert files.drain(5)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))\n"
        "files.write(line(2)); assert files.drain(5)\n"
        "files.close()\n"
        "print(json.dumps({'lost': files.lost}))\n"
    )
    done = run_python(code, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"lost": 1}
    raw = (tmp_path / "f" / "r1.jsonl").read_text().splitlines()
    assert len(raw) == 3 and raw[1].startswith('{"version": "1", "request_id": "id-1"')
    assert [json.loads(raw[i])["request_id"] for i in (0, 2)] == ["id-0", "id-2"]


def test_a_rotation_that_cannot_keep_the_old_file_starts_the_file_again(tmp_path: Path) -> None:
    files = FailureFiles(tmp_path / "f", "r1", max_bytes=1024)
    files.sweep()
    files.path.with_name("r1.jsonl.1").mkdir()  # os.replace onto a folder fails
    for i in range(20):
        files.write(line("1", i))
    assert files.drain(5.0)
    files.close()
    assert files.lost == 0, "every line after the failed rotation was lost before"
    ids = [json.loads(raw)["request_id"] for raw in files.path.read_text().splitlines()]
    assert ids[-1] == "id-19" and files.path.stat().st_size <= 1024
