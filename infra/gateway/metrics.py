"""Prometheus series of one gateway, on a registry of its own (no global state at import).

With several replica processes, prometheus_client's multiprocess mode aggregates them: the
supervisor sets ``PROMETHEUS_MULTIPROC_DIR`` (an empty folder) before it starts the workers,
every worker writes its values to memory-mapped files there, and whichever worker answers
``/metrics`` merges all of them (counters and histograms summed over every process that ever
ran, so a restarted worker never makes a counter go backwards; gauges are the most recent value
among live processes). Label removal does not exist in that mode, so a retired version's
``ballast_deployment_info`` series reads 0 there instead of disappearing.
"""

from __future__ import annotations

import os
from bisect import bisect_left
from collections.abc import Callable
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# The results ballast_deployments_total counts per model (the gateway's admin and sync paths).
# The routes that answer predictions (ballast_requests_total's route label).
SERVED_ROUTES = ("predict", "oip_infer")
# Every one exists from the start: a series born at 1 reads as no increase to Prometheus.
DEPLOYMENT_RESULTS = ("applied", "startup", "refused", "precondition_failed", "lease_expired")

# Batch-1 inference of a small model answers in well under a millisecond; a faulty or overloaded
# version in tens to hundreds of milliseconds. The buckets cover both ends.
LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
# Up to seconds: under overload (the case the queue panel is for) waits far exceed 50 ms, and
# a p99 cannot read above the top bucket.
QUEUE_BUCKETS = (
    0.00001,
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)
DIFF_BUCKETS = (0.0, 1e-6, 1e-4, 1e-3, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0)


def multiprocess_dir() -> str | None:
    """The shared metrics folder when this process is one of several replicas, else None."""
    return os.environ.get(MULTIPROC_ENV) or None


def _bulk_observe(child: Histogram, total: float, counts: list[int]) -> None:
    """Add ``counts[i]`` observations to bucket ``i`` of ``child`` and ``total`` to its sum: what
    as many ``observe()`` calls would do, in one write per bucket touched.

    prometheus_client has no public bulk call; this uses the child's ``_sum`` and ``_buckets``
    (the version is pinned, and a unit test checks the exposition equals per-value observes).
    """
    child._sum.inc(total)
    buckets = child._buckets
    for i, n in enumerate(counts):
        if n:
            buckets[i].inc(n)


