"""The pure parts of data-parallel training (world size, torchrun argv, topology) and the
launcher's failure handling on stand-in commands (no torch, a second or two each)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from ballast.datasets_extra import bundled_dataset
from ballast.distributed import (
    Topology,
    _launch_relaunching,
    backend_for,
    crashed_in_teardown,
    launch,
    merged_model_params,
    relaunchable,
    resolve_world_size,
    root_cause_signal,
    run_dir_for,
    stop_all,
    threads_per_process,
    torchrun_argv,
    train_data_parallel,
    worker_pids,
)
from ballast.errors import ConfigError, DistributedTrainingError, TrainingError
from ballast.settings import Settings

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("setting", "device", "gpus", "expected"),
    [
        ("auto", "cpu", 0, 1),
        ("auto", "cpu", 4, 1),  # CPU training never counts GPUs
        ("auto", "auto", 0, 1),
        ("auto", "auto", 8, 8),
        ("auto", "cuda", 2, 2),
        ("1", "auto", 0, 1),
        ("2", "cpu", 0, 2),
        (3, "cpu", 0, 3),
        (" AUTO ", "auto", 2, 2),
        ("2", "cuda", 4, 2),
    ],
)
def test_world_size_is_one_per_visible_gpu_on_auto_and_as_given_otherwise(
    setting: str | int, device: str, gpus: int, expected: int
) -> None:
    assert resolve_world_size(setting, device=device, visible_gpus=gpus) == expected


@pytest.mark.parametrize(
    ("setting", "device", "gpus", "match"),
    [
        ("0", "cpu", 0, "positive integer"),
        ("-2", "cpu", 0, "positive integer"),
        ("two", "cpu", 0, "positive integer"),
        ("²", "cpu", 0, "positive integer"),
        ("٣", "cpu", 0, "positive integer"),
        ("3", "cuda", 2, "3 CUDA processes per node need 3 GPUs; 2 visible"),
        ("auto", "cuda", 0, "no CUDA device"),
        ("1", "tpu", 0, "device must be"),
    ],
)
def test_world_size_refuses_what_cannot_run(
    setting: str, device: str, gpus: int, match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        resolve_world_size(setting, device=device, visible_gpus=gpus)


def test_one_node_runs_a_standalone_rendezvous_without_restarts() -> None:
    argv = torchrun_argv(Topology(2), ["--spec", "/r/job.json"], python="/py")
    assert argv == [
        "/py",
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        "--max-restarts=0",
        "-m",
        "ballast.ddp_worker",
        "--spec",
        "/r/job.json",
    ]


def test_several_nodes_pass_nnodes_and_the_rendezvous_through() -> None:
    topo = Topology(4, nnodes=3, rdzv_endpoint="train-0.train:29400", rdzv_id="release-42")
    argv = torchrun_argv(topo, ["--spec", "s.json"], python="py")
    assert topo.world_size == 12 and topo.distributed
    assert "--standalone" not in argv
    head = argv[: argv.index("-m", 3)]
    assert head == [
        "py",
        "-m",
        "torch.distributed.run",
        "--nnodes=3",
        "--rdzv-backend=c10d",
        "--rdzv-endpoint=train-0.train:29400",
        "--rdzv-id=release-42",
        "--nproc-per-node=4",
        "--max-restarts=0",
    ]
    assert argv[-3:] == ["ballast.ddp_worker", "--spec", "s.json"]


def test_topology_needs_a_rendezvous_for_several_nodes_and_one_process_is_not_distributed() -> None:
    with pytest.raises(ConfigError, match="rendezvous endpoint"):
        Topology(1, nnodes=2)
    with pytest.raises(ConfigError, match="rendezvous endpoint"):
        Topology(1, nnodes=2, rdzv_endpoint="h:1")  # no job id
    with pytest.raises(ConfigError, match=">= 1"):
        Topology(0)
    assert not Topology(1).distributed
    assert Topology(2).distributed
    assert Topology(1, nnodes=2, rdzv_endpoint="h:1", rdzv_id="j").distributed


def test_the_rendezvous_id_names_the_shared_launch_folder_so_it_must_be_a_plain_name(
    tmp_path: Path,
) -> None:
    for bad in ("../etc", "a/b", "", "-x", "x" * 64):
        with pytest.raises(ConfigError, match="rendezvous"):
            Topology(1, nnodes=2, rdzv_endpoint="h:1", rdzv_id=bad)
    assert run_dir_for(tmp_path, "release-7") == tmp_path.resolve() / "ddp-release-7"


def _one_epoch(
    topology: Topology, work_dir: Path, timeout_s: float = 3600.0, device: str = "cpu"
) -> object:
    """One epoch of the bundled MLP, data-parallel on ``topology`` (refused before a launch in
    the tests that call it)."""
    return train_data_parallel(
        bundled_dataset("breast-cancer"),
        topology=topology,
        work_dir=work_dir,
        epochs=1,
        learning_rate=1e-3,
        batch_size=64,
        seed=0,
        model="tabular-mlp",
        timeout_s=timeout_s,
        device=device,
    )


def test_a_multi_node_launch_refuses_a_rendezvous_id_already_in_use(tmp_path: Path) -> None:

    topo = Topology(1, nnodes=2, rdzv_endpoint="127.0.0.1:1", rdzv_id="busy")
    run_dir_for(tmp_path, "busy").mkdir()
    with pytest.raises(ConfigError, match="in use by another launch"):
        _one_epoch(topo, tmp_path)
    assert run_dir_for(tmp_path, "busy").is_dir(), "the other launch's folder is left alone"


def test_backend_threads_and_model_params_follow_trains_rules() -> None:
    assert backend_for("cuda") == "nccl" and backend_for("cpu") == "gloo"
    assert threads_per_process(2, 2) == 1
    assert threads_per_process(2, 16) == 8
    assert threads_per_process(4, 2) == 1  # never zero
    assert threads_per_process(1, None) == 1
    assert merged_model_params(32, None) == {"hidden": 32}
    assert merged_model_params(32, {"hidden": 8, "layers": 3}) == {"hidden": 8, "layers": 3}
    assert merged_model_params(None, None) == {}


def test_settings_keep_single_process_training_by_default_and_validate_the_world_size() -> None:
    s = Settings()
    assert s.train_world_size == "1" and s.train_nnodes == 1
    assert Settings(train_world_size=" Auto ").train_world_size == "auto"
    for bad in ("0", "x", "-1", "1.5"):
        with pytest.raises(ValidationError, match="train_world_size"):
            Settings(train_world_size=bad)


@pytest.mark.parametrize("bad", [float("inf"), float("nan"), 0.0, 8 * 86400.0])
def test_settings_refuse_a_train_timeout_that_is_not_a_finite_positive_week_or_less(
    bad: float,
) -> None:
    with pytest.raises(ValidationError, match="train_timeout_s"):
        Settings(train_timeout_s=bad)
    assert Settings(train_timeout_s=7 * 86400).train_timeout_s == 7 * 86400


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_data_parallel_training_refuses_a_non_finite_timeout_before_launching(
    tmp_path: Path, bad: float
) -> None:
    with pytest.raises(ConfigError, match="timeout_s must be a finite number"):
        _one_epoch(Topology(nproc_per_node=2), tmp_path, timeout_s=bad)
    assert not any(tmp_path.iterdir()), "nothing may be launched or written"


def test_cuda_ranks_without_a_gpu_each_are_refused_before_launching(tmp_path: Path) -> None:
    # Before: torchrun started and the rank died in torch internals (AttributeError:
    # torch._C has no _cuda_setDevice) on a machine without CUDA.
    import torch

    one_too_many = Topology(nproc_per_node=torch.cuda.device_count() + 1)
    with pytest.raises(ConfigError, match=r"no CUDA device is visible|need \d+ GPUs"):
        _one_epoch(one_too_many, tmp_path, device="cuda")
    assert not any(tmp_path.iterdir()), "nothing may be launched or written"


def test_the_distributed_error_is_a_training_error_for_the_train_stage() -> None:
    err = DistributedTrainingError("boom", returncode=1, tail=("a",))
    assert isinstance(err, TrainingError)
    assert str(err) == "[train] boom" and err.returncode == 1 and not err.timed_out


def _gone(pid: int) -> bool:
    """No such process, or a zombie waiting for init to reap it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def _py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_launch_streams_every_line_and_returns_on_success() -> None:
    lines: list[str] = []
    launch(
        _py("import sys; print('one'); print('two', file=sys.stderr)"),
        timeout_s=30,
        on_line=lines.append,
    )
    assert sorted(lines) == ["one", "two"]


