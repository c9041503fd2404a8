"""live_traffic over several pods when one pod's address stops answering (a deleted pod).

A deleted Kubernetes pod's address holds each connection for the client's whole timeout, which
cannot be reproduced on one machine: the HTTP client is replaced by one that answers for a live
pod and raises for the dead one, counting the tries. The same reads against real gateway
processes are in tests/integration/test_canary_live_pods.py.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from ballast import gateway_client
from ballast.canary import live_traffic
from ballast.errors import GatewayError

LIVE, DEAD = "http://10.0.0.5:8765", "http://10.0.0.6:8765"


@pytest.fixture
def tries(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Reads per URL; the live pod answers one candidate answer per read after its first."""
    counts: Counter[str] = Counter()

    class Client:
        def __init__(self, url: str, token: str) -> None:
            self.url = url

        def __enter__(self) -> Client:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def observations(self, cursors: dict[str, int]) -> dict[str, Any]:
            counts[self.url] += 1
            if self.url != LIVE:
                raise GatewayError(f"gateway at {self.url} unreachable: ConnectTimeout")
            seq = counts[self.url]
            rows = [[seq, "2", "canary", True, 0.01, 50, None]]
            return {"replica": "live", "started": 1.0, "next": seq, "observations": rows}

    monkeypatch.setattr(gateway_client, "GatewayClient", Client)
    return counts


def test_a_pod_that_stopped_answering_is_tried_less_and_less_within_a_step(
    tries: Counter[str],
) -> None:
    load = live_traffic(
        "http://gateway", "t", candidate_version="2", min_samples=40, max_seconds=30,
        poll_s=0.0, pods=lambda: [LIVE, DEAD],
    )  # fmt: skip
    got = load(50)
    assert len(got) == 40 and tries[LIVE] == 41  # the first read only finds the replica
    # Tried at polls 1, 3, 7, 15, 31 (then every 16): 5 of 41, each a timeout in a cluster.
    assert tries[DEAD] == 5, tries
    # The next step looks the pods up again and starts over: tried at its first poll, 5 again.
    load(50)
    assert tries[DEAD] == 10


def test_with_every_pod_gone_each_poll_tries_them_all_and_the_canary_ends(
    tries: Counter[str],
) -> None:
    dead = [DEAD, "http://10.0.0.7:8765"]
    load = live_traffic(
        "http://gateway", "t", candidate_version="2", min_samples=1, max_seconds=30,
        poll_s=0.0, pods=lambda: list(dead),
    )  # fmt: skip
    with pytest.raises(GatewayError, match="unreachable"):
        load(50)
    # Six polls, both pods each time: no waiting out a failure when none is left to read.
    assert tries == Counter({DEAD: 6, "http://10.0.0.7:8765": 6})
