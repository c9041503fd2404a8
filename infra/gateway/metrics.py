"""Prometheus series of one gateway, on a registry of its own (no global state at import)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

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


class GatewayMetrics:
    """The gateway's series. Label children are cached because ``labels()`` is hot-path work."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "ballast_requests",
            "Predict requests answered by a version.",
            ["model", "version", "role", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "ballast_request_latency_seconds",
            "Server-side latency of predict requests answered by a version.",
            ["model", "version", "role"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.rejected = Counter(
            "ballast_rejected_requests",
            "Predict requests refused before any version saw them.",
            ["reason"],
            registry=self.registry,
        )
        self.canary_weight = Gauge(
            "ballast_canary_weight",
            "Percent of traffic routed to the canary.",
            ["model"],
            registry=self.registry,
        )
        self.deployment_info = Gauge(
            "ballast_deployment_info",
            "1 for each version the current deployment serves, labelled with its role.",
            ["model", "version", "role"],
            registry=self.registry,
        )
        self.deployments = Counter(
            "ballast_deployments",
            "Deployment changes by result (applied, refused, invalid).",
            ["model", "result"],
            registry=self.registry,
        )
        self._request_children: dict[tuple[str, str, str, int], Counter] = {}
        self._latency_children: dict[tuple[str, str, str], Histogram] = {}
        self._info_labels: set[tuple[str, str, str]] = set()
        self._weight_models: set[str] = set()

    def observe(self, model: str, version: str, role: str, status: int, seconds: float) -> None:
        key = (model, version, role, status)
        child = self._request_children.get(key)
        if child is None:
            child = self.requests.labels(model, version, role, str(status))
            self._request_children[key] = child
        child.inc()
        lkey = (model, version, role)
        hist = self._latency_children.get(lkey)
        if hist is None:
            hist = self.latency.labels(model, version, role)
            self._latency_children[lkey] = hist
        hist.observe(seconds)

    def set_deployment(self, model: str, roles: dict[str, str], weight: int) -> None:
        """Publish the deployment now in force; ``roles`` maps version -> role."""
        wanted = {(model, version, role) for version, role in roles.items()}
        for labels in self._info_labels - wanted:
            self.deployment_info.remove(*labels)
        for labels in wanted:
            self.deployment_info.labels(*labels).set(1)
        self._info_labels = wanted
        for stale in self._weight_models - {model}:
            self.canary_weight.remove(stale)
        self.canary_weight.labels(model).set(weight)
        self._weight_models = {model}

    def render(self) -> bytes:
        return generate_latest(self.registry)