def test_launch_raises_a_typed_error_with_the_exit_status_and_the_last_lines() -> None:
    lines: list[str] = []
    with pytest.raises(DistributedTrainingError, match=r"torchrun exit 3.*rank 1 failed") as info:
        launch(
            _py("print('rank 1 failed'); raise SystemExit(3)"), timeout_s=30, on_line=lines.append
        )
    assert info.value.returncode == 3 and info.value.tail[-1] == "rank 1 failed"
    assert lines == ["rank 1 failed"]


# torchrun's failure summary as it prints it: other failures first, then the root cause.
def _failure(idx: int, rank: int, exitcode: str, pid: int, traceback: str) -> str:
    return (
        f"[{idx}]:\n  time      : 2026-11-28_12:00:0{idx}\n  host      : box\n"
        f"  rank      : {rank} (local_rank: {rank})\n  exitcode  : {exitcode} (pid: {pid})\n"
        f"  error_file: <N/A>\n  traceback : {traceback}"
    )


BORDER, SECTION = "=" * 60, "-" * 60
SUMMARY = "\n".join(
    [
        "",
        BORDER,
        "ballast.ddp_worker FAILED",
        SECTION,
        "Failures:",
        _failure(1, 0, "{other}", 11, "Signal 15 (SIGTERM) received by PID 11"),
        SECTION,
        "Root Cause (first observed failure):",
        _failure(0, 1, "{root}", 12, "Signal 6 (SIGABRT) received by PID 12"),
        BORDER,
    ]
)


