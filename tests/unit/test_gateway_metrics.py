"""Deferred hot-path metric updates: what reaches the series equals one observe() per event,
in one process and in prometheus_client's multiprocess mode."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from infra.gateway.metrics import (
    BATCH_BUCKETS,
    LATENCY_BUCKETS,
    MULTIPROC_ENV,
    QUEUE_BUCKETS,
    GatewayMetrics,
)


def _events(seed: int) -> list[tuple[str, tuple[object, ...]]]:
    rng = random.Random(seed)
    out: list[tuple[str, tuple[object, ...]]] = []
    for _ in range(400):
        version = rng.choice(["1", "2"])
        role = "champion" if version == "1" else "canary"
        # Values on and around bucket bounds: the edge a bucket search gets wrong first.
        latency = rng.choice([*LATENCY_BUCKETS, rng.uniform(0, 2.0), 0.0, 5.0])
        out.append(("observe", ("m", version, role, rng.choice([200, 500]), latency, "predict")))
        rows = rng.randint(1, 3)
        logits = np.asarray([[rng.random(), rng.random(), rng.random()] for _ in range(rows)])
        out.append(("observe_predictions", ("m", version, role, logits)))
        waits = [rng.choice([*QUEUE_BUCKETS, rng.uniform(0, 0.02)]) for _ in range(rows)]
        size = rng.choice([*BATCH_BUCKETS, rows, 5000])
        out.append(("observe_batch", ("m", version, size, waits)))
    return out


def _reference(metrics: GatewayMetrics, events: list[tuple[str, tuple[object, ...]]]) -> None:
    """The same events written with plain per-value prometheus_client calls."""
    for kind, args in events:
        if kind == "observe":
            model, version, role, status, seconds, route = args
            metrics.requests.labels(model, version, role, route, str(status)).inc()
            metrics.latency.labels(model, version, role, route).observe(seconds)  # type: ignore[arg-type]
        elif kind == "observe_predictions":
            model, version, role, logits = args
            for cls in np.asarray(logits).argmax(axis=1).tolist():
                metrics.predictions.labels(model, version, role, str(cls)).inc()
        else:
            model, version, size, waits = args
            metrics.batch_size.labels(model, version).observe(size)  # type: ignore[arg-type]
            for w in waits:  # type: ignore[attr-defined]
                metrics.queue_delay.labels(model, version).observe(w)


def _record(metrics: GatewayMetrics, events: list[tuple[str, tuple[object, ...]]]) -> None:
    for kind, args in events:
        getattr(metrics, kind)(*args)


def _samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample but the ``_created`` timestamps, by name and labels (order-free)."""
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text.decode())
        for s in family.samples
        if not s.name.endswith("_created")
    }


def _requests_total(metrics: GatewayMetrics) -> float:
    return sum(
        s.value
        for family in metrics.registry.collect()
        if family.name == "ballast_requests"
        for s in family.samples
        if s.name == "ballast_requests_total"
    )


def test_deferred_updates_render_exactly_as_per_value_observes() -> None:
    events = _events(0)
    pending: list[Callable[[], None]] = []
    deferred = GatewayMetrics()
    deferred.defer_with(pending.append)
    _record(deferred, events[:600])
    assert len(pending) == 1, "one write-out is scheduled however many updates are pending"
    assert _requests_total(deferred) == 0  # nothing written yet
    pending.pop()()
    assert _requests_total(deferred) == 200
    _record(deferred, events[600:])
    pending.pop()()
    reference = GatewayMetrics()
    _reference(reference, events)
    # Sums may differ in the last bit: the same floats added in another order.
    assert _samples(deferred.render()) == pytest.approx(_samples(reference.render()), rel=1e-12)


def test_without_a_scheduler_updates_are_written_at_once() -> None:
    m = GatewayMetrics()
    m.observe("m", "1", "champion", 200, 0.002, "predict")
    assert (
        b'ballast_requests_total{model="m",role="champion",route="predict",status="200",version="1"} 1.0'
        in m.render()
    )


def test_queue_waits_of_seconds_land_in_buckets_of_seconds() -> None:
    # Under overload requests wait seconds; a top bucket of 50 ms made every p99 read 50 ms.
    m = GatewayMetrics()
    m.observe_batch("m", "1", 4, [2.0, 2.0, 2.0, 0.0001])
    text = m.render().decode()
    bucket = 'ballast_queue_delay_seconds_bucket{{le="{}",model="m",version="1"}} {}'
    assert bucket.format("1.0", "1.0") in text, text
    assert bucket.format("2.5", "4.0") in text, text


def test_multiprocess_mode_sums_the_same(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from prometheus_client import values

    def render(folder: Path, write: Callable[[GatewayMetrics], None]) -> bytes:
        folder.mkdir()
        monkeypatch.setenv(MULTIPROC_ENV, str(folder))
        values.ValueClass = values.get_value_class()  # what a replica process picks at start
        metrics = GatewayMetrics()
        write(metrics)
        return metrics.render()

    events = _events(1)

    def deferred(metrics: GatewayMetrics) -> None:
        pending: list[Callable[[], None]] = []
        metrics.defer_with(pending.append)
        _record(metrics, events)
        pending.pop()()

    try:
        got = render(tmp_path / "deferred", deferred)
        want = render(tmp_path / "reference", lambda m: _reference(m, events))
    finally:
        monkeypatch.delenv(MULTIPROC_ENV)
        values.ValueClass = values.get_value_class()
    assert b"ballast_batch_size_rows_bucket" in got
    assert _samples(got) == pytest.approx(_samples(want), rel=1e-12)


@pytest.mark.parametrize("multiprocess", [False, True], ids=["one-process", "multiprocess"])
def test_deployment_results_start_at_zero_once_a_model_is_deployed(
    multiprocess: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prometheus_client import values

    if multiprocess:
        monkeypatch.setenv(MULTIPROC_ENV, str(tmp_path))
    values.ValueClass = values.get_value_class()
    try:
        # Given a gateway that has just deployed model m (and nothing refused or expired yet),
        m = GatewayMetrics()
        m.set_deployment("m", {"1": "champion"}, 0)
        text = m.render().decode()
    finally:
        monkeypatch.delenv(MULTIPROC_ENV, raising=False)
        values.ValueClass = values.get_value_class()
    # then every result's series exists at 0, so increase() counts its first event.
    for result in ("applied", "startup", "refused", "precondition_failed", "lease_expired"):
        line = f'ballast_deployments_total{{model="m",result="{result}"}} 0.0'
        assert line in text, f"{result} not pre-created at 0:\n{text}"
    assert "N times" in text, "the HELP says each replica counts a change"
    # and so does each serving version's failure count, on every route that predicts.
    for route in ("predict", "oip_infer"):
        line = (
            f'ballast_requests_total{{model="m",role="champion",route="{route}",'
            f'status="500",version="1"}} 0.0'
        )
        assert line in text, f"{route} failures not pre-created at 0:\n{text}"
