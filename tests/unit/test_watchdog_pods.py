"""The champion watchdog over a gateway of several pods: every pod's address from one name
(``pod_urls``) and their ``/admin/stats`` answers read as one (``merge_pod_stats``).

Replicas share a board only within a pod, so before this each run judged whichever pod its
connection reached. The resolver is injected: a DNS server answering with several addresses
(a Kubernetes headless Service) does not run here.
"""

from __future__ import annotations

import socket
from typing import Any

import pytest

from ballast.errors import GatewayError
from ballast.gateway_client import pod_urls
from ballast.watchdog import merge_pod_stats, observe_replicas
from tests.unit.test_watchdog import _with_peers, stats


def pod(replicas: dict[str, tuple[int, int]], **kw: Any) -> dict[str, Any]:
    """A pod's answer: its first replica answers, the others are on its board."""
    (me, (n, e)), *peers = replicas.items()
    return _with_peers(stats(n, e, **kw), me, {r: stats(pn, pe, **kw) for r, (pn, pe) in peers})


def window(answers: list[dict[str, Any]], before: list[dict[str, Any]]) -> tuple[int, int, str]:
    """(requests, errors, replicas) of the window between two runs that read ``before`` and
    then ``answers``."""
    first = observe_replicas(
        merge_pod_stats(before, model="m", version="3"),
        model="m",
        version="3",
        last_snapshot=None,
    )
    obs = observe_replicas(
        merge_pod_stats(answers, model="m", version="3"),
        model="m",
        version="3",
        last_snapshot=first.snapshot,
    )
    assert obs.available and not obs.first, obs
    return obs.requests, obs.errors, str(obs.replica)


def test_every_pods_replicas_are_one_window_and_a_failing_pod_is_not_missed() -> None:
    before = [pod({"a1": (100, 0), "a2": (100, 0)}), pod({"b1": (100, 0), "b2": (100, 100)})]
    # Pod b's second replica fails every request.
    after = [pod({"a1": (200, 0), "a2": (200, 0)}), pod({"b1": (200, 0), "b2": (200, 200)})]
    assert window(after, before) == (400, 100, "4 replicas")
    # What one pod's answer alone gave: pod a's run saw no error at all.
    assert window(after[:1], before[:1]) == (200, 0, "2 replicas")


def test_two_addresses_reaching_one_pod_count_its_replicas_once_and_their_own_counters_win() -> (
    None
):
    # Two connections to one pod reach its two replicas: each answers with its own counters
    # and the other's board entry, up to a heartbeat old (a2's 150 and a1's 160 here).
    before = [pod({"a1": (100, 0), "a2": (100, 0)})]
    after = [pod({"a1": (200, 10), "a2": (150, 0)}), pod({"a2": (300, 30), "a1": (160, 0)})]
    assert window(after, before) == (300, 40, "2 replicas")
    # The same answer twice (two addresses, one replica) counts once: a1's 100 and a2's 50.
    assert window([after[0], after[0]], before) == (150, 10, "2 replicas")


def test_answers_for_another_model_add_nothing_and_none_serving_it_is_unavailable() -> None:
    other = pod({"x1": (9000, 9000)}, model="other")
    before = [other, pod({"a1": (100, 0)})]
    after = [other, pod({"a1": (150, 5)})]
    assert window(after, before) == (50, 5, "a1")
    merged = merge_pod_stats([other], model="m")
    obs = observe_replicas(merged, model="m", version="3", last_snapshot=None)
    assert not obs.available and "'other'" in obs.reason
    assert merge_pod_stats([], model="m") == {}