def test_a_failed_launch_names_the_signal_that_killed_the_root_rank_and_its_first_errors() -> None:
    # Given a stand-in torchrun whose rank 1 printed gloo's abort, then noise, then the summary,
    script = (
        "import sys\n"
        "print('stage=train rank=0 starting')\n"
        "print(\"terminate called after throwing an instance of 'gloo::IoException'\", "
        "file=sys.stderr)\n"
        "print('  what():  [pair.cc:589] Read error [127.0.0.1]:3977: Connection reset by peer')\n"
        "for i in range(60): print(f'noise {i}')\n"
        f"print({SUMMARY.format(other=-15, root=-6)!r})\n"
        "raise SystemExit(1)\n"
    )
    with pytest.raises(DistributedTrainingError) as info:
        launch(_py(script), timeout_s=30)
    err = info.value
    # then the error says which signal killed the root cause (not the other rank's SIGTERM) and
    # keeps the first error lines, which scrolled out of the last-lines tail long ago.
    assert err.root_signal == 6 and err.returncode == 1 and not err.timed_out
    assert err.errors[:2] == (
        "terminate called after throwing an instance of 'gloo::IoException'",
        "what():  [pair.cc:589] Read error [127.0.0.1]:3977: Connection reset by peer",
    )
    assert "noise 0" not in err.tail
    assert "rank killed by SIGABRT" in str(err)
    assert "First errors: terminate called after throwing" in str(err)
    assert err.failures == ((-15, 11), (-6, 12))


def test_a_ranks_own_report_comes_first_and_no_line_keeps_a_secret() -> None:
    # Given a rank that failed with Ballast's own error (after a log line naming a URI with a
    # password), then torchrun's traceback and summary,
    lines: list[str] = []
    script = (
        "import sys\n"
        "print('rank=1 INFO x tracking at http://ci:hunter2@mlflow:5000/api')\n"
        "print('Traceback (most recent call last):')\n"
        "print('torch.distributed.elastic.multiprocessing.errors.ChildFailedError:')\n"
        "print(\"rank=1 [train] unknown model 'nope' (postgresql://u:hunter2@db/m)\", "
        "file=sys.stderr)\n"
        f"print({SUMMARY.format(other=-15, root=1)!r})\n"
        "raise SystemExit(1)\n"
    )
    with pytest.raises(DistributedTrainingError) as info:
        launch(_py(script), timeout_s=30, on_line=lines.append)
    err = info.value
    # then the rank's report leads the first errors (Ballast's errors carry no "Error"),
    assert err.errors[0] == "rank=1 [train] unknown model 'nope' (postgresql://***@db/m)"
    assert "First errors: rank=1 [train] unknown model" in str(err)
    # and the password reaches neither the error, its lines, nor the line callback.
    assert err.root_signal is None and err.exitcodes == (-15, 1)
    kept = [str(err), *err.errors, *err.tail, *lines]
    assert not any("hunter2" in text for text in kept), kept


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (SUMMARY.format(other=-15, root=-6).splitlines(), 6),
        (SUMMARY.format(other=-6, root=-11).splitlines(), 11),
        (SUMMARY.format(other=-6, root=1).splitlines(), None),  # a Python error in the root rank
        (["exitcode  : -6 (pid: 3)"], None),  # no summary: nothing to trust
        ([], None),
    ],
)
def test_root_cause_signal_reads_the_root_cause_section_only(
    lines: list[str], expected: int | None
) -> None:
    assert root_cause_signal(lines) == expected


