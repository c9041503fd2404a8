"""One rank of data-parallel training, started by torchrun (see :mod:`ballast.distributed`):

    python -m torch.distributed.run --standalone --nproc-per-node=2 -m ballast.ddp_worker \\
        --spec RUN_DIR/job.json

Reads the job spec and the validated arrays the launcher wrote into its private folder, joins
the process group (gloo on CPU, nccl on CUDA, one GPU per local rank), trains with
``ballast.training.train`` through DistributedDataParallel, and on rank 0 only writes the
checkpoints, one structured line per epoch, and the result file the launcher reads back.

Every rank writes its pid to ``RUN_DIR/pids/rank-N.pid`` (torchrun starts each rank in a
session of its own, so the launcher finds them there to stop them) and exits by itself when
torchrun goes away. Imports only torch, numpy, scikit-learn, pandas and ballast's plain modules.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import socket
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ballast.distributed import DATA_FILE, PID_DIR, RESULT_FILE, pid_alive
from ballast.errors import BallastError

if TYPE_CHECKING:
    import torch

    from ballast.training import EpochRecord

#: Exit status of a rank whose torchrun parent died (it must not train on alone).
ORPHANED = 70


class TorchRankGroup:
    """:class:`ballast.training.RankGroup` over the default torch.distributed process group."""

    def __init__(self, rank: int, world_size: int, device: str, local_rank: int) -> None:
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self.local_rank = local_rank

    def wrap(self, net: torch.nn.Module) -> torch.nn.Module:
        import inspect

        from torch.nn.parallel import DistributedDataParallel

        # The models' buffers are fixed normalisation statistics, equal on every rank: no need
        # to sync them before every forward pass (the option was renamed in recent torch).
        params = inspect.signature(DistributedDataParallel.__init__).parameters
        name = "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"
        options: dict[str, Any] = {name: False}
        if self.device == "cuda":
            options["device_ids"] = [self.local_rank]
        ddp: torch.nn.Module = DistributedDataParallel(net, **options)
        return ddp

    def all_sum(self, value: float) -> float:
        import torch
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t.item())

    def broadcast(self, obj: Any) -> Any:
        import torch.distributed as dist

        box = [obj if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def _watch_parent(launcher: int | None = None, rank: int = 0, run_dir: Path | None = None) -> None:
    """Exit when torchrun (our parent) is gone, instead of waiting on a collective forever; and
    when the launcher on this host (``launcher``) is gone, since nothing else would stop the
    launch then. Rank 0 then removes ``run_dir``: the plaintext arrays must not outlive it."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            # The launcher first: its death often takes torchrun down too (a broken pipe).
            if launcher is not None and not pid_alive(launcher):
                print("the launcher is gone; this rank stops", file=sys.stderr, flush=True)
                if rank == 0 and run_dir is not None:
                    shutil.rmtree(run_dir, ignore_errors=True)
                os._exit(ORPHANED)
            if os.getppid() != parent:
                print("torchrun is gone; this rank stops", file=sys.stderr, flush=True)
                os._exit(ORPHANED)
            time.sleep(0.5)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _write_pid(run_dir: Path, rank: int) -> None:
    pids = run_dir / PID_DIR
    pids.mkdir(exist_ok=True, mode=0o700)
    tmp = pids / f".rank-{rank}.pid.tmp"
    tmp.write_text(str(os.getpid()))
    os.replace(tmp, pids / f"rank-{rank}.pid")  # a reader never sees half a pid


def _save_result(path: Path, result: Any, seconds: float) -> None:
    import torch

    payload = {
        "state_dict": result.model.state_dict(),
        "metrics": dict(result.metrics),
        "params": dict(result.params),
        "device": result.device,
        "seconds": seconds,
        "history": [[r.epoch, r.train_loss, r.val_loss, r.val_accuracy] for r in result.history],
        "model_name": result.model_name,
        "resumed_from_epoch": result.resumed_from_epoch,
        "stopped_early": result.stopped_early,
        "best_epoch": result.best_epoch,
        "checkpoint_key": result.checkpoint_key,
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)  # the launcher never reads half a result


def run(spec_path: Path) -> int:
    import numpy as np
    import torch
    import torch.distributed as dist

    from ballast.data import ValidatedDataset
    from ballast.training import train

    job = json.loads(spec_path.read_text())
    run_dir = Path(job["run_dir"])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    _write_pid(run_dir, rank)
    launcher = job.get("launcher") or {}
    here = launcher.get("host") == socket.gethostname()
    _watch_parent(int(launcher["pid"]) if here else None, rank, run_dir)
    cfg = dict(job["train"])
    device = cfg.pop("device")
    if device == "cuda":
        torch.cuda.set_device(local_rank)
    torch.set_num_threads(int(job["threads"]))
    dist.init_process_group(
        backend=job["backend"], timeout=timedelta(seconds=float(job["collective_timeout_s"]))
    )
    pause = float(job.get("pause_after_epoch_s") or 0.0)
    # Imported here, not on first use inside train(): 2-5 s on a small box that would otherwise
    # count as training time (split_dataset's scikit-learn, the DDP constructor's torch._dynamo).
    import sklearn.model_selection  # noqa: F401
    import torch._dynamo

    def on_epoch(r: EpochRecord) -> None:
        if rank == 0:
            print(
                f"stage=train rank=0 world_size={world} epoch={r.epoch} "
                f"train_loss={r.train_loss:.5f} val_loss={r.val_loss:.5f} "
                f"val_accuracy={r.val_accuracy:.4f}",
                flush=True,
            )
        if pause > 0:
            time.sleep(pause)

    try:
        with np.load(run_dir / DATA_FILE) as data:
            features, labels = data["features"], data["labels"]
        meta = job["dataset"]
        ds = ValidatedDataset(
            name=meta["name"],
            features=features,
            labels=labels,
            feature_names=tuple(meta["feature_names"]),
            sha256=meta["sha256"],
            n_rows=len(labels),
            checks=(),
            n_classes=meta.get("n_classes"),
        )
        ckpt = cfg.pop("checkpoint_dir")
        result = train(
            ds,
            **cfg,
            device=device,
            checkpoint_dir=Path(ckpt) if ckpt else None,
            on_epoch=on_epoch,
            ranks=TorchRankGroup(rank, world, device, local_rank),
        )
        if rank == 0:
            _save_result(run_dir / RESULT_FILE, result, result.seconds)
            # The launcher's cue (distributed._DONE_LINE): the result is in place.
            print(
                f"stage=train rank=0 world_size={world} done epochs={len(result.history)} "
                f"accuracy={result.metrics['accuracy']:.4f}",
                flush=True,
            )
        try:
            # Every rank leaves the group together: one tearing its connections down while a
            # peer still uses them is how gloo aborts ranks at the end of a job.
            dist.barrier()
        except Exception as exc:  # training is over and its result written: not a failure
            logging.getLogger(__name__).warning("rank=%d teardown barrier failed: %s", rank, exc)
    finally:
        dist.destroy_process_group()
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ballast.ddp_worker", description=__doc__)
    ap.add_argument("--spec", type=Path, required=True, help="job.json written by the launcher")
    args = ap.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        format=f"rank={os.environ.get('RANK', '?')} %(levelname)s %(name)s %(message)s",
    )
    try:
        return run(args.spec)
    except BallastError as exc:
        print(f"rank={os.environ.get('RANK', '?')} {exc}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