@pytest.mark.parametrize(
    ("weights", "fractions", "active"),
    [((0, 0), (0.0, 0.0), False), ((0, 10), (0.0, 0.0), True), ((0, 0), (0.0, 0.2), True)],
)
def test_a_trial_in_force_on_any_pod_counts(
    weights: tuple[int, int], fractions: tuple[float, float], active: bool
) -> None:
    answers = [
        pod({f"p{i}": (100, 0)}, canary_weight=w, shadow_fraction=f)
        for i, (w, f) in enumerate(zip(weights, fractions, strict=True))
    ]
    merged = merge_pod_stats(answers, model="m")
    assert merged["canary_weight"] == max(weights)
    assert merged["shadow_fraction"] == max(fractions)
    obs = observe_replicas(merged, model="m", version="3", last_snapshot=None)
    assert obs.canary_active is active


def test_a_pod_still_on_another_version_first_in_the_list_does_not_hide_the_others() -> None:
    # Pod a still serves version 2 (its load of champion 3 keeps failing); pod b serves 3 and
    # fails half its requests. Before: with a first in the resolver's order every run was
    # "unavailable" (a pod that does not serve the champion), never judged.
    late = pod({"a1": (500, 0)}, version="2")
    before = [late, pod({"b1": (100, 0)})]
    after = [late, pod({"b1": (200, 50)})]
    assert window(after, before) == (100, 50, "b1")
    merged = merge_pod_stats(after, model="m", version="3")
    assert merged["replica"] == "b1" and [r["replica"] for r in merged["replicas"]] == ["a1"]
    # Without the version to look for, the resolver's order stands (what the fix changed).
    assert merge_pod_stats(after, model="m")["replica"] == "a1"


def test_a_run_over_more_replicas_than_the_snapshot_keeps_still_gives_a_window() -> None:
    from ballast.watchdog import SNAPSHOT_REPLICAS

    n = SNAPSHOT_REPLICAS + 6  # e.g. 10 pods of 7 workers

    def pods(count: int, errors_of_last: int) -> list[dict[str, Any]]:
        return [pod({f"p{i}": (count, errors_of_last if i == n - 1 else 0)}) for i in range(n)]

    # Before: each replica's look evicted one not yet read, so every run was a first look.
    assert window(pods(200, 40), pods(100, 0)) == (100 * n, 40, f"{n} replicas")


def _rows(*addresses: tuple[int, str, int]) -> Any:
    def resolve(host: str, port: int, family: int, kind: int) -> list[tuple[Any, ...]]:
        assert (host, port, kind) == ("ballast-gateway-pods", 80, socket.SOCK_STREAM)
        return [
            (fam, kind, 6, "", (a, p) if fam == socket.AF_INET else (a, p, 0, 0))
            for fam, a, p in addresses
        ]

    return resolve


def test_pod_urls_are_every_address_once_in_the_resolvers_order() -> None:
    resolve = _rows(
        (socket.AF_INET, "10.0.0.7", 80),
        (socket.AF_INET, "10.0.0.5", 80),
        (socket.AF_INET, "10.0.0.7", 80),  # getaddrinfo repeats an address per protocol
        (socket.AF_INET6, "fd00::5", 80),
    )
    assert pod_urls("ballast-gateway-pods", 80, resolve=resolve) == [
        "http://10.0.0.7:80",
        "http://10.0.0.5:80",
        "http://[fd00::5]:80",
    ]


def test_pod_urls_refuse_a_name_that_does_not_resolve_or_has_no_address() -> None:
    def gone(*args: Any) -> list[tuple[Any, ...]]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    with pytest.raises(GatewayError, match="'ballast-gateway-pods' does not resolve"):
        pod_urls("ballast-gateway-pods", 80, resolve=gone)
    with pytest.raises(GatewayError, match="resolves to no address"):
        pod_urls("ballast-gateway-pods", 80, resolve=_rows())


def test_pod_urls_with_the_systems_resolver() -> None:
    assert pod_urls("127.0.0.1", 8123) == ["http://127.0.0.1:8123"]
    # An IPv6 address as the host settings take it (bracketed) resolves as itself.
    assert pod_urls("[::1]", 8123) == ["http://[::1]:8123"]
