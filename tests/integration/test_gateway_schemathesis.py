"""Fuzz the running gateway against its own OpenAPI document with schemathesis.

Every operation gets generated valid and invalid requests; the server must never answer 5xx and
must answer what the document says (status codes, content types, schemas). Two passes:

* every operation with a *viewer* token (so admin writes are refused with 403 and the deployment
  under test stays in place while predict is fuzzed against the deployed model);
* ``PUT /admin/deployment`` with an *operator* token, after the first pass (random but valid
  deployments are applied then, which is fine: nothing else is fuzzed afterwards).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.core.parameters import ParameterLocation
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

from ballast.gateway_client import GatewayClient
from ballast.gateway_process import GatewayProcess
from ballast.serving import Deployment
from ballast.settings import Settings
from infra.gateway.auth import write_tokens_file
from infra.gateway.testing import build_mlp_onnx, spec_for
from tests.conftest import free_port

pytestmark = pytest.mark.integration

MODEL = "m"
VIEWER = "viewer-token-for-fuzzing-0001"
OPERATOR = "operator-token-for-fuzzing-01"
FUZZ = settings(
    max_examples=20,
    deadline=None,
    database=None,  # nothing written into the repository
    suppress_health_check=list(HealthCheck),
)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("fuzz")
    tokens = write_tokens_file(
        root / "tokens.json",
        [
            {"name": "fuzz-viewer", "role": "viewer", "token": VIEWER},
            {"name": "fuzz-operator", "role": "operator", "token": OPERATOR},
        ],
    )
    s = Settings(
        state_dir=root / "state",
        gateway_port=free_port(),
        gateway_admin_token="fuzz-admin-token-000000000",
    )
    artefact = build_mlp_onnx(root / "model.onnx", seed=5)
    with GatewayProcess.start(
        s,
        log_path=root / "gw.log",
        extra_args=["--tokens-file", str(tokens)],
        exit_with_parent=True,
    ) as gw:
        with GatewayClient(gw.url, s.admin_token()) as admin:
            admin.set_deployment(Deployment(model=MODEL, champion=spec_for(artefact, "1")))
        yield gw.url
        log = (root / "gw.log").read_text()
    assert "Traceback" not in log, log[-3000:]


@pytest.fixture(scope="module")
def api(gateway: str) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(f"{gateway}/openapi.json")


# Headers that frame the HTTP message itself, handled by the server before the app.
_TRANSPORT_HEADERS = frozenset({"content-length", "transfer-encoding", "host", "connection"})


def auth_for(case: schemathesis.Case, token: str) -> dict[str, str] | None:
    """The token to send, unless the case's headers are the invalid part on purpose.

    A negative case may drop or garble ``Authorization`` (the document's security scheme makes
    it a required header). Putting the valid token back would turn it into a valid request,
    which the server rightly accepts, and schemathesis would then report "accepted invalid
    data": so such a case goes out as generated, and must be answered 401.
    """
    header = case.meta.components.get(ParameterLocation.HEADER) if case.meta else None
    if header is not None and header.mode is GenerationMode.NEGATIVE:
        return None
    return {"Authorization": f"Bearer {token}"}


def fuzz(
    api: schemathesis.BaseSchema,
    token: str,
    *,
    only: tuple[str, str] | None = None,
    excluded: tuple[schemathesis.CheckFunction, ...] = (),
) -> list[str]:
    """Run every operation (or ``only``) in both generation modes; returns what was fuzzed.

    Driven with hypothesis directly: schemathesis' own pytest plugin does not run under this
    project's pytest version.
    """
    done: list[str] = []
    for result in api.get_all_operations():
        operation = result.ok()
        if only is not None and (operation.method.upper(), operation.path) != only:
            continue
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            path_parameters = {"model": MODEL} if "{model}" in operation.path else None
            strategy = operation.as_strategy(generation_mode=mode, path_parameters=path_parameters)

            skip = list(excluded)
            if operation.path.endswith("/infer"):
                # The infer body's data must hold exactly rows x features numbers, as its shape
                # says, which JSON Schema cannot express: a schema-valid body may still be
                # refused (400), so "valid data must be accepted" is left out for it.
                skip.append(positive_data_acceptance)
            if operation.path == "/admin/failures":
                # Likewise: ``until`` before ``since`` is refused (400), and RFC 3339 allows
                # times Python does not read (a leap second, a lowercase 't').
                skip.append(positive_data_acceptance)

            @FUZZ
            @given(case=strategy)
            def check(case: schemathesis.Case) -> None:
                # Extra headers of a negative case may be named Content-Length & co with a
                # garbage value: the HTTP server refuses such a request (400, text) before the
                # app sees it. That tests uvicorn's parser, not this API: they are dropped.
                if case.headers:
                    for name in [n for n in case.headers if n.lower() in _TRANSPORT_HEADERS]:
                        del case.headers[name]
                # Run at once below, in this iteration: the loop variable is the right one.
                case.call_and_validate(
                    headers=auth_for(case, token),
                    excluded_checks=skip,  # noqa: B023
                )

            try:
                check()
            except Unsatisfiable:
                # An operation without parameters or body has no invalid input to generate.
                assert mode is GenerationMode.NEGATIVE, operation.path
                continue
            done.append(f"{mode.value} {operation.method.upper()} {operation.path}")
    return done


def test_every_operation_answers_as_documented_and_never_5xx(
    api: schemathesis.BaseSchema,
) -> None:
    done = fuzz(api, VIEWER)
    positive = {d.removeprefix("positive ") for d in done if d.startswith("positive")}
    operations = {f"{r.ok().method.upper()} {r.ok().path}" for r in api.get_all_operations()}
    assert positive == operations and len(operations) >= 21, done
    assert "negative POST /v1/models/{model}/predict" in done
    assert "negative POST /v2/models/{model}/infer" in done
    assert "negative POST /v2/models/{model}/versions/{version}/infer" in done
    assert "negative PUT /admin/deployment" in done


def test_deployment_changes_answer_as_documented_and_never_5xx(
    api: schemathesis.BaseSchema,
) -> None:
    # After the pass above: random valid deployments may be applied here, which is fine. A
    # schema-valid deployment is still refused (422) when its artefact is not on disk or its
    # fields disagree (a canary without champion at 50 %), which JSON Schema cannot express:
    # so "valid data must be accepted" is left out here, every other check stays.
    done = fuzz(
        api,
        OPERATOR,
        only=("PUT", "/admin/deployment"),
        excluded=(positive_data_acceptance,),
    )
    assert done == [
        "positive PUT /admin/deployment",
        "negative PUT /admin/deployment",
    ]
