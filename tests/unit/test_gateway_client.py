"""The gateway's HTTP client (ballast/gateway_client.py) against answers it did not expect.

Every call but ``health()``/``ready()`` promises one error family: :class:`GatewayError`
(unreachable, or an answer that is not the route's) and its :class:`GatewayHTTPError` (anything
but a 2xx). Served by :class:`httpx.MockTransport`: no gateway, no sockets.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import numpy as np
import pytest

from ballast.errors import GatewayError
from ballast.gateway_client import GatewayClient, GatewayHTTPError
from ballast.serving import Deployment

Handler = Callable[[httpx.Request], httpx.Response]

#: Each public call that reads an answer, with the route it calls.
CALLS: dict[str, tuple[str, Callable[[GatewayClient], Any]]] = {
    "get_deployment": ("GET /admin/deployment", lambda gw: gw.get_deployment()),
    "set_deployment": (
        "PUT /admin/deployment",
        lambda gw: gw.set_deployment(Deployment(model="m")),
    ),
    "predict": ("POST /v1/models/m/predict", lambda gw: gw.predict("m", [[1.0]])),
    "predict_array": (
        "POST /v1/models/m/predict",
        lambda gw: gw.predict_array("m", np.ones((1, 1), dtype=np.float32)),
    ),
    "stats": ("GET /admin/stats", lambda gw: gw.stats()),
    "replicas": ("GET /admin/replicas", lambda gw: gw.replicas()),
    "shadow": ("GET /admin/shadow", lambda gw: gw.shadow()),
    "observations": ("GET /admin/observations", lambda gw: gw.observations({"r1": 0})),
}


def client(handler: Handler) -> GatewayClient:
    gw = GatewayClient("http://gw", admin_token="t")
    gw._http = httpx.Client(base_url="http://gw", transport=httpx.MockTransport(handler))
    return gw


@pytest.mark.parametrize("name", sorted(CALLS))
def test_a_2xx_whose_body_is_not_json_raises_a_gateway_error_naming_the_route(name: str) -> None:
    # Given a proxy that answers every route with a long HTML login page
    page = "<html>login" + "x" * 400 + "</html>"
    route, call = CALLS[name]
    gw = client(lambda _: httpx.Response(200, text=page))
    # When the call reads the answer, then it raises the client's own error, not a parser's
    with gw, pytest.raises(GatewayError) as info:
        call(gw)
    assert not isinstance(info.value, GatewayHTTPError), "a 200 is not a refusal"
    message = str(info.value)
    assert route in message, f"{message!r} does not name the route {route}"
    assert page[:200] in message and page[:201] not in message, "the body's first 200 chars"


@pytest.mark.parametrize("name", sorted(CALLS))
def test_a_2xx_with_json_of_the_wrong_shape_raises_a_gateway_error(name: str) -> None:
    route, call = CALLS[name]
    # A list is no route's answer: not a Deployment, a PredictResponse nor an object.
    gw = client(lambda _: httpx.Response(200, json=["unexpected"]))
    with gw, pytest.raises(GatewayError) as info:
        call(gw)
    assert not isinstance(info.value, GatewayHTTPError)
    assert route in str(info.value) and "unexpected" in str(info.value)


def test_a_json_object_missing_the_fields_of_a_prediction_raises_a_gateway_error() -> None:
    gw = client(lambda _: httpx.Response(200, json={"unexpected": True}))
    with gw, pytest.raises(GatewayError, match="POST /v1/models/m/predict") as info:
        gw.predict("m", [[1.0]])
    assert "ValidationError" in str(info.value) and info.value.__cause__ is not None


@pytest.mark.parametrize(
    "name", [*sorted(CALLS), "watchdog_heartbeat"], ids=[*sorted(CALLS), "watchdog_heartbeat"]
)
def test_a_redirect_is_not_followed_and_raises_a_gateway_http_error(name: str) -> None:
    # Given a proxy that redirects every route to its login page
    def redirect(_: httpx.Request) -> httpx.Response:
        return httpx.Response(302, headers={"location": "/login"})

    def heartbeat(gw: GatewayClient) -> Any:
        return gw.watchdog_heartbeat("m", healthy=True)

    call = heartbeat if name == "watchdog_heartbeat" else CALLS[name][1]
    gw = client(redirect)
    # When a call meets it, then it is refused with the status and where it pointed
    with gw, pytest.raises(GatewayHTTPError) as info:
        call(gw)
    assert info.value.status_code == 302 and "/login" in str(info.value)


def test_well_formed_answers_still_parse() -> None:
    def handler(req: httpx.Request) -> httpx.Response:
        if req.url.path == "/admin/deployment":
            return httpx.Response(200, content=b"null")  # no deployment set
        if req.url.path == "/v1/models/m/predict":
            return httpx.Response(
                200, json={"version": "1", "predictions": [0], "probabilities": [[0.9, 0.1]]}
            )
        return httpx.Response(200, json={"versions": {}})

    with client(handler) as gw:
        assert gw.get_deployment() is None
        assert gw.predict("m", [[1.0]]).version == "1"
        assert gw.stats() == {"versions": {}}


def test_a_change_is_waited_for_as_long_as_the_gateway_takes_to_apply_it() -> None:
    # The gateway answers a PUT once the versions are loaded and its peers converged (up to
    # its own 5 s wait): before, the 5 s read timeout reported such applied changes as
    # failures ("unreachable"), and the audit log never had them.
    import json
    import threading
    import time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Slow(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def _answer(self) -> None:
            time.sleep(0.6)
            body = json.dumps({"model": "m"}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_PUT(self) -> None:
            self.rfile.read(int(self.headers["content-length"]))
            self._answer()

        do_GET = _answer  # noqa: N815 - http.server's naming

    server = ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        with GatewayClient(url, admin_token="t", timeout=0.3, change_timeout=5.0) as gw:
            assert gw.set_deployment(Deployment(model="m")) == Deployment(model="m")
            with pytest.raises(GatewayError, match="ReadTimeout"):
                gw.get_deployment()  # a read keeps the short timeout
    finally:
        server.shutdown()
        server.server_close()


def test_the_admin_token_never_appears_in_an_error() -> None:
    secret = "s3cr3t-tok€n-value"  # not Latin-1: refused as a header value by the HTTP library
    gw = client(lambda _: httpx.Response(200, content=b"null"))
    gw._token = secret
    with gw, pytest.raises(GatewayError) as info:
        gw.get_deployment()
    assert secret not in str(info.value) and info.value.__cause__ is None
    # A token with the newline of the file it came from is the token.
    seen: list[str] = []

    def record(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers["authorization"])
        return httpx.Response(200, content=b"null")

    padded = GatewayClient("http://gw", admin_token="abc-token\n")
    padded._http = httpx.Client(base_url="http://gw", transport=httpx.MockTransport(record))
    with padded:
        padded.get_deployment()
    assert seen == ["Bearer abc-token"]
