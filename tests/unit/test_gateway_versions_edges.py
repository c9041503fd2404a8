"""Routing and counting edges of the gateway's versions a mutation-testing pass found unchecked
(2026-11-29): unsalted sticky keys, a 1 % canary, feature counts, latency percentiles, status
classes."""

from __future__ import annotations

import hashlib
import random
from types import SimpleNamespace

import pytest

from ballast.serving import Deployment, VersionSpec
from infra.gateway.versions import Live, LoadedVersion, Slot, _feature_count


def spec(v):
    return VersionSpec(version=v, artifact_path=f"/a/{v}.onnx", sha256="0" * 64)


def live(weight, salt=None):
    ch, ca = spec("1"), spec("2")
    dep = Deployment(model="m", champion=ch, canary=ca, canary_weight=weight, key_salt=salt)
    return Live(dep, Slot("champion", ch, None), Slot("canary", ca, None))  # type: ignore[arg-type]


def test_v1_unsalted_keys_are_salted_with_the_canary_version():
    lv = live(10)
    want = hashlib.blake2b(b"2\0user-1", digest_size=8).hexdigest()
    assert lv.key_id("user-1") == want


def test_v2_one_percent_canary_gets_traffic():
    lv = live(1)
    rng = random.Random(0)
    n = sum(lv.route(None, rng) is lv.canary for _ in range(20_000))
    assert 120 <= n <= 280  # ~200 expected
    keyed = sum(lv.route(lv.key_id(f"u{i}"), rng) is lv.canary for i in range(20_000))
    assert 120 <= keyed <= 280


def test_v3_feature_count():
    assert _feature_count(SimpleNamespace(n_features=1)) == 1
    assert _feature_count(SimpleNamespace(n_features=0)) is None
    assert _feature_count(SimpleNamespace()) is None
    assert _feature_count(SimpleNamespace(n_features=2.0)) is None


def lv_with(latencies):
    v = LoadedVersion(
        spec=spec("1"),
        predictor=None,
        n_features=1,
        fault_rng=random.Random(0),  # type: ignore[arg-type]
        window=1000,
        n_classes=2,
    )
    for s in latencies:
        v.latencies.append(s)
    return v


def test_v4_latency_percentiles_in_ms():
    v = lv_with([i / 1000 for i in range(1, 101)])  # 1..100 ms
    lat = v.latency_ms()
    assert lat["p50"] == pytest.approx(50.5)
    assert lat["p95"] == pytest.approx(95.05)
    assert lat["p99"] == pytest.approx(99.01)


def test_v5_record_counts_by_status_class():
    v = lv_with([])
    for st in (200, 399, 400, 404, 499, 500, 503):
        v.record(st, 0.001)
    assert (v.requests, v.client_errors, v.errors) == (7, 3, 2)
