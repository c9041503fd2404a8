"""Latency and throughput of a predictor, and of the eager model it came from, per batch size.

Each batch size is timed call by call (``perf_counter_ns``) after a warm-up, until both
``min_time_s`` has passed and ``min_repeats`` calls were made; the report keeps the median and p99
latency and the throughput (batch / mean latency). Inputs are converted from numpy in both cases,
so the comparison includes what serving pays for conversion.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

    from ballast.runtime import Predictor


@dataclass(frozen=True)
class BatchTiming:
    batch: int
    p50_ms: float
    p99_ms: float
    mean_ms: float
    samples_per_s: float
    n_calls: int


@dataclass(frozen=True)
class BenchReport:
    runtime: str  # "onnxruntime", "tensorrt", "eager"
    threads: int | None  # intra-op threads where the runtime was told a number
    timings: tuple[BatchTiming, ...]

    def for_batch(self, batch: int) -> BatchTiming:
        for t in self.timings:
            if t.batch == batch:
                return t
        raise KeyError(batch)

    @property
    def batches(self) -> tuple[int, ...]:
        return tuple(t.batch for t in self.timings)


def _measure(
    fn: Callable[[], object], batch: int, *, min_time_s: float, min_repeats: int, warmup: int
) -> BatchTiming:
    for _ in range(warmup):
        fn()
    lat_ns: list[int] = []
    deadline = time.perf_counter() + min_time_s
    while len(lat_ns) < min_repeats or time.perf_counter() < deadline:
        t0 = time.perf_counter_ns()
        fn()
        lat_ns.append(time.perf_counter_ns() - t0)
    lat_ms = np.asarray(lat_ns, dtype=np.float64) / 1e6
    mean_ms = float(lat_ms.mean())
    return BatchTiming(
        batch=batch,
        p50_ms=float(np.percentile(lat_ms, 50)),
        p99_ms=float(np.percentile(lat_ms, 99)),
        mean_ms=mean_ms,
        samples_per_s=batch / (mean_ms / 1e3),
        n_calls=len(lat_ns),
    )


def _inputs(n_features: int, batches: tuple[int, ...], seed: int) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {b: rng.standard_normal((b, n_features)).astype(np.float32) for b in batches}


def benchmark(
    predictor: Predictor,
    n_features: int,
    batches: tuple[int, ...],
    *,
    min_time_s: float = 0.2,
    min_repeats: int = 50,
    warmup: int = 10,
    seed: int = 0,
    threads: int | None = None,
) -> BenchReport:
    """Time ``predictor.predict`` at each batch size (``threads`` is only recorded)."""
    timings = tuple(
        _measure(
            partial(predictor.predict, x),
            b,
            min_time_s=min_time_s,
            min_repeats=min_repeats,
            warmup=warmup,
        )
        for b, x in _inputs(n_features, batches, seed).items()
    )
    return BenchReport(runtime=predictor.backend, threads=threads, timings=timings)


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    # torch's thread count is process-wide: set it for the measurement only, then put it back.
    import torch

    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def benchmark_eager(
    model: torch.nn.Module,
    n_features: int,
    batches: tuple[int, ...],
    *,
    min_time_s: float = 0.2,
    min_repeats: int = 50,
    warmup: int = 10,
    seed: int = 0,
    threads: int | None = None,
) -> BenchReport:
    """Time the eager model (eval mode, inference_mode, numpy in and out) at each batch size.

    ``threads`` sets torch's intra-op threads for the measurement, so the comparison with a
    runtime given the same number is like for like; None leaves torch's default.
    """
    import torch

    device = next((t.device for t in [*model.parameters(), *model.buffers()]), torch.device("cpu"))
    was_training = model.training
    model.eval()

    def call(x: np.ndarray) -> np.ndarray:
        # .cpu() waits for a GPU model too, so the time covers the whole call.
        return np.asarray(model(torch.from_numpy(x).to(device)).cpu().numpy())

    try:
        with torch.inference_mode(), torch_threads(threads):
            timings = tuple(
                _measure(
                    partial(call, x),
                    b,
                    min_time_s=min_time_s,
                    min_repeats=min_repeats,
                    warmup=warmup,
                )
                for b, x in _inputs(n_features, batches, seed).items()
            )
    finally:
        model.train(was_training)
    return BenchReport(runtime="eager", threads=threads or torch.get_num_threads(), timings=timings)


def relative_cost(
    candidate: Predictor,
    champion: Predictor,
    n_features: int,
    batches: tuple[int, ...],
    *,
    rounds: int = 9,
    block_s: float = 0.01,
    warmup: int = 5,
    seed: int = 0,
) -> dict[int, float]:
    """Per batch size, the candidate's time per call over the champion's, measured side by side.

    A ratio, never two absolute figures: the two run in one process, in ``rounds`` alternating
    blocks of about ``block_s`` each (the champion first every other round), on the same inputs,
    and the result is the median of the rounds' ratios, so drift of a noisy machine cancels.
    """
    if rounds < 1 or block_s <= 0:
        raise ValueError("rounds must be >= 1 and block_s > 0")
    out: dict[int, float] = {}
    for b, x in _inputs(n_features, batches, seed).items():
        fns = (partial(candidate.predict, x), partial(champion.predict, x))
        calls = []
        for fn in fns:
            for _ in range(warmup):
                fn()
            t0 = time.perf_counter()
            fn()
            # Calls per block from one timed call, at least 1: a block of a slow model is one call.
            calls.append(max(1, int(block_s / max(time.perf_counter() - t0, 1e-9))))
        ratios = []
        for r in range(rounds):
            took = [0.0, 0.0]
            for i in (0, 1) if r % 2 == 0 else (1, 0):
                fn, n = fns[i], calls[i]
                t0 = time.perf_counter()
                for _ in range(n):
                    fn()
                took[i] = (time.perf_counter() - t0) / n
            ratios.append(took[0] / took[1] if took[1] > 0 else float("inf"))
        out[b] = float(np.median(ratios))
    return out