def summary_error(codes: tuple[int, ...], *, timed_out: bool = False) -> DistributedTrainingError:
    """A failed launch whose torchrun summary listed ``codes`` (pids 1, 2, ...; the root cause
    last), torchrun having sent pid 1 SIGTERM."""
    root = -codes[-1] if codes and codes[-1] < 0 else 6
    return DistributedTrainingError(
        "x",
        returncode=1,
        timed_out=timed_out,
        root_signal=root,
        failures=tuple((code, pid) for pid, code in enumerate(codes, start=1)),
        terminated=frozenset({1}),
    )


@pytest.mark.parametrize(
    ("codes", "timed_out", "epoch_ended", "nnodes", "expected"),
    [
        ((-6,), False, False, 1, True),  # gloo aborting while the ranks connect
        ((-15, -11), False, False, 1, True),  # the other rank stopped by torchrun (pid 1)
        ((-7,), False, False, 1, True),  # SIGBUS
        ((-6,), False, True, 1, False),  # training had begun: a crash then is the job's
        ((-6,), False, False, 2, False),  # other nodes' agents are not ours to restart
        ((-6,), True, False, 1, False),
        ((-9,), False, False, 1, False),  # SIGKILL: an operator or the OOM killer decided
        ((-15,), False, False, 1, False),
        ((1,), False, False, 1, False),  # an exit status: a Python error, an orphaned rank
        # A rank raised, its peer aborted in the same second and torchrun's tie-break named
        # the abort the root cause (review finding): the Python error decides, no relaunch.
        ((1, -6), False, False, 1, False),
        ((-9, -6), False, False, 1, False),
        ((), False, False, 1, False),  # no summary read: nothing to go on
    ],
)
def test_only_a_rank_crash_before_the_first_epoch_on_one_node_is_relaunched(
    codes: tuple[int, ...], timed_out: bool, epoch_ended: bool, nnodes: int, expected: bool
) -> None:
    err = summary_error(codes, timed_out=timed_out)
    assert relaunchable(err, epoch_ended=epoch_ended, nnodes=nnodes) is expected


def test_a_sigterm_torchrun_did_not_send_is_a_decision_to_stop() -> None:
    # rank 1 (pid 2) was SIGTERMed by someone else, then its peer aborted (review finding)
    err = DistributedTrainingError(
        "x", returncode=1, root_signal=6, failures=((-15, 2), (-6, 3)), terminated=frozenset({7})
    )
    assert not relaunchable(err, epoch_ended=False, nnodes=1)
    ours = DistributedTrainingError(
        "x", returncode=1, root_signal=6, failures=((-15, 2), (-6, 3)), terminated=frozenset({2})
    )
    assert relaunchable(ours, epoch_ended=False, nnodes=1)


def test_the_summary_of_many_failed_ranks_is_read_whole(tmp_path: Path) -> None:
    # Given 8 ranks, one of which raised (exit 1) while the root cause shown is an abort, whose
    # summary (7 lines a rank) outgrows the 40 kept lines (review finding),
    blocks = [_failure(i + 1, i, "-15", 100 + i, "Signal 15") for i in range(6)]
    blocks.append(_failure(7, 6, "1", 106, "RuntimeError"))
    summary = "\n".join(
        [
            BORDER,
            "ballast.ddp_worker FAILED",
            SECTION,
            "Failures:",
            *blocks,
            SECTION,
            "Root Cause (first observed failure):",
            _failure(0, 7, "-6", 107, "Signal 6 (SIGABRT) received by PID 107"),
            BORDER,
        ]
    )
    terms = "".join(
        f"print('W Sending process {100 + i} closing signal SIGTERM')\n" for i in range(6)
    )
    script = f"{terms}print({summary!r})\nraise SystemExit(1)\n"
    with pytest.raises(DistributedTrainingError) as info:
        launch(_py(script), timeout_s=30)
    err = info.value
    # then every rank's code is known, and the Python error forbids a relaunch.
    assert err.root_signal == 6 and len(err.tail) == 40
    assert sorted(err.exitcodes) == [-15] * 6 + [-6, 1]
    assert err.terminated == frozenset(range(100, 106))
    assert not relaunchable(err, epoch_ended=False, nnodes=1)


