"""A small synchronous client of the serving gateway's HTTP API (see ``infra/gateway``).

Routes: ``GET /healthz``, ``GET /readyz``, ``GET|PUT /admin/deployment``, ``GET /admin/stats``,
``GET /admin/replicas``, ``GET /admin/shadow`` and ``POST /admin/watchdog/heartbeat``
(``Authorization: Bearer <token>``),
``POST /v1/models/{model}/predict`` (JSON, or a float32 array as ``application/x-npy``). Every
answer but a 2xx comes back as a :class:`GatewayHTTPError` carrying the server's own message; a
2xx whose body is not the JSON the route returns (a proxy's login page, say) as a
:class:`~ballast.errors.GatewayError` naming the route and the start of the body.
"""

from __future__ import annotations

import io
import socket
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar
from urllib.parse import quote

import httpx
from pydantic import ValidationError

from ballast.errors import GatewayError
from ballast.localise import FaultReport
from ballast.serving import NPY_MEDIA_TYPE, Deployment, PredictResponse, if_match_header

if TYPE_CHECKING:
    import numpy as np

    from ballast.settings import Settings

__all__ = [
    "KEY_HEADER",
    "REQUEST_ID_HEADER",
    "VERSION_HEADER",
    "GatewayClient",
    "GatewayHTTPError",
    "gateway_urls",
    "pod_urls",
]

VERSION_HEADER = "X-Ballast-Version"
KEY_HEADER = "X-Ballast-Key"
REQUEST_ID_HEADER = "X-Request-Id"

_T = TypeVar("_T")


class GatewayHTTPError(GatewayError):
    """The gateway answered with anything but a 2xx: a 4xx/5xx, or a 3xx, which is not followed
    (an admin token goes to the gateway, never to wherever a proxy points). ``version`` is set
    when a model version answered; ``request_id`` (inference routes) finds the gateway's log line
    of the failure."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int,
        version: str | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.version = version
        self.request_id = request_id


# How long a deployment change may take to be answered: loading and warming the versions, then
# the gateway's wait for its peers (converge_timeout_s, 5 s), with a wide margin for big models.
CHANGE_TIMEOUT_S = 120.0


def _observations_page(data: Any) -> dict[str, Any]:
    page = _json_object(data)
    ok = (
        isinstance(page.get("replica"), str)
        and isinstance(page.get("started"), int | float)
        and isinstance(page.get("next"), int)
        and isinstance(page.get("observations"), list)
    )
    if not ok:
        raise ValueError("an observations page has replica, started, next and observations")
    return page


class PodFaultReport(NamedTuple):
    """One pod's answer to ``/admin/failures``."""

    pod: str  # its host name
    folder: str  # its failure folder's id: the same for two addresses of one pod
    report: FaultReport


