"""The gateway's OpenAPI 3.1 document (served at ``/openapi.json``).

Written by hand around the pydantic models of the wire contract, so the schemas the server
validates against and the ones it documents are the same objects. ``tests/integration/
test_gateway_schemathesis.py`` fuzzes the running server against this document.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from ballast.serving import NPY_MEDIA_TYPE, Deployment, PredictResponse
from infra.gateway.heartbeat import WatchdogHeartbeat

__all__ = ["openapi_document"]

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "string"}},
}


def _err(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


def _json(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_AUTH_ERRORS = {
    "401": _err("Missing or invalid bearer token."),
    "403": _err("The token's role is too weak for this route."),
}

_ANY_OBJECT: dict[str, Any] = {"type": "object"}


# Largest finite float32: a bigger JSON number cannot be a feature value.
_F32_MAX = 3.4028234663852886e38


def _query(name: str, schema: dict[str, Any], required: bool = False) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": required, "schema": schema}


@lru_cache(maxsize=8)
def openapi_document(n_features: int | None = None) -> dict[str, Any]:
    """The document; with ``n_features`` (the deployed model's) each row has exactly that many."""
    row: dict[str, Any] = {
        "type": "array",
        "minItems": n_features or 1,
        "items": {"type": "number", "minimum": -_F32_MAX, "maximum": _F32_MAX},
    }
    if n_features:
        row["maxItems"] = n_features
    schemas: dict[str, Any] = {}
    for model in (Deployment, PredictResponse, WatchdogHeartbeat):
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    schemas["Error"] = _ERROR
    schemas["PredictRequest"] = {
        "type": "object",
        "additionalProperties": False,
        "required": ["instances"],
        "properties": {
            "instances": {
                "type": "array",
                "minItems": 1,
                "maxItems": 4096,
                "items": row,
            }
        },
    }
    deployment_or_null = {"anyOf": [{"$ref": "#/components/schemas/Deployment"}, {"type": "null"}]}
    admin: list[dict[str, list[str]]] = [{"bearer": []}]
    paths: dict[str, Any] = {
        "/v1/models/{model}/predict": {
            "post": {
                "operationId": "predict",
                "summary": "Predict with the version the router picks (champion or canary).",
                "parameters": [
                    {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}},
                    {
                        "name": "X-Ballast-Key",
                        "in": "header",
                        "required": False,
                        "description": "Sticky routing key: the same key lands on the same version.",
                        "schema": {"type": "string"},
                    },
                    {
                        "name": "X-Request-Id",
                        "in": "header",
                        "required": False,
                        "description": "Echoed on the answer and written on the gateway's log line "
                        "of a failed request. Up to 128 of A-Z a-z 0-9 . _ : = + / -; otherwise "
                        "(or when absent) the gateway makes one.",
                        "schema": {"type": "string"},
                    },
                ],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {"$ref": "#/components/schemas/PredictRequest"}
                        },
                        NPY_MEDIA_TYPE: {
                            "schema": {"type": "string", "format": "binary"},
                            "description": "One 2-D little-endian float32 array (numpy.save).",
                        },
                    },
                },
                "responses": {
                    "200": {
                        "description": "Predicted class and probabilities per row. With "
                        f"'Accept: {NPY_MEDIA_TYPE}' the probabilities as a float32 array.",
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/PredictResponse"}
                            },
                            NPY_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}},
                        },
                    },
                    "400": _err("Malformed body (JSON or .npy)."),
                    "404": _err("Unknown model."),
                    "413": _err("Body too large."),
                    "415": _err("Unsupported content type."),
                    "422": _err(
                        "Wrong shape, dtype, feature count or values (also: features so large,"
                        " beyond ±1.8e19, that the model's answer overflowed)."
                    ),
                    "500": _err(
                        "The version failed to predict (or an injected fault), or it refuses a"
                        " feature count another serving version takes (version_mismatch)."
                    ),
                    "503": _err("Nothing deployed, or the version is overloaded."),
                    "504": _err("The batch timed out."),
                },
            }
        },
        "/healthz": {
            "get": {
                "operationId": "healthz",
                "summary": "The process answers.",
                "responses": {"200": _json("Alive.", _ANY_OBJECT)},
            }
        },
        "/readyz": {
            "get": {
                "operationId": "readyz",
                "summary": "Every desired version is loaded and warmed up.",
                "responses": {
                    "200": _json("Ready.", _ANY_OBJECT),
                    "503": _json("Not ready, with the reason.", _ANY_OBJECT),
                },
            }
        },
        "/readyz/serving": {
            "get": {
                "operationId": "serving",
                "summary": "Takes traffic: a verified version is loaded and warmed (the desired "
                "deployment may still be loading): the readiness check for a load balancer.",
                "responses": {
                    "200": _json("Serving; desired_loaded says if the change is in.", _ANY_OBJECT),
                    "503": _json("Serving nothing, with the reason.", _ANY_OBJECT),
                },
            }
        },
        "/metrics": {
            "get": {
                "operationId": "metrics",
                "summary": "Prometheus metrics (all replicas).",
                "responses": {
                    "200": {
                        "description": "Prometheus text format.",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/openapi.json": {
            "get": {
                "operationId": "openapi",
                "summary": "This document.",
                "responses": {"200": _json("OpenAPI 3.1.", _ANY_OBJECT)},
            }
        },
        "/admin/deployment": {
            "get": {
                "operationId": "getDeployment",
                "summary": "The deployment in force (viewer). Its ETag is what a change "
                "conditional on it sends as If-Match.",
                "security": admin,
                "responses": {"200": _json("The deployment, or null.", deployment_or_null)}
                | _AUTH_ERRORS,
            },
            "put": {
                "operationId": "putDeployment",
                "summary": "Verify, load, warm and switch to a deployment; publish it to every "
                "replica (operator; admin when it injects faults).",
                "security": admin,
                "parameters": [
                    {
                        "name": "If-Match",
                        "in": "header",
                        "required": False,
                        "description": "Apply only while the desired state in force has one of "
                        'these ETags (as GET answers them; "none": nothing deployed), or *.',
                        "schema": {"type": "string"},
                    }
                ],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/Deployment"}}
                    },
                },
                "responses": {
                    "200": _json(
                        "Applied; X-Ballast-Replicas says how many replicas converged.",
                        {"$ref": "#/components/schemas/Deployment"},
                    ),
                    "400": _err("Malformed JSON or If-Match."),
                    "409": _err("An artefact's sha256 does not match; nothing changed."),
                    "412": _err("If-Match does not name the deployment in force; nothing changed."),
                    "413": _err("Body too large."),
                    "422": _err("Invalid deployment or unloadable artefact; nothing changed."),
                    "503": _err("The desired state could not be recorded; nothing changed."),
                }
                | _AUTH_ERRORS,
            },
            "delete": {
                "operationId": "deleteDeployment",
                "summary": "Serve nothing (admin).",
                "security": admin,
                "responses": {
                    "200": _json("Cleared.", {"type": "null"}),
                    "503": _err("The desired state could not be recorded."),
                }
                | _AUTH_ERRORS,
            },
        },
        "/admin/stats": {
            "get": {
                "operationId": "stats",
                "summary": "Per-version counters and latency percentiles (viewer).",
                "security": admin,
                "responses": {"200": _json("Counters.", _ANY_OBJECT)} | _AUTH_ERRORS,
            }
        },
        "/admin/replicas": {
            "get": {
                "operationId": "replicas",
                "summary": "This replica and its live peers (viewer).",
                "security": admin,
                "responses": {"200": _json("Replica states.", _ANY_OBJECT)} | _AUTH_ERRORS,
            }
        },
        "/admin/shadow": {
            "get": {
                "operationId": "shadow",
                "summary": "Shadow agreement with the primary and recent disagreements (viewer).",
                "security": admin,
                "responses": {"200": _json("Shadow report.", _ANY_OBJECT)} | _AUTH_ERRORS,
            }
        },
        "/admin/observations": {
            "get": {
                "operationId": "observations",
                "summary": "Recent answers of this replica after a cursor, for canary judgement (viewer).",
                "security": admin,
                "parameters": [
                    {
                        "name": "cursors",
                        "in": "query",
                        "required": False,
                        "schema": {
                            "type": "string",
                            "pattern": "^([^=,]+=[0-9]{1,19})?(,[^=,]+=[0-9]{1,19})*$",
                        },
                    },
                    {
                        "name": "limit",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "integer", "minimum": 1, "maximum": 20000},
                    },
                ],
                "responses": {
                    "200": _json("Answers after this replica's cursor.", _ANY_OBJECT),
                    "400": _err("A malformed cursor or limit."),
                }
                | _AUTH_ERRORS,
            }
        },
        "/admin/failures": {
            "get": {
                "operationId": "failures",
                "summary": "This pod's fault report for one version, from its replicas' failure "
                "files (viewer).",
                "security": admin,
                "parameters": [
                    _query("model", {"type": "string", "minLength": 1, "maxLength": 256}, True),
                    _query("version", {"type": "string", "minLength": 1, "maxLength": 256}, True),
                    _query("since", {"type": "string", "format": "date-time"}, True),
                    _query("until", {"type": "string", "format": "date-time"}, False),
                    _query("min_status", {"type": "integer", "minimum": 100, "maximum": 599}),
                    _query("context", {"type": "integer", "minimum": 0, "maximum": 200}),
                ],
                "responses": {
                    "200": _json("The version's failures in the window, on this pod.", _ANY_OBJECT),
                    "400": _err("A missing or malformed parameter."),
                    "409": _err("This gateway keeps no failure files."),
                    "429": _err("Another report is being read for over 10 s."),
                }
                | _AUTH_ERRORS,
            }
        },
        "/admin/reload": {
            "post": {
                "operationId": "reload",
                "summary": "Read the desired state now and converge (operator).",
                "security": admin,
                "responses": {
                    "200": _json("This replica's state.", _ANY_OBJECT),
                    "409": _err("No desired-state source is configured."),
                }
                | _AUTH_ERRORS,
            }
        },
        "/admin/watchdog/heartbeat": {
            "post": {
                "operationId": "watchdogHeartbeat",
                "summary": "The champion watchdog ran: sets "
                "ballast_watchdog_heartbeat_timestamp_seconds and ballast_watchdog_healthy "
                "for the model (operator).",
                "security": admin,
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {"$ref": "#/components/schemas/WatchdogHeartbeat"}
                        }
                    },
                },
                "responses": {
                    "200": _json("Recorded.", _ANY_OBJECT),
                    "400": _err("Malformed JSON."),
                    "413": _err("Body too large."),
                    "422": _err("Invalid heartbeat (fields, types, lengths)."),
                }
                | _AUTH_ERRORS,
            }
        },
        "/admin/tokens": {
            "get": {
                "operationId": "tokens",
                "summary": "Names and roles of the configured tokens, never the tokens (admin).",
                "security": admin,
                "responses": {"200": _json("Principals.", _ANY_OBJECT)} | _AUTH_ERRORS,
            }
        },
    }
    schemas.update(_oip_schemas(n_features))
    paths.update(_oip_paths())
    return {
        "openapi": "3.1.0",
        "info": {"title": "Ballast serving gateway", "version": "1"},
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


# -- the Open Inference Protocol (infra/gateway/oip.py) ---------------------------------------


def _one_tensor(name: str, shape: dict[str, Any], data: dict[str, Any], params: Any) -> Any:
    """A list holding exactly one FP32 tensor called ``name``."""
    return {
        "type": "array",
        "minItems": 1,
        "maxItems": 1,
        "items": {
            "type": "object",
            "required": ["name", "datatype", "shape"],
            "properties": {
                "name": {"const": name},
                "datatype": {"const": "FP32"},
                "shape": shape,
                "data": data,
                "parameters": params,
            },
        },
    }


def _oip_schemas(n_features: int | None) -> dict[str, Any]:
    """Request and response bodies of the KServe v2 REST protocol as the gateway takes them:
    one ``input`` FP32 ``[n, features]`` tensor, one ``logits`` output. What JSON Schema cannot
    say: ``data`` must hold exactly n x features numbers (flat or nested as the shape), and a
    tensor with ``binary_data_size`` takes its bytes from after the JSON header instead."""
    number = {"type": "number", "minimum": -_F32_MAX, "maximum": _F32_MAX}
    width: dict[str, Any] = {"const": n_features} if n_features else {"type": "integer"}
    rows_by_width = {
        "type": "array",
        "prefixItems": [{"type": "integer", "minimum": 1, "maximum": 4096}, width],
        "minItems": 2,
        "maxItems": 2,
    }
    nested = {"type": "array", "items": {"anyOf": [number, {"type": "array", "items": number}]}}
    # The server reads null as absent for every optional field (oip.py), so the document
    # allows it: a schema stricter than the server fails schemathesis' negative checks.
    sizes = {
        "type": ["object", "null"],
        "properties": {"binary_data_size": {"type": ["integer", "null"], "minimum": 0}},
    }
    return {
        "OipInferRequest": {
            "type": "object",
            "required": ["inputs"],
            "properties": {
                "id": {"type": ["string", "null"]},
                "parameters": {
                    "type": ["object", "null"],
                    "properties": {"binary_data_output": {"type": ["boolean", "null"]}},
                },
                "inputs": _one_tensor("input", rows_by_width, nested, sizes),
                "outputs": {
                    "type": ["array", "null"],
                    "items": {
                        "type": "object",
                        "required": ["name"],
                        "properties": {
                            "name": {"const": "logits"},
                            "parameters": {
                                "type": ["object", "null"],
                                "properties": {"binary_data": {"type": ["boolean", "null"]}},
                            },
                        },
                    },
                },
            },
        },
        "OipInferResponse": {
            "type": "object",
            "required": ["model_name", "model_version", "outputs"],
            "properties": {
                "model_name": {"type": "string"},
                "model_version": {"type": "string"},
                "id": {"type": "string"},
                "outputs": _one_tensor(
                    "logits",
                    {"type": "array", "items": {"type": "integer"}},
                    {"type": "array", "items": {"type": "number"}},
                    _ANY_OBJECT,
                ),
            },
        },
    }


def _path_param(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}


def _oip_paths() -> dict[str, Any]:
    not_served = {
        "404": _err("Unknown model, or no serving version of that name."),
        "503": _err("Nothing deployed."),
    }
    infer_errors = {
        "400": _err(
            "Malformed request: JSON, tensor name, datatype, shape, data or the "
            "binary extension's sizes."
        ),
        "413": _err("Body too large."),
        "422": _err("Values the model cannot answer."),
        "500": _err(
            "The version failed to predict (or an injected fault), or the routed version refuses"
            " a width another serving version takes (version_mismatch)."
        ),
        "503": _err("Nothing deployed, or the version is overloaded."),
        "504": _err("The batch timed out."),
        "404": _err("Unknown model, or no serving version of that name."),
    }
    binary = {"type": "string", "format": "binary"}

    def infer(summary: str, versioned: bool) -> dict[str, Any]:
        params = [_path_param("model")] + ([_path_param("version")] if versioned else [])
        params += [
            {
                "name": "Inference-Header-Content-Length",
                "in": "header",
                "required": False,
                "description": "Binary tensor data extension: length of the JSON part of the "
                "body; raw little-endian tensor bytes follow it.",
                "schema": {"type": "integer", "minimum": 0},
            },
            {
                "name": "X-Request-Id",
                "in": "header",
                "required": False,
                "schema": {"type": "string"},
            },
        ]
        if not versioned:
            params.append(
                {
                    "name": "X-Ballast-Key",
                    "in": "header",
                    "required": False,
                    "description": "Sticky routing key, as on the predict route.",
                    "schema": {"type": "string"},
                }
            )
        return {
            "post": {
                "operationId": "oipInferVersion" if versioned else "oipInfer",
                "summary": summary,
                "parameters": params,
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {"$ref": "#/components/schemas/OipInferRequest"}
                        }
                    },
                },
                "responses": {
                    "200": {
                        "description": "The logits; with binary output requested, a JSON "
                        "header then the raw bytes (application/octet-stream).",
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/OipInferResponse"}
                            },
                            "application/octet-stream": {"schema": binary},
                        },
                    }
                }
                | infer_errors,
            }
        }

    def get(op: str, summary: str, params: list[dict[str, Any]], errors: dict[str, Any]) -> Any:
        return {
            "get": {
                "operationId": op,
                "summary": summary,
                "parameters": params,
                "responses": {"200": _json("OK.", _ANY_OBJECT)} | errors,
            }
        }

    model, version = [_path_param("model")], [_path_param("model"), _path_param("version")]
    return {
        "/v2": get("oipServer", "Server metadata (Open Inference Protocol).", [], {}),
        "/v2/health/live": get("oipLive", "The process answers.", [], {}),
        "/v2/health/ready": get(
            "oipReady",
            "Serving a verified version.",
            [],
            {"503": _json("Serving nothing.", _ANY_OBJECT)},
        ),
        "/v2/models/{model}": get("oipModel", "Model metadata.", model, not_served),
        "/v2/models/{model}/ready": get("oipModelReady", "The model is served.", model, not_served),
        "/v2/models/{model}/versions/{version}": get(
            "oipModelVersion", "Metadata of a serving version.", version, not_served
        ),
        "/v2/models/{model}/versions/{version}/ready": get(
            "oipModelVersionReady", "The version is served.", version, not_served
        ),
        "/v2/models/{model}/infer": infer(
            "Infer with the version the router picks (canary weight, sticky key, shadow).", False
        ),
        "/v2/models/{model}/versions/{version}/infer": infer(
            "Infer with one serving version, pinned (no split).", True
        ),
    }
