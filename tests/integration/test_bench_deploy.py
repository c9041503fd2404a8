"""What the serving benchmarks deploy on a real gateway process: one version, or a canary that
is a copy of the champion's file or a model of its own."""

from __future__ import annotations

from pathlib import Path

import pytest

from ballast.bench.serving import _deploy, _gateway_process
from ballast.gateway_client import GatewayClient
from ballast.hashing import sha256_file
from infra.gateway.testing import build_mlp_onnx

pytestmark = pytest.mark.integration


def test_bench_deploys_one_version_a_copied_canary_or_its_own(tmp_path: Path) -> None:
    champion = build_mlp_onnx(tmp_path / "model.onnx", seed=0)
    tiny = build_mlp_onnx(tmp_path / "tiny.onnx", seed=1, hidden=(4,))
    with _gateway_process(tmp_path, 1, []) as (gw, token), GatewayClient(gw.url, token) as client:
        url = gw.url
        _deploy(url, token, "m", champion, None)
        dep = client.get_deployment()
        assert dep is not None and dep.canary is None
        assert dep.champion is not None and dep.champion.sha256 == sha256_file(champion)

        _deploy(url, token, "m", champion, 10)  # a copy: same bytes, another file and session
        dep = client.get_deployment()
        assert dep is not None and dep.canary is not None and dep.canary_weight == 10
        assert dep.canary.sha256 == sha256_file(champion)
        assert Path(dep.canary.artifact_path) != champion

        _deploy(url, token, "m", champion, 0, tiny)  # loaded, but no traffic
        dep = client.get_deployment()
        assert dep is not None and dep.canary is not None and dep.canary_weight == 0
        assert dep.canary.sha256 == sha256_file(tiny)
        assert {client.predict("m", [[0.5] * 30]).version for _ in range(20)} == {"1"}


def test_bench_serving_measures_the_split_in_alternating_rounds(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A short real run of ``ballast bench serving`` (wrk, two gateway processes): its JSON
    carries a row per server and concurrency and the split's paired comparison. The figures
    themselves are the benchmark's business, not this test's."""
    import json
    import shutil

    from ballast.bench.serving import main

    if shutil.which("wrk") is None:
        pytest.fail("wrk is not installed (.ci/run installs it: apt-get install wrk)")
    argv = ["--seconds", "1", "--concurrency", "4", "--split-rounds", "6", "--split-seconds", "1"]
    assert main([*argv, "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    servers = [(r["server"], r["concurrency"]) for r in out["rows"]]
    assert ("gateway, 1 version, 1 worker", 4) in servers
    assert ("gateway, 90/10 split + metrics, 1 worker", 4) in servers
    assert all(r["errors"] == 0 and r["rps"] > 0 for r in out["rows"] if r["concurrency"])
    (cost,) = out["split_cost"]
    assert (cost["workers"], cost["concurrency"], cost["rounds"]) == (1, 64, 6)
    for change in (cost["rps_change"], cost["cpu_change"]):
        assert change["rounds"] == 6
        # Six rounds reach 95 % only with the extremes: the interval spans every change.
        assert change["low"] <= change["q1"] <= change["median"] <= change["q3"] <= change["high"]


def test_canary_latency_parity_reads_both_versions_from_the_gateways_observations(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A short real run of ``benchmarks/canary_latency_parity.py`` (wrk, a gateway process)."""
    import re
    import sys

    bench = Path(__file__).resolve().parents[2] / "benchmarks"
    sys.path.insert(0, str(bench))
    try:
        import canary_latency_parity
    finally:
        sys.path.remove(str(bench))
    assert canary_latency_parity.main(["--concurrency", "8", "--seconds", "1"]) == 0
    out = capsys.readouterr().out
    m = re.search(
        r"c=  8  answers +(\d+)  p50 ms champion +[\d.]+ canary +[\d.]+  p95 ms champion +[\d.]+ "
        r"canary +[\d.]+  above the champion's p95: champion +([\d.]+)% canary +([\d.]+)%",
        out,
    )
    assert m, out
    # The champion's own share above its p95 is about 5 % by definition; both were observed.
    assert int(m[1]) > 100 and 3.0 <= float(m[2]) <= 7.0, out
