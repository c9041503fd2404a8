"""Train a model on a bundled dataset from the command line, with checkpoints and resume.

    python -m ballast.training_cli --dataset digits --model small-cnn \\
        --checkpoint-dir .ballast/checkpoints --weights-out /tmp/weights.pt

Prints one JSON object on the last line of stdout: the metrics, ``resumed_from_epoch`` (null
when the run started from scratch), ``epochs_run``, ``stopped_early``, the checkpoint key and the
per-epoch history ``[epoch, train_loss, val_loss, val_accuracy]``.
Killing it (even with SIGKILL) and starting it again with the same arguments resumes after the
last checkpointed epoch. ``--pause-after-epoch`` sleeps after each epoch so a test or a demo can
interrupt a run that would otherwise finish in a blink; it does not change the result.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from ballast.argtypes import at_least
from ballast.errors import BallastError
from ballast.models import MODELS, TABULAR_MLP


def _check_paths(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse paths that could only fail after training (exit 2, nothing written)."""
    ckpt = args.checkpoint_dir
    if ckpt is not None and ckpt.exists() and not ckpt.is_dir():
        ap.error(f"--checkpoint-dir {ckpt} is a file, not a folder")
    out = args.weights_out
    if out is not None:
        if out.is_dir():
            ap.error(f"--weights-out {out} is a folder; give the file to write")
        if out.parent.exists() and not out.parent.is_dir():
            ap.error(f"--weights-out {out}: {out.parent} is a file, not a folder")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m ballast.training_cli", description=__doc__)
    ap.add_argument("--dataset", choices=["breast-cancer", "digits"], default="breast-cancer")
    ap.add_argument("--model", choices=sorted(MODELS), default=TABULAR_MLP)
    ap.add_argument(
        "--param", action="append", default=[], metavar="KEY=VALUE", help="model hyperparameter"
    )
    ap.add_argument("--epochs", type=at_least(1), default=30)
    ap.add_argument("--learning-rate", type=at_least(1e-12, float), default=3e-3)
    ap.add_argument("--batch-size", type=at_least(1), default=64)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--patience", type=at_least(0), default=10, help="0 disables early stopping")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--threads", type=at_least(1), default=1, help="torch intra-op threads on CPU")
    ap.add_argument("--checkpoint-dir", type=Path, default=None)
    ap.add_argument("--weights-out", type=Path, default=None, help="save the final state_dict")
    ap.add_argument(
        "--pause-after-epoch", type=at_least(0.0, float), default=0.0, metavar="SECONDS"
    )
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)
    _check_paths(ap, args)
    import torch

    from ballast.datasets_extra import bundled_dataset
    from ballast.training import EpochRecord, train

    torch.set_num_threads(max(1, args.threads))
    params: dict[str, str] = {}
    for item in args.param:
        key, sep, value = item.partition("=")
        if not sep:
            print(f"--param expects KEY=VALUE, got {item!r}", file=sys.stderr)
            return 2

        params[key.strip()] = value.strip()

    def after_epoch(record: EpochRecord) -> None:
        print(
            f"epoch {record.epoch} train_loss={record.train_loss:.5f} "
            f"val_loss={record.val_loss:.5f} val_accuracy={record.val_accuracy:.4f}",
            file=sys.stderr,
            flush=True,
        )
        if args.pause_after_epoch > 0:
            time.sleep(args.pause_after_epoch)

    try:
        result = train(
            bundled_dataset(args.dataset),
            model=args.model,
            model_params=params,
            epochs=args.epochs,
            learning_rate=args.learning_rate,
            batch_size=args.batch_size,
            seed=args.seed,
            patience=args.patience or None,
            device=args.device,
            checkpoint_dir=args.checkpoint_dir,
            on_epoch=after_epoch,
        )
    except BallastError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    except OSError as exc:  # a checkpoint folder that cannot be written, found mid-run
        print(f"[train] {exc}", file=sys.stderr)
        return 1
    if args.weights_out is not None:
        tmp = args.weights_out.with_name(args.weights_out.name + ".tmp")
        try:
            args.weights_out.parent.mkdir(parents=True, exist_ok=True)
            torch.save(result.model.state_dict(), tmp)
            os.replace(tmp, args.weights_out)  # a killed run never leaves half a weights file
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            print(f"[train] cannot write --weights-out {args.weights_out}: {exc}", file=sys.stderr)
            return 1
    print(
        json.dumps(
            {
                "model": result.model_name,
                "dataset": args.dataset,
                "device": result.device,
                "resumed_from_epoch": result.resumed_from_epoch,
                "epochs_run": len(result.history),
                "best_epoch": result.best_epoch,
                "stopped_early": result.stopped_early,
                "checkpoint_key": result.checkpoint_key,
                "metrics": result.metrics,
                "history": [
                    [r.epoch, r.train_loss, r.val_loss, r.val_accuracy] for r in result.history
                ],
                "seconds": round(result.seconds, 3),
            }
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
