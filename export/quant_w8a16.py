"""INT8 weight-only recipe (W8A16): every linear layer's weight stored as symmetric int8, activations left in float.

Why weight-only: decoding one token reads every weight once for two FLOPs each, so a decoder
at batch 1 is bandwidth-bound (AGX Orin, CPUs alike) and one byte per weight is what pays;
activations are not quantized in the graph, so no calibration set and no static activation
ranges (W8A8's per-tensor ranges are where its error comes from).
Two forms, as for int4 (export/quant_int4.py):
- `nbits`: com.microsoft MatMulNBits with bits=8, onnxruntime's fused kernel reading the int8
  blocks directly; block-wise over the input dim. Its accuracy_level matters: at 0 (fp32
  compute) onnxruntime 1.32 runs 8-bit weights through a slow path (5x slower than fp32 on the
  `small` checkpoint, 10x on `bench`); at 4 it is faster than fp32, so QuantizeOptions makes 4
  the w8a16 default. Level 4 computes in int8: the kernel quantizes each block of activations
  on the fly with its own scale -- dynamic and per block of the input dim, no calibration, but
  not exact W8A16 arithmetic; smaller blocks round activations (and weights) more finely;
- `qdq`: DequantizeLinear(int8 weight, per-output-channel scale, axis=1 of the MatMul's (in, out)
  weight; zero point omitted, i.e. 0) feeding the original MatMul: TensorRT's weight-only
  pattern (INT8 weights, per-channel or per-tensor; its block-wise scales are INT4-only), which
  TensorRT targets get because it cannot parse MatMulNBits. onnxruntime 1.32's quantizer
  writes 8-bit weights only as MatMulNBits, so this form is written here. (onnxruntime's
  own graph optimizer fuses this pattern back into MatMulNBits bits=8 when it loads it, so
  the form also runs fast on the CPU.)
Only MatMuls with a constant 2-D float weight are touched: no Q/DQ on any activation.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgeact.export.quant_feeds import FeedSource, const_weight_matmuls, replace_nodes, save_onnx
from edgeact.export.quant_options import QuantizeOptions
from edgeact.runtime.errors import BundleError

INT8_WEIGHT_MAX = 127   # symmetric: -128 is never used, so the range is the same either side of zero


def quantize_w8a16(src: Path, dst: Path, feeds: FeedSource, options: QuantizeOptions, work_dir: Path,
                   threads: int | None = None) -> dict[str, Any]:
    """int8 weights, float activations, in the form options.resolved_int8_format() names; feeds are not read."""
    fmt = options.resolved_int8_format()
    notes: dict[str, Any] = {"format": fmt, "mode": "w8a16", "activations": "fp32 (not quantized)"}
    if fmt == "nbits":
        from edgeact.export.quant_int4 import write_matmul_nbits

        notes["quantized_nodes"] = write_matmul_nbits(src, dst, options, bits=8)
        notes["weights"] = f"int8 symmetric, blocks of {options.block_size} along the input dim (RTN)"
        notes["accuracy_level"] = options.accuracy_level
        return notes
    notes["quantized_nodes"] = write_int8_dequantize_matmuls(src, dst, options.exclude_nodes, options.per_channel)
    notes["weights"] = "int8 symmetric " + ("per output channel" if options.per_channel else "per tensor")
    return notes


def quantize_weight_int8(weight: np.ndarray, per_channel: bool = True,
                         max_q: int = INT8_WEIGHT_MAX) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric round-to-nearest of an (in, out) weight onto [-max_q, max_q]: (int8 weight, float32 scale (out,) or ()).

    A column of zeros gets scale 1 (any scale dequantizes zeros exactly; 0 would divide by zero).
    """
    absmax = np.abs(weight).max(axis=0) if per_channel else np.abs(weight).max()
    scale = np.where(absmax > 0, absmax / max_q, 1.0).astype(np.float32)
    q = np.clip(np.rint(weight / scale), -max_q, max_q).astype(np.int8)
    return q, scale


def write_int8_dequantize_matmuls(src: Path, dst: Path, exclude: tuple[str, ...] = (), per_channel: bool = True) -> int:
    """Put each linear MatMul's weight as int8 + scale behind a DequantizeLinear; returns the MatMuls changed."""
    import onnx
    from onnx import helper, numpy_helper

    proto = onnx.load(str(src))
    opset = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset < 13:
        raise BundleError(f"{src}: opset {opset}; per-channel DequantizeLinear needs opset >= 13: re-export the bundle")
    inits = {t.name: t for t in proto.graph.initializer}
    axis = {"axis": 1} if per_channel else {}      # the output channel of an (in, out) MatMul weight
    weights = {n.input[1] for n in const_weight_matmuls(proto, ("MatMul",), tuple(exclude))}
    dequantized: dict[str, str] = {}   # float weight name -> its DequantizeLinear output (a weight may be shared)
    nodes, changed = [], 0
    for node in proto.graph.node:
        name = node.input[1] if node.op_type == "MatMul" and len(node.input) > 1 else None
        if name in weights and node.name not in exclude:
            if name not in dequantized:   # just before its first reader: the node list stays topologically sorted
                q, scale = quantize_weight_int8(numpy_helper.to_array(inits[name]), per_channel)
                proto.graph.initializer.extend([numpy_helper.from_array(q, f"{name}_int8"),
                                                numpy_helper.from_array(scale, f"{name}_scale")])
                dequantized[name] = f"{name}_dequantized"
                nodes.append(helper.make_node("DequantizeLinear", [f"{name}_int8", f"{name}_scale"],
                                              [dequantized[name]], name=f"{name}_DequantizeLinear", **axis))
            node.input[1] = dequantized[name]
            changed += 1
        nodes.append(node)
    replace_nodes(proto, nodes)
    save_onnx(proto, dst)
    return changed
