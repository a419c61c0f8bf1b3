"""ONNX graphs of NaimishNet stages: what inference runs, written beside each checkpoint.

Needs torch and onnx (``pip install 'fkd[train]'``); inference itself (``fkd_core.predict``) loads the written graphs
with ONNX Runtime alone. Each graph has one input ``x`` (B, 1, S, S) float32 in [0, 1] and two outputs: ``y`` (B, 2K),
the keypoints in [-1, 1], and ``h`` (B, 1000), the last hidden layer the trust heads read.
"""

from __future__ import annotations

import io
import threading
import warnings

import numpy as np
import torch

from fkd_core.model import NaimishNet

_EXPORT_LOCK = threading.Lock()  # torch.onnx.export keeps global state: two exports at once corrupt each other


class WithFeatures(torch.nn.Module):
    """NaimishNet's forward pass that also returns its last hidden layer (the input of the keypoint output)."""

    def __init__(self, model: NaimishNet):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.model.head[:5](self.model.features(x))  # Flatten, Linear, ELU, Dropout, Linear
        return self.model.head[5:](h), h


def stage_graph(model: NaimishNet) -> bytes:
    """The ONNX graph of one stage in evaluation mode, its weights embedded.

    Weights that float16 holds exactly (all of them, for a float16 checkpoint) are stored as float16 and cast to
    float32 inside the graph, which ONNX Runtime folds once when it opens the graph: half the file, the same
    arithmetic as the float32 graph."""
    buf = io.BytesIO()
    size = model.cfg.input_size
    with _EXPORT_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter announces its own deprecation
        torch.onnx.export(
            WithFeatures(model.eval()),
            torch.zeros(1, 1, size, size),
            buf,
            input_names=["x"],
            output_names=["y", "h"],
            dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}, "h": {0: "batch"}},
            dynamo=False,
        )
    return _halve_exact_weights(buf.getvalue())


def _halve_exact_weights(graph: bytes) -> bytes:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    proto = onnx.load_from_string(graph)
    casts = []
    for init in proto.graph.initializer:
        if init.data_type != TensorProto.FLOAT:
            continue
        values = numpy_helper.to_array(init)
        half = values.astype(np.float16)
        if not np.array_equal(half.astype(np.float32), values):
            continue
        name = init.name
        init.CopyFrom(numpy_helper.from_array(half, name + "_f16"))
        casts.append(helper.make_node("Cast", [name + "_f16"], [name], to=TensorProto.FLOAT))
    nodes = list(proto.graph.node)
    del proto.graph.node[:]
    proto.graph.node.extend(casts + nodes)
    onnx.checker.check_model(proto)
    return proto.SerializeToString()