class GatewayMetrics:
    """The gateway's series. Label children are cached because ``labels()`` is hot-path work.

    Per-request updates (requests, latency, predicted classes, batch sizes, queue delays) are
    summed in plain dicts and written to the series later, all at once (``defer_with``: the
    gateway passes a loop callback that runs every ``metrics_flush_s``; without one, at once).
    In multiprocess mode every write takes a lock, checks the process id (a syscall) and packs
    into a memory map, about a microsecond per series; under load a replica answers dozens of
    requests per loop iteration and hundreds per flush, so this removes nearly all of that work.
    """

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.multiprocess = multiprocess_dir() is not None
        # In multiprocess mode the series live in shared files; this registry only owns them,
        # and render() collects from the files instead.
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "ballast_requests",
            "Predict requests answered by a version.",
            ["model", "version", "role", "route", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "ballast_request_latency_seconds",
            "Server-side latency of predict requests answered by a version.",
            ["model", "version", "role", "route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.rejected = Counter(
            "ballast_rejected_requests",
            "Predict requests refused before any version saw them.",
            ["reason"],
            registry=r,
        )
        self.batch_size = Histogram(
            "ballast_batch_size_rows",
            "Rows per model call (dynamic batching).",
            ["model", "version"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.queue_delay = Histogram(
            "ballast_queue_delay_seconds",
            "Time a request waited in its version's batch queue.",
            ["model", "version"],
            buckets=QUEUE_BUCKETS,
            registry=r,
        )
        self.shadow = Counter(
            "ballast_shadow_comparisons",
            "Mirrored requests compared row by row with the primary's answer, by agreement "
            "of the predicted class (agreement rate = agree / all).",
            ["model", "shadow", "primary", "agree"],
            registry=r,
        )
        self.shadow_diff = Histogram(
            "ballast_shadow_max_abs_prob_diff",
            "Largest absolute difference of class probabilities, shadow vs primary, per row.",
            ["model", "shadow"],
            buckets=DIFF_BUCKETS,
            registry=r,
        )
        self.shadow_skipped = Counter(
            "ballast_shadow_skipped",
            "Requests that should have been mirrored but were not (shadow busy or failed).",
            ["model", "shadow", "reason"],
            registry=r,
        )
        self.canary_weight = Gauge(
            "ballast_canary_weight",
            "Percent of traffic routed to the canary.",
            ["model"],
            registry=r,
            multiprocess_mode="livemostrecent",
        )
        self.shadow_fraction = Gauge(
            "ballast_shadow_fraction",
            "Share of requests mirrored to the shadow.",
            ["model"],
            registry=r,
            multiprocess_mode="livemostrecent",
        )
        self.deployment_info = Gauge(
            "ballast_deployment_info",
            "1 for each version the current deployment serves, labelled with its role.",
            ["model", "version", "role"],
            registry=r,
            multiprocess_mode="livemostrecent",
        )
        # Every replica process applies (or refuses) each change itself (the PUT's replica and
        # each one that converges to it), and each counts it: this counts applications, not
        # changes. Good for "did the deployment change" (increase > 0), not "how many times".
        self.deployments = Counter(
            "ballast_deployments",
            "Deployment changes by result (applied, refused, invalid, precondition_failed, "
            "lease_expired), counted by every replica process that applies or refuses one: "
            "with N replicas one change counts N times. startup: a (re)started replica "
            "loading the deployment already in force (not a change).",
            ["model", "result"],
            registry=r,
        )
        self.predictions = Counter(
            "ballast_predictions",
            "Rows answered 200, by predicted class (argmax of the row's output); the drift "
            "alert compares each class's share with its own baseline.",
            ["model", "version", "role", "class"],
            registry=r,
        )
        # Set by POST /admin/watchdog/heartbeat. With several replicas the heartbeat lands on
        # one of them: the newest timestamp must win whichever process wrote it, alive or not
        # ("max"), and so must the newest health verdict ("mostrecent", not "live...").
        self.watchdog_heartbeat = Gauge(
            "ballast_watchdog_heartbeat_timestamp_seconds",
            "Unix time of the champion watchdog's last heartbeat.",
            ["model"],
            registry=r,
            multiprocess_mode="max",
        )
        self.watchdog_healthy = Gauge(
            "ballast_watchdog_healthy",
            "1 when the champion watchdog's last heartbeat found the champion healthy, else 0.",
            ["model"],
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self._request_children: dict[tuple[str, str, str, str, int], Counter] = {}
        self._class_children: dict[tuple[str, str, str, int], Counter] = {}
        # (model, version) -> the loaded version's own per-class tally (LoadedVersion.classes).
        self._tallies: dict[tuple[str, str], dict[int, int]] = {}
        self._latency_children: dict[tuple[str, str, str, str], Histogram] = {}
        self._batch_children: dict[tuple[str, str], tuple[Histogram, Histogram]] = {}
        self._info_labels: set[tuple[str, str, str]] = set()
        self._weight_models: set[str] = set()
        self._deployment_models: set[str] = set()
        # Pending hot-path updates: counter child -> increment; histogram child -> [sum, count
        # per bucket...] (bounds as the series', +Inf last).
        self._counts: dict[Counter, int] = {}
        self._hists: dict[Histogram, list[Any]] = {}
        self._defer: Callable[[Callable[[], None]], object] | None = None
        self._flush_due = False

    def defer_with(self, schedule: Callable[[Callable[[], None]], object] | None) -> None:
        """Write pending updates through ``schedule`` (e.g. the event loop's ``call_soon``, or
        ``call_later`` bound to an interval); None writes every update at once."""
        self.flush()
        self._defer = schedule

    def _due(self) -> None:
        if not self._flush_due:
            self._flush_due = True
            if self._defer is None:
                self.flush()
            else:
                self._defer(self.flush)

    def _add(self, child: Counter, n: int = 1) -> None:
        counts = self._counts
        counts[child] = counts.get(child, 0) + n
        self._due()

    def _sample(self, child: Histogram, bounds: tuple[float, ...], value: float) -> None:
        acc = self._hists.get(child)
        if acc is None:
            acc = self._hists[child] = [0.0] + [0] * (len(bounds) + 1)
        acc[0] += value
        # The first bucket whose upper bound is >= value, as Histogram.observe picks it.
        acc[1 + bisect_left(bounds, value)] += 1
        self._due()

    def flush(self) -> None:
        """Write every pending update to the series (call on the thread that records them)."""
        self._flush_due = False
        counts, self._counts = self._counts, {}
        hists, self._hists = self._hists, {}
        for child, n in counts.items():
            child.inc(n)
        for hist, acc in hists.items():
            _bulk_observe(hist, acc[0], acc[1:])

    def observe(
        self, model: str, version: str, role: str, status: int, seconds: float, route: str
    ) -> None:
        key = (model, version, role, route, status)
        child = self._request_children.get(key)
        if child is None:
            child = self.requests.labels(model, version, role, route, str(status))
            self._request_children[key] = child
        self._add(child)
        lkey = (model, version, role, route)
        hist = self._latency_children.get(lkey)
        if hist is None:
            hist = self.latency.labels(model, version, role, route)
            self._latency_children[lkey] = hist
        self._sample(hist, LATENCY_BUCKETS, seconds)

    def tally_classes(self, model: str, version: str, into: dict[int, int]) -> None:
        """Also count ``version``'s predicted classes into ``into`` (the loaded version's own
        tally, reported by ``/admin/stats``); a version loaded again replaces its old tally."""
        self._tallies[(model, version)] = into

    def observe_predictions(self, model: str, version: str, role: str, logits: np.ndarray) -> None:
        """Count the predicted class of every row of ``logits`` (``[rows, classes]``).

        One argmax and one bincount per answer, whatever its rows: no Python loop over rows.
        """
        if logits.ndim != 2 or logits.shape[1] == 0:
            return  # no class to count (the answer's encoder refuses such output anyway)
        tally = self._tallies.get((model, version))
        if logits.shape[0] == 1:  # batch 1, the common case: skip bincount's allocation
            cls = int(logits[0].argmax())
            self._add(self._class_child(model, version, role, cls))
            if tally is not None:
                tally[cls] = tally.get(cls, 0) + 1
            return
        counts = np.bincount(logits.argmax(axis=1))
        for cls in np.flatnonzero(counts).tolist():
            n = int(counts[cls])
            self._add(self._class_child(model, version, role, cls), n)
            if tally is not None:
                tally[cls] = tally.get(cls, 0) + n

    def _class_child(self, model: str, version: str, role: str, cls: int) -> Counter:
        key = (model, version, role, cls)
        child = self._class_children.get(key)
        if child is None:
            child = self.predictions.labels(model, version, role, str(cls))
            self._class_children[key] = child
        return child

    def heartbeat(self, model: str, healthy: bool, when: float) -> None:
        """Record a watchdog heartbeat for ``model`` at unix time ``when``."""
        self.watchdog_heartbeat.labels(model).set(when)
        self.watchdog_healthy.labels(model).set(1 if healthy else 0)

    def observe_batch(self, model: str, version: str, rows: int, waits: list[float]) -> None:
        key = (model, version)
        pair = self._batch_children.get(key)
        if pair is None:
            pair = (self.batch_size.labels(model, version), self.queue_delay.labels(model, version))
            self._batch_children[key] = pair
        self._sample(pair[0], BATCH_BUCKETS, rows)
        for w in waits:
            self._sample(pair[1], QUEUE_BUCKETS, w)

    def set_deployment(
        self, model: str, roles: dict[str, str], weight: int, shadow_fraction: float = 0.0
    ) -> None:
        """Publish the deployment now in force; ``roles`` maps version -> role."""
        if model not in self._deployment_models:
            # Each (model, result) series starts at 0, so that increase() sees its first event.
            self._deployment_models.add(model)
            for result in DEPLOYMENT_RESULTS:
                self.deployments.labels(model, result)
        wanted = {(model, version, role) for version, role in roles.items()}
        for labels in wanted - self._info_labels:
            # Each serving version's failure series start at 0 too: a series born at 1 reads as
            # no increase, and the canary's first errors (before a scrape) would not count
            # against its error budget.
            for route in SERVED_ROUTES:
                self.requests.labels(*labels, route, "500")
        for labels in self._info_labels - wanted:
            if self.multiprocess:
                self.deployment_info.labels(*labels).set(0)
            else:
                self.deployment_info.remove(*labels)
        for labels in wanted:
            self.deployment_info.labels(*labels).set(1)
        self._info_labels = wanted if not self.multiprocess else self._info_labels | wanted
        for stale in self._weight_models - {model}:
            if self.multiprocess:
                self.canary_weight.labels(stale).set(0)
                self.shadow_fraction.labels(stale).set(0)
            else:
                self.canary_weight.remove(stale)
                self.shadow_fraction.remove(stale)
        self.canary_weight.labels(model).set(weight)
        self.shadow_fraction.labels(model).set(shadow_fraction)
        self._weight_models = {model}

    def clear_deployment(self) -> None:
        """Nothing is deployed any more: no version serves, no weights."""
        for labels in self._info_labels:
            if self.multiprocess:
                self.deployment_info.labels(*labels).set(0)
            else:
                self.deployment_info.remove(*labels)
        for model in self._weight_models:
            if self.multiprocess:
                self.canary_weight.labels(model).set(0)
                self.shadow_fraction.labels(model).set(0)
            else:
                self.canary_weight.remove(model)
                self.shadow_fraction.remove(model)
        self._info_labels = set()
        self._weight_models = set()

    def render(self) -> bytes:
        folder = multiprocess_dir()
        if folder is None:
            return generate_latest(self.registry)
        from prometheus_client import multiprocess

        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged, path=folder)
        return generate_latest(merged)