def test_no_relaunch_when_the_time_left_is_shorter_than_the_failed_start(tmp_path: Path) -> None:
    # Given a stand-in torchrun that takes 3 s to crash with a relaunchable summary and
    # counts its launches,
    count = tmp_path / "launches"
    script = (
        "import time\n"
        f"p = {str(count)!r}\n"
        "open(p, 'a').write('x')\n"
        "time.sleep(3.0)\n"
        "print('W Sending process 11 closing signal SIGTERM')\n"
        f"print({SUMMARY.format(other=-15, root=-6)!r})\n"
        "raise SystemExit(1)\n"
    )
    run_dir = tmp_path / "ddp-x"
    run_dir.mkdir()

    env = dict(os.environ)

    def launch_within(seconds: float) -> None:
        _launch_relaunching(
            _py(script), Topology(2), timeout_s=seconds, on_line=None, env=env, run_dir=run_dir
        )

    # when less than that is left of the launch's time after it,
    with pytest.raises(DistributedTrainingError, match="rank killed by SIGABRT") as info:
        launch_within(6.0)  # seconds to spare on a stalled machine, less than a second start
    # then the crash stands: one launch, its own error, no relaunch past the time given.
    assert count.read_text() == "x"
    assert "relaunched" not in str(info.value)
    # With time enough, the same crash is relaunched twice, and the last failure says so.
    count.unlink()
    with pytest.raises(DistributedTrainingError, match="relaunched 2 times"):
        launch_within(60)
    assert count.read_text() == "xxx"
    # A relaunch that fails otherwise says it was relaunched once (the wording, not timing).
    from ballast.distributed import _relaunched

    first = DistributedTrainingError("rank killed by SIGABRT")
    last = DistributedTrainingError("rank 0 exited with 1")
    assert "(relaunched once after the first launch's rank crashed while starting: rank killed" in (
        _relaunched(last, 1, first).message
    )
    assert "relaunched 2 times" in _relaunched(last, 2, first).message


def test_a_launch_past_its_timeout_is_stopped_with_every_rank_it_recorded(tmp_path: Path) -> None:
    # Given a stand-in "torchrun" that starts a "rank" in a session of its own (as torchrun
    # does), records its pid like ballast.ddp_worker, and then hangs, as does the rank:
    run_dir = tmp_path / "ddp-x"
    (run_dir / "pids").mkdir(parents=True)
    rank = (
        "import os, time; "
        f"open({str(run_dir / 'pids' / 'rank-0.pid')!r}, 'w').write(str(os.getpid())); "
        "time.sleep(600)"
    )
    parent = (
        "import subprocess, sys, time; "
        f"subprocess.Popen([sys.executable, '-c', {rank!r}, {str(run_dir)!r}], "
        "start_new_session=True); print('started', flush=True); time.sleep(600)"
    )
    started = time.monotonic()
    with pytest.raises(DistributedTrainingError, match="within 2 s") as info:
        launch(_py(parent), timeout_s=2, run_dir=run_dir, grace_s=3)
    # then it fails within the timeout plus the grace period, and nothing survives.
    assert time.monotonic() - started < 2 + 3 + 3
    assert info.value.timed_out and info.value.returncode is None
    (pid,) = worker_pids(run_dir)
    assert _gone(pid), f"rank {pid} survived the launch"


def test_stop_all_leaves_alone_a_pid_file_naming_a_process_that_is_not_a_rank_of_this_launch(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a shared launch folder holding another node's rank pid, which here names an
    # unrelated local process, and a torchrun that has already exited,
    run_dir = tmp_path / "ddp-x"
    (run_dir / "pids").mkdir(parents=True)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run_dir / "pids" / "rank-3.pid").write_text(str(other.pid))
        torchrun = subprocess.Popen([sys.executable, "-c", "pass"])
        torchrun.wait()
        # when every process of the launch is stopped,
        started = time.monotonic()
        stop_all(torchrun, run_dir, grace_s=10.0)
        # then the unrelated process is neither killed, waited for, nor reported as a rank.
        assert time.monotonic() - started < 5, "stop_all waited on a process it must ignore"
        assert other.poll() is None, "an unrelated process was killed"
        assert "still alive" not in caplog.text
    finally:
        other.kill()
        other.wait()


