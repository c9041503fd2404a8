"""The PyTriton benchmark peer: a real Triton server (via nvidia-pytriton) with the same ONNX
Runtime session inside, dynamic batching on. Run by ``ballast bench serving --pytriton-python``
under a Python 3.12 venv that has ``nvidia-pytriton``, ``onnxruntime`` and ``numpy`` (PyTriton's
Python backend does not work under 3.11 here; see the shared notes). Imports nothing from Ballast.

    python pytriton_peer.py MODEL.onnx --port 8000 --grpc-port 8001 --metrics-port 8002

Every address is 127.0.0.1 (PyTriton binds 0.0.0.0 otherwise). Stop it with SIGTERM.
"""

from __future__ import annotations

import argparse

import numpy as np


def main() -> None:
    import onnxruntime as ort
    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    ap = argparse.ArgumentParser()
    ap.add_argument("onnx")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--grpc-port", type=int, required=True)
    ap.add_argument("--metrics-port", type=int, required=True)
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--max-queue-delay-us", type=int, default=100)
    args = ap.parse_args()

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1  # as the gateway's sessions: the server needs the other core
    session = ort.InferenceSession(args.onnx, opts, providers=["CPUExecutionProvider"])
    in_name = session.get_inputs()[0].name
    n_features = int(session.get_inputs()[0].shape[1])

    @batch
    def infer(input: np.ndarray) -> dict[str, np.ndarray]:  # named as Triton's input tensor
        out = session.run(None, {in_name: input.astype(np.float32, copy=False)})[0]
        return {"logits": np.asarray(out, dtype=np.float32)}

    config = TritonConfig(
        http_address="127.0.0.1",
        http_port=args.port,
        grpc_address="127.0.0.1",
        grpc_port=args.grpc_port,
        metrics_address="127.0.0.1",
        metrics_port=args.metrics_port,
    )
    with Triton(config=config) as triton:
        triton.bind(
            model_name="mlp",
            infer_func=infer,
            inputs=[Tensor(name="input", dtype=np.float32, shape=(n_features,))],
            outputs=[Tensor(name="logits", dtype=np.float32, shape=(-1,))],
            config=ModelConfig(
                max_batch_size=args.max_batch,
                batcher=DynamicBatcher(max_queue_delay_microseconds=args.max_queue_delay_us),
            ),
        )
        triton.serve()


if __name__ == "__main__":
    main()
