"""A seeded ONNX MLP written with ``onnx.helper`` (no torch): the benchmark's and tests' model.

``infra.gateway.testing`` re-exports it for tests; the serving benchmark builds the peers'
30->256->256->2 shape with it.
"""

from __future__ import annotations

import math
from pathlib import Path

__all__ = ["build_mlp_onnx"]


def build_mlp_onnx(
    path: Path,
    *,
    seed: int,
    n_features: int = 30,
    hidden: tuple[int, ...] = (16,),
    classes: int = 2,
) -> Path:
    """Write a seeded ``Linear/ReLU`` MLP with a dynamic batch axis to ``path``.

    Input ``input`` float32 ``[batch, n_features]``, output ``logits`` float32 ``[batch, classes]``.
    """
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes = []
    inits = []
    width, current = n_features, "input"
    widths = [*hidden, classes]
    for i, out in enumerate(widths):
        bound = 1.0 / math.sqrt(width)  # torch.nn.Linear's default init range
        w = rng.uniform(-bound, bound, size=(width, out)).astype(np.float32)
        b = rng.uniform(-bound, bound, size=(out,)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        last = i == len(widths) - 1
        nodes.append(helper.make_node("MatMul", [current, f"w{i}"], [f"mm{i}"]))
        nodes.append(helper.make_node("Add", [f"mm{i}", f"b{i}"], ["logits" if last else f"a{i}"]))
        if not last:
            nodes.append(helper.make_node("Relu", [f"a{i}"], [f"h{i}"]))
            current = f"h{i}"
        width = out
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", n_features])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by every onnxruntime this project allows
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path
