"""FP8 (E4M3) recipe: Q/DQ around linear layers with amax scales, for GPUs of SM >= 8.9 (Ada, Hopper, Thor).

The graph is written here rather than by onnxruntime.quantization, whose float8 path
(QuantType.QFLOAT8E4M3FN) accepts only its Distribution calibration: scales from the standard
deviation, which clip the outlier channels of LLM activations (FP8's reach is its 448 maximum,
not a few sigmas), and a collector that cannot mix a prefill chunk with single-token steps.
Scales here are TensorRT's and ModelOpt's convention: scale = amax / 448, activations per
tensor from calibration, weights per tensor (or per output channel) from the weights. Weights
are stored as float8e4m3fn initializers feeding a DequantizeLinear, which halves their size
against fp16 and is the pattern TensorRT fuses into an FP8 GEMM. Needs opset >= 19.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from edgeact.export.quant_feeds import FeedSource, const_weight_matmuls, save_onnx, tensor_stats
from edgeact.export.quant_options import QuantizeOptions, require_targets

E4M3_MAX = 448.0
MIN_OPSET = 19
_TINY = 1e-12


def fp8_scale(amax: np.ndarray | float) -> np.ndarray:
    return (np.maximum(np.asarray(amax, np.float32), _TINY) / np.float32(E4M3_MAX)).astype(np.float32)


def to_e4m3(values: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Saturating cast of values / scale to float8 e4m3fn (the QuantizeLinear semantics)."""
    from ml_dtypes import float8_e4m3fn

    return np.clip(values / scale, -E4M3_MAX, E4M3_MAX).astype(float8_e4m3fn)


def quantize_fp8(src: Path, dst: Path, feeds: FeedSource, options: QuantizeOptions, work_dir: Path,
                 threads: int | None = None) -> dict[str, Any]:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    proto = onnx.load(str(src))
    ensure_opset(proto)
    nodes = [n for n in const_weight_matmuls(proto, ("MatMul",), options.exclude_nodes) if "MatMul" in options.op_types]
    require_targets(nodes, src, options)
    amax = {k: v.absmax for k, v in tensor_stats(src, sorted({n.input[0] for n in nodes}), feeds, work_dir, threads,
                                                  channels=False).items()}
    inits = {t.name: t for t in proto.graph.initializer}
    readers = defaultdict(list)
    for node in nodes:
        readers[node.input[0]].append(node)
    added = []
    # A float8 zero point sets QuantizeLinear's output type.
    zero = helper.make_tensor("fp8.zero_point", TensorProto.FLOAT8E4M3FN, [], b"\x00", raw=True)
    proto.graph.initializer.append(zero)
    for tensor, matmuls in readers.items():
        scale_name, q, dq = f"{tensor}.fp8_scale", f"{tensor}.fp8", f"{tensor}.fp8_dq"
        proto.graph.initializer.append(numpy_helper.from_array(fp8_scale(amax[tensor]), scale_name))
        added += [helper.make_node("QuantizeLinear", [tensor, scale_name, zero.name], [q], name=f"{tensor}.q"),
                  helper.make_node("DequantizeLinear", [q, scale_name, zero.name], [dq], name=f"{tensor}.dq")]
        for node in matmuls:
            node.input[0] = dq
    for node in nodes:
        weight = numpy_helper.to_array(inits[node.input[1]])
        w_scale = fp8_scale(np.abs(weight).max(axis=0) if options.per_channel else np.abs(weight).max())
        q_name, s_name, out = f"{node.input[1]}.fp8", f"{node.input[1]}.fp8_scale", f"{node.input[1]}.fp8_dq"
        quantized = helper.make_tensor(q_name, TensorProto.FLOAT8E4M3FN, weight.shape,
                                       to_e4m3(weight, w_scale).tobytes(), raw=True)
        proto.graph.initializer.remove(inits[node.input[1]])
        proto.graph.initializer.extend([quantized, numpy_helper.from_array(w_scale, s_name)])
        attrs = {"axis": 1} if options.per_channel else {}
        # No zero point: x's type says float8, and a per-axis zero point would need one per channel.
        added.append(helper.make_node("DequantizeLinear", [q_name, s_name], [out], name=f"{node.name}.w_dq", **attrs))
        node.input[1] = out
    _insert_before_readers(proto, added)
    save_onnx(proto, dst)
    return {"format": "qdq", "activations": "float8e4m3fn per-tensor, amax/448",
            "weights": f"float8e4m3fn per-{'channel' if options.per_channel else 'tensor'}, amax/448",
            "quantized_nodes": len(nodes), "opset": max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))}


def ensure_opset(proto, version: int = MIN_OPSET) -> None:
    """Convert a graph of an older default-domain opset to `version` in place (an op's meaning can change between
    opsets: 18 moved ReduceMean's axes from an attribute to an input); a newer graph is left as it is."""
    for opset in proto.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version < version:
            from onnx import version_converter

            converted = version_converter.convert_version(proto, version)
            proto.CopyFrom(converted)
            return


def _insert_before_readers(proto, added: list) -> None:
    """Place every new node right before the first node that reads its output (keeps topological order)."""
    by_output = {n.output[0]: n for n in added}
    ordered, placed = [], set()

    def place(name: str) -> None:
        node = by_output.get(name)
        if node is None or id(node) in placed:
            return
        for inp in node.input:
            place(inp)
        placed.add(id(node))
        ordered.append(node)

    for node in proto.graph.node:
        for inp in node.input:
            place(inp)
        ordered.append(node)
    del proto.graph.node[:]
    proto.graph.node.extend(ordered)