class GatewayClient:
    """``with GatewayClient(url, token) as gw: gw.set_deployment(dep)``.

    ``health()`` and ``ready()`` answer False when the gateway cannot be reached; every other
    call raises :class:`~ballast.errors.GatewayError` (unreachable, or an answer that is not the
    route's) or :class:`GatewayHTTPError` (refused).
    """

    def __init__(
        self,
        base_url: str,
        admin_token: str | None = None,
        timeout: float = 5.0,
        change_timeout: float = CHANGE_TIMEOUT_S,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        # A token pasted with its newline (a Secret made from a file) is still the token.
        self._token = admin_token.strip() if admin_token else admin_token
        self._change_timeout = change_timeout
        # trust_env=False: a proxy from the environment must never see admin tokens or traffic.
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout, trust_env=False)

    def __repr__(self) -> str:  # never show the token
        return f"GatewayClient({self.base_url!r})"

    # -- plumbing ------------------------------------------------------------------------------

    def _admin_headers(self) -> dict[str, str]:
        if not self._token:
            raise GatewayError("this GatewayClient has no admin token")
        return {"Authorization": f"Bearer {self._token}"}

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            resp = self._http.request(method, path, **kwargs)
        except (httpx.HTTPError, httpx.InvalidURL, UnicodeEncodeError) as exc:
            # The message may quote the request's headers (an illegal header value): never the
            # token.
            detail = str(exc).replace(self._token, "***") if self._token else str(exc)
            raise GatewayError(
                f"gateway at {self.base_url} unreachable: {type(exc).__name__}: {detail}"
            ) from None
        if not resp.is_success:
            raise GatewayHTTPError(
                f"gateway {method} {path} -> {resp.status_code}: {_message(resp)}",
                status_code=resp.status_code,
                version=resp.headers.get(VERSION_HEADER),
                request_id=resp.headers.get(REQUEST_ID_HEADER),
            )
        return resp

    def _call(self, method: str, path: str, parse: Callable[[Any], _T], **kwargs: Any) -> _T:
        """``method path`` (as :meth:`_request`), its JSON body read by ``parse``.

        A body that is not JSON, or that ``parse`` refuses (a pydantic ``ValidationError`` or any
        ``ValueError``), raises :class:`GatewayError` naming the route and the body's first 200
        characters: a caller handles one error family, never a parser's.
        """
        resp = self._request(method, path, **kwargs)
        try:
            return parse(resp.json())
        except (ValueError, ValidationError) as exc:
            raise GatewayError(
                f"gateway {method} {path} -> {resp.status_code} answered an unexpected body "
                f"({type(exc).__name__}: {_first_line(exc)}): {resp.text[:200]!r}"
            ) from exc

    def _probe(self, path: str) -> bool:
        try:
            return self._http.get(path).status_code == 200
        except httpx.HTTPError:
            return False

    # -- API -----------------------------------------------------------------------------------

    def health(self) -> bool:
        """True when the gateway process answers (``/healthz``)."""
        return self._probe("/healthz")

    def instance(self) -> str | None:
        """The id ``/healthz`` says its gateway was started with (None: no answer, or none)."""
        try:
            resp = self._http.get("/healthz")
            if resp.status_code != 200:
                return None
            value = resp.json().get("instance")
        except (httpx.HTTPError, ValueError, AttributeError):
            return None
        return value if isinstance(value, str) else None

    def ready(self) -> bool:
        """True when a deployment is set and all its versions are loaded and warm (``/readyz``)."""
        return self._probe("/readyz")

    def get_deployment(self) -> Deployment | None:
        return self._call(
            "GET",
            "/admin/deployment",
            lambda data: None if data is None else Deployment.model_validate(data),
            headers=self._admin_headers(),
        )

    def set_deployment(
        self, dep: Deployment, *, expect: Sequence[Deployment | None] = ()
    ) -> Deployment:
        """Apply ``dep``; returns the deployment the gateway confirms is now in force.

        On refusal (bad hash 409, missing or unloadable artefact 422) the previous deployment
        stays in force and this raises with the gateway's reason. With ``expect``, only while
        the desired state in force is one of those deployments (None: nothing deployed), a
        compare-and-set: else :class:`GatewayHTTPError` with status 412 and nothing changes.
        """
        headers = {**self._admin_headers(), "Content-Type": "application/json"}
        if expect:
            headers["If-Match"] = if_match_header(expect)
        return self._call(
            "PUT",
            "/admin/deployment",
            Deployment.model_validate,
            content=dep.model_dump_json(),
            headers=headers,
            # The gateway answers once the change is applied (new versions verified, loaded,
            # warmed) and its peers converged, or its wait for them ran out (5 s): far longer
            # than a read. Timing out sooner reported applied changes as failures.
            timeout=httpx.Timeout(5.0, read=self._change_timeout),
        )

    def predict(
        self, model: str, instances: list[list[float]], key: str | None = None
    ) -> PredictResponse:
        """Predict ``instances``; ``key`` pins a client to one version at a given weight."""
        headers = {KEY_HEADER: key} if key is not None else {}
        return self._call(
            "POST",
            f"/v1/models/{quote(model, safe='')}/predict",
            PredictResponse.model_validate,
            json={"instances": instances},
            headers=headers,
        )

    def predict_array(self, model: str, x: np.ndarray, key: str | None = None) -> PredictResponse:
        """Predict a float32 ``[rows, features]`` array sent as ``application/x-npy`` (compact)."""
        import numpy as np

        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(x, dtype=np.float32), allow_pickle=False)
        headers = {"Content-Type": NPY_MEDIA_TYPE}
        if key is not None:
            headers[KEY_HEADER] = key
        return self._call(
            "POST",
            f"/v1/models/{quote(model, safe='')}/predict",
            PredictResponse.model_validate,
            content=buf.getvalue(),
            headers=headers,
        )

    def _admin_object(self, path: str) -> dict[str, Any]:
        return self._call("GET", path, _json_object, headers=self._admin_headers())

    def stats(self) -> dict[str, Any]:
        """Per-version counters and recent latency percentiles (``/admin/stats``)."""
        return self._admin_object("/admin/stats")

    def replicas(self) -> dict[str, Any]:
        """The answering replica and its live peers, with what each serves (``/admin/replicas``)."""
        return self._admin_object("/admin/replicas")

    def observations(self, cursors: dict[str, int], limit: int = 5000) -> dict[str, Any]:
        """Answers the reached replica gave after its cursor in ``cursors`` (``/admin/observations``)."""
        query = ",".join(f"{name}={seq}" for name, seq in cursors.items())
        return self._call(
            "GET",
            "/admin/observations",
            _observations_page,
            params={"cursors": query, "limit": limit},
            headers=self._admin_headers(),
        )

    def failures(
        self,
        model: str,
        version: str,
        since: datetime,
        until: datetime | None = None,
        *,
        min_status: int = 500,
        context: int = 20,
    ) -> PodFaultReport:
        """The reached pod's fault report for ``version`` (``/admin/failures``), from every
        replica's failure files there."""

        def parse(body: Any) -> PodFaultReport:
            report = FaultReport.from_dict(body)
            if (report.model, report.version) != (model, version):
                raise ValueError(f"a report of {report.model} version {report.version}")
            pod = str(body.get("pod") or self.base_url)
            return PodFaultReport(pod, str(body.get("folder") or pod), report)

        params: dict[str, str | int] = {
            "model": model,
            "version": version,
            "since": _utc(since),
            "min_status": min_status,
            "context": context,
        }
        if until is not None:
            params["until"] = _utc(until)
        return self._call(
            "GET", "/admin/failures", parse, params=params, headers=self._admin_headers()
        )

    def shadow(self) -> dict[str, Any]:
        """Shadow agreement with the primary and recent disagreements (``/admin/shadow``)."""
        return self._admin_object("/admin/shadow")

    def watchdog_heartbeat(self, model: str, healthy: bool, detail: str = "") -> None:
        """Tell the gateway the champion watchdog ran for ``model`` and what it found.

        Sets ``ballast_watchdog_heartbeat_timestamp_seconds{model}`` (now) and
        ``ballast_watchdog_healthy{model}`` (1/0), which the BallastWatchdogSilent alert reads.
        Needs the operator role; ``detail`` is at most 1000 characters (422 beyond).
        """
        self._request(
            "POST",
            "/admin/watchdog/heartbeat",
            json={"model": model, "healthy": healthy, "detail": detail},
            headers=self._admin_headers(),
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> GatewayClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# (host, port, family, type) -> getaddrinfo's rows; a parameter so tests can stand in for a DNS
# server answering with several addresses (none runs here).
Resolver = Callable[..., Sequence[tuple[Any, ...]]]


def pod_urls(host: str, port: int, *, resolve: Resolver | None = None) -> list[str]:
    """``http://address:port`` for every address ``host`` resolves to, in the resolver's order,
    each once.

    For a Kubernetes headless Service (``clusterIP: None``) that is one address per ready pod,
    where the gateway's ordinary Service name gives one virtual address that lands on one pod
    per connection. ``resolve``: ``socket.getaddrinfo`` unless given. Raises
    :class:`~ballast.errors.GatewayError` when ``host`` does not resolve.
    """
    # "[::1]" (a URL's form of an IPv6 address, which the host settings take) resolves bare.
    name = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        rows = (resolve or socket.getaddrinfo)(name, port, 0, socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:  # socket.gaierror is an OSError
        raise GatewayError(f"gateway pods host {host!r} does not resolve: {exc}") from None
    urls: list[str] = []
    for family, *_, sockaddr in rows:
        address, at = str(sockaddr[0]), int(sockaddr[1])
        url = f"http://[{address}]:{at}" if family == socket.AF_INET6 else f"http://{address}:{at}"
        if url not in urls:
            urls.append(url)
    if not urls:
        raise GatewayError(f"gateway pods host {host!r} resolves to no address")
    return urls


def gateway_urls(s: Settings) -> list[str]:
    """Where the gateway answers: every pod's address when ``gateway_pods_host`` names them (a
    headless Service), else ``gateway_url``. Raises GatewayError if the pods' name does not
    resolve."""
    if s.gateway_pods_host is None:
        return [s.gateway_url]
    return pod_urls(s.gateway_pods_host, s.gateway_pods_port or s.gateway_port)


def ask_each(
    urls: Sequence[str], token: str | None, call: Callable[[GatewayClient], _T]
) -> tuple[list[_T], list[str]]:
    """``call`` with a client of each gateway (pod) in ``urls``: the answers of those that
    answered, in order, and the messages of those that did not (a :class:`GatewayError`)."""
    answers: list[_T] = []
    failed: list[str] = []
    for url in urls:
        try:
            with GatewayClient(url, token) as gw:
                answers.append(call(gw))
        except GatewayError as exc:
            failed.append(exc.message)
    return answers, failed


def _json_object(data: Any) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ValueError(f"{type(data).__name__}, not an object")
    return data


def _first_line(exc: Exception) -> str:
    lines = str(exc).splitlines()
    return lines[0] if lines else ""


def _message(resp: httpx.Response) -> str:
    if resp.is_redirect:
        return f"redirect to {resp.headers.get('location')!r}, not followed"
    try:
        data = resp.json()
    except ValueError:
        return resp.text[:500] or resp.reason_phrase
    if isinstance(data, dict) and isinstance(data.get("error"), str):
        return data["error"]
    return str(data)[:500]


def _utc(t: datetime) -> str:
    """ISO 8601 in UTC with a Z: a '+' in a query string would read as a space."""
    aware = t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)
    return aware.isoformat().replace("+00:00", "Z")
