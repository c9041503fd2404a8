"""The predict route reduced to what every server stack must do (``server_stacks.py``'s app):
read a batch-1 JSON body, parse it, one ONNX Runtime call, answer JSON. Model: $STACK_MODEL."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import onnxruntime as ort
import orjson

_session: ort.InferenceSession | None = None


def _model() -> ort.InferenceSession:
    global _session
    if _session is None:  # loaded in each worker process on its first request
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        _session = ort.InferenceSession(os.environ["STACK_MODEL"], sess_options=opts)
    return _session


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                _model()
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    body = b""
    more = True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    x = np.asarray(orjson.loads(body)["instances"], dtype=np.float32)
    logits = _model().run(None, {"input": x})[0]
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs = exp / exp.sum(axis=1, keepdims=True)
    out = orjson.dumps(
        {"predictions": logits.argmax(axis=1).tolist(), "probabilities": probs.tolist()}
    )
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(out)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": out})