def test_the_launcher_and_the_rank_entry_point_import_without_the_control_plane() -> None:
    # A GPU image has torch, numpy, pandas and scikit-learn only: these must import there.
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in {'pydantic', 'pydantic_settings', 'prefect', 'mlflow',\n"
        "                                  'cryptography'}:\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import ballast.distributed, ballast.ddp_worker, ballast.training\n"
        "print('ok')\n"
    )
    out = subprocess.run(_py(code), cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_the_train_task_uses_torchrun_only_when_settings_ask_for_more_than_one_process() -> None:
    from tasks.train import _topology

    assert not _topology(Settings()).distributed, "the default stays single-process"
    # train() itself refuses a missing GPU, as before (no earlier error of another type).
    assert not _topology(Settings(device="cuda")).distributed
    assert not _topology(Settings(train_world_size="auto", device="cpu")).distributed
    two = _topology(Settings(train_world_size="2", device="cpu"))
    assert two.distributed and two.world_size == 2
    nodes = _topology(
        Settings(train_nnodes=2, train_rdzv_endpoint="h:29400", train_rdzv_id="r1", device="cpu")
    )
    assert nodes.distributed and nodes.world_size == 2 and nodes.rdzv_id == "r1"
    # Refused when settings load now, before any stage runs.
    with pytest.raises(ValidationError, match="rendezvous"):
        Settings(train_nnodes=2, device="cpu")


def test_the_sweep_removes_only_folders_whose_launcher_died_here(tmp_path: Path) -> None:
    import json
    import socket

    from ballast.distributed import SPEC_FILE, sweep_stale_runs

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()

    def launch(name: str, pid: int, host: str) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        (folder / SPEC_FILE).write_text(json.dumps({"launcher": {"pid": pid, "host": host}}))
        (folder / "data.npz").write_bytes(b"plaintext")
        return folder

    gone = launch("ddp-gone", dead.pid, socket.gethostname())
    running = launch("ddp-running", os.getpid(), socket.gethostname())
    elsewhere = launch("ddp-elsewhere", dead.pid, "another-node")  # cannot tell: kept
    (tmp_path / "ddp-old-format").mkdir()  # no spec: kept
    assert sweep_stale_runs(tmp_path) == [gone]
    assert not gone.exists() and running.exists() and elsewhere.exists()


@pytest.mark.parametrize(
    ("codes", "timed_out", "done", "expected"),
    [
        ((-6,), False, True, True),  # gloo aborting a rank as the group is torn down
        ((-15, -11), False, True, True),  # the other rank stopped by torchrun (pid 1)
        ((-6,), False, False, False),  # no result yet: a crash in training is the job's
        ((-6,), True, True, False),
        ((-9,), False, True, False),  # SIGKILL: an operator or the OOM killer decided
        ((1,), False, True, False),  # an exit status: a Python error
        ((1, -6), False, True, False),
        ((), False, True, False),  # no summary read: nothing to go on
    ],
)
def test_only_a_fault_signal_after_rank_0_wrote_its_result_keeps_the_result(
    codes: tuple[int, ...], timed_out: bool, done: bool, expected: bool
) -> None:
    assert crashed_in_teardown(summary_error(codes, timed_out=timed_out), done=done) is expected


def test_a_rank_crashing_after_the_result_is_written_keeps_the_result(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a stand-in torchrun whose rank 0 trained an epoch and wrote its result, then a rank
    # aborted (as gloo does tearing the group down),
    count = tmp_path / "launches"
    script = (
        f"open({str(count)!r}, 'a').write('x')\n"
        "print('stage=train rank=0 world_size=2 epoch=1 train_loss=0.5')\n"
        "print('stage=train rank=0 world_size=2 done epochs=1 accuracy=0.9000')\n"
        "print('terminate called without an active exception')\n"
        "print('W Sending process 11 closing signal SIGTERM')\n"
        f"print({SUMMARY.format(other=-15, root=-6)!r})\n"
        "raise SystemExit(1)\n"
    )
    run_dir = tmp_path / "ddp-x"
    run_dir.mkdir()

    def launch_once() -> None:
        _launch_relaunching(
            _py(script), Topology(2), timeout_s=60, on_line=None, env=dict(os.environ),
            run_dir=run_dir,
        )  # fmt: skip

    # when the result file is there, the launch stands, once, and the crash is logged;
    (run_dir / "result.pt").write_bytes(b"checked by read_result")
    caplog.set_level("WARNING")
    launch_once()
    assert count.read_text() == "x"
    assert "teardown_crash=SIGABRT result=kept" in caplog.text
    assert "terminate called without an active exception" in caplog.text
    # without it (a claim the file does not back), the crash fails the launch as before.
    (run_dir / "result.pt").unlink()
    with pytest.raises(DistributedTrainingError, match="rank killed by SIGABRT"):
        launch_once()
    assert count.read_text() == "xx"
