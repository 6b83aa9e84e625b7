"""INT8 with dynamic per-token activations (W8A8 dynamic) for onnxruntime on a CPU: int8 GEMMs without calibration.

Why: the ViT and the prompt's prefill are compute-bound (hundreds of rows per GEMM), and on a
CPU with VNNI onnxruntime's int8 x int8 GEMM (MLAS U8S8) runs about 1.8x the rate of
MatMulNBits' int8-compute path and 3x fp32 at 128-729 rows (bench checkpoint shapes, 2 threads).
W8A16 keeps activations in float, so it cannot use that GEMM; static W8A8 (export/quant_int8.py)
can, but its per-tensor activation ranges come from a calibration set and clip what the set
did not show.

What each linear MatMul becomes (its weight: int8 on [-63, 63], symmetric, one scale per output channel):

    s  = max(|x|, over the row) / 127          one scale per token (row), computed at run time
    q  = QuantizeLinear(x, s, 128)             uint8, blocked along the input dim (opset 21)
    y  = MatMulIntegerToFloat(q, W_int8, 1, w_scale, 128) * s

Why 7-bit weights: on an x86 CPU with AVX2 but without VNNI, MLAS's U8S8 kernel sums pairs of
uint8 x int8 products in int16 with saturation (vpmaddubsw): 2 x 255 x 127 overflows it, and
results are silently wrong (measured on an AMD EPYC with AVX2 only: 8 % of the outputs of a
64 x 48 layer off, by up to 4.8 against 18). Weights on [-63, 63] keep every pair within int16
(2 x 255 x 63 = 32 130), onnxruntime's own remedy (`quantize_dynamic(reduce_range=True)`). A
bundle is built on one machine and run on another, so the weights are always written so.

A token's scale is its own, so a token with small values (padding, a quiet image patch) keeps
its precision, which one scale per tensor did not (measured on the reference ARM: per-tensor
dynamic scales took the connector's worst-row cosine to 0 and the logits' to 0.92).

The decoder MLP's down-projection (ff_out) needs one more step: its input, SiLU(gate) * up, carries
the few very large channels a per-token scale cannot hold (the reference ARM's logits cosine
0.987 against the 0.99 gate quantized as is). SmoothQuant (export/smoothquant.py) moves them into
the weight first: each input channel j is divided by s_j = max|X_j|^a / max|W_j|^(1-a) (one Mul per
layer; there is no norm gain to fold it into) and row j of the weight multiplied by s_j, with the
channels' ranges from the calibration set; then it takes per-token int8 like the rest
(`down_projections="smoothquant"`, alpha 0.5; the reference ARM's logits cosine 0.9917 on an AVX2
CPU, against 0.990003 with W8A16 there). `down_projections="w8a16"` keeps what every such bundle
had before: W8A16 (MatMulNBits bits=8, as export/quant_w8a16.py writes it), whose activations are
quantized per block of the input dim, and no calibration. Why per-token int8 there pays: on an AVX2
CPU without VNNI, MatMulNBits' int8 path ran the `bench` prefill's down-projections at ~80 GOPS
against ~210 for the U8S8 GEMMs (onnxruntime's profiler).

onnxruntime-only: QuantizeLinear with run-time scales and MatMulIntegerToFloat are not TensorRT's
explicit-quantization pattern, so TensorRT targets are refused in QuantizeOptions.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from edgeact.export.quant_feeds import FeedSource, const_weight_matmuls, replace_nodes, save_onnx
from edgeact.export.quant_fp8 import ensure_opset
from edgeact.export.quant_options import QuantizeOptions

# Linear layers that keep W8A16: the decoder MLP's down-projection (module path .../mlp/ff_out).
KEEP_W8A16 = re.compile(r"/mlp/ff_out/MatMul$")
ACTIVATION_ZERO_POINT = 128      # uint8 activations, symmetric around 128: MLAS's fast U8S8 GEMM
ACTIVATION_MAX = 127
WEIGHT_MAX = 63                  # 7-bit weights: no int16 saturation in U8S8 GEMMs without VNNI (module docstring)
MIN_OPSET = 21                   # blocked QuantizeLinear (one scale per row)
# From opset 19 on, the ops an exported stage uses mean at 21 what they meant (types were added): the version is
# raised as it is. An older graph (`edgeact export --opset 17`) is converted to 19 first.
CONVERTED_BELOW = 19
_PREFIX = "int8_dynamic"
_BIG_TENSOR = 1 << 20            # elements: tensors this big are weights, left out of the shape inference's copy


def quantize_w8a8_dynamic(src: Path, dst: Path, feeds: FeedSource, options: QuantizeOptions, work_dir: Path,
                          threads: int | None = None) -> dict[str, Any]:
    """Per-token dynamic int8 for every linear MatMul; the down-projections SmoothQuant-ed first (feeds give their
    channel ranges), or kept W8A16 (feeds not read) as options.down_projections says."""
    from edgeact.export.quant_int4 import write_matmul_nbits

    work_dir.mkdir(parents=True, exist_ok=True)
    dynamic_path = work_dir / "dynamic.onnx"
    smooth = options.down_projections == "smoothquant"
    smoothing = smooth_down_projections(src, feeds, options, work_dir, threads) if smooth else None
    if smoothing is not None:
        src = smoothing[0]
    dynamic, kept = write_dynamic_int8_matmuls(src, dynamic_path, options.exclude_nodes, keep_w8a16=not smooth)
    # The linear MatMuls left in float are the kept down-projections and exclude_nodes; the latter stay float.
    written = write_matmul_nbits(dynamic_path, dst, options, bits=8) if kept else 0
    if not kept:
        _copy_model(dynamic_path, dst)
    notes = {"format": "dynamic", "mode": "w8a8-dynamic", "quantized_nodes": dynamic + written,
             "activations": "int8 per token, scale from each row's absolute max at run time",
             "weights": f"int8 symmetric per output channel, on [-{WEIGHT_MAX}, {WEIGHT_MAX}]", "w8a16_nodes": written}
    if smoothing is not None:
        notes["smoothquant"] = smoothing[1]
    if written:
        notes.update({"w8a16_why": "MLP down-projections (ff_out): outlier channels in their input",
                      "w8a16_weights": f"int8 symmetric, blocks of {options.block_size} along the input dim",
                      "accuracy_level": options.accuracy_level})
    return notes


def smooth_down_projections(src: Path, feeds: FeedSource, options: QuantizeOptions, work_dir: Path,
                            threads: int | None = None) -> tuple[Path, dict[str, Any]] | None:
    """SmoothQuant on the down-projections' inputs (export/smoothquant.py), so that they too take per-token int8;
    (the smoothed graph, the manifest's notes), or None for a stage without down-projections (the ViT's).

    Their input, SiLU(gate) * up, has no norm gain to fold 1/s into: each gets an explicit Mul by 1/s (one per
    layer) and its weight's rows are multiplied by s. The channels' ranges come from the calibration feeds.
    """
    import onnx

    from edgeact.export.smoothquant import smooth_measured

    proto = onnx.load(str(src))
    down = [n for n in const_weight_matmuls(proto, ("MatMul",), options.exclude_nodes) if KEEP_W8A16.search(n.name)]
    if not down:
        return None
    return smooth_measured(proto, src, down, feeds, options.smoothquant_alpha, work_dir, threads)


def write_dynamic_int8_matmuls(src: Path, dst: Path, exclude: tuple[str, ...] = (),
                               keep_w8a16: bool = True) -> tuple[int, int]:
    """Rewrite src's linear MatMuls (but `exclude`, and KEEP_W8A16's unless keep_w8a16 is off) into the per-token
    int8 form; (rewritten, kept)."""
    import onnx
    from onnx import helper, numpy_helper

    from edgeact.export.quant_w8a16 import quantize_weight_int8

    proto = onnx.load(str(src))
    linear = const_weight_matmuls(proto, ("MatMul",), tuple(exclude))
    targets = {n.name for n in linear if not (keep_w8a16 and KEEP_W8A16.search(n.name))}
    if targets:        # before any opset-21 node goes in; MatMuls keep their names and weights
        ensure_opset(proto, CONVERTED_BELOW)
        linear = const_weight_matmuls(proto, ("MatMul",), tuple(exclude))
    inits = {t.name: t for t in proto.graph.initializer}
    consts = {"axes": np.array([-1], np.int64), "inv_max": np.array(1.0 / ACTIVATION_MAX, np.float32),
              "one": np.array(1.0, np.float32), "zp": np.array(ACTIVATION_ZERO_POINT, np.uint8)}
    if targets:
        proto.graph.initializer.extend(numpy_helper.from_array(v, f"{_PREFIX}/{k}") for k, v in consts.items())
    c = {k: f"{_PREFIX}/{k}" for k in consts}
    quantized: dict[str, tuple[str, str]] = {}     # float weight -> (int8 weight, scale); a weight may be shared
    # The zero point tensor has the scale's shape, (..., rows, 1): made once per row shape, read by every linear
    # layer whose input has those leading dims (a decode step: 2 nodes instead of 2 per layer).
    row_shapes = _row_shapes({n.input[0] for n in linear if n.name in targets}, proto) if targets else {}
    zero_points: dict[tuple, str] = {}
    nodes = []
    for node in proto.graph.node:
        if node.name not in targets:
            nodes.append(node)
            continue
        x, weight, y = node.input[0], node.input[1], node.output[0]
        if weight not in quantized:
            w = numpy_helper.to_array(inits[weight])
            q, scale = quantize_weight_int8(w, per_channel=True, max_q=WEIGHT_MAX)
            quantized[weight] = (f"{weight}_int8", f"{weight}_scale")
            proto.graph.initializer.extend([numpy_helper.from_array(q, quantized[weight][0]),
                                            numpy_helper.from_array(scale, quantized[weight][1])])
        w_int8, w_scale = quantized[weight]
        k_dim = int(inits[weight].dims[0])
        t = {s: f"{node.name}/{_PREFIX}/{s}" for s in ("abs", "max", "scale", "shape", "zp", "q", "y")}
        nodes += [
            helper.make_node("Abs", [x], [t["abs"]], name=t["abs"]),
            helper.make_node("ReduceMax", [t["abs"], c["axes"]], [t["max"]], name=t["max"], keepdims=1),
            # An all-zero row gets scale 0: its q is arbitrary, its output q * 0 = 0 (tested).
            helper.make_node("Mul", [t["max"], c["inv_max"]], [t["scale"]], name=t["scale"]),
        ]
        rows = row_shapes.get(x) or ("only", node.name)
        if rows not in zero_points:
            # The zero point must have the scale's shape (blocked QuantizeLinear): 128 for every row.
            zero_points[rows] = t["zp"]
            nodes += [helper.make_node("Shape", [t["scale"]], [t["shape"]], name=t["shape"]),
                      helper.make_node("Expand", [c["zp"], t["shape"]], [t["zp"]], name=t["zp"])]
        nodes += [
            helper.make_node("QuantizeLinear", [x, t["scale"], zero_points[rows]], [t["q"]], name=t["q"],
                             axis=-1, block_size=k_dim),
            helper.make_node("MatMulIntegerToFloat", [t["q"], w_int8, c["one"], w_scale, c["zp"]], [t["y"]],
                             name=node.name, domain="com.microsoft"),
            helper.make_node("Mul", [t["y"], t["scale"]], [y], name=f"{node.name}/{_PREFIX}/rescale"),
        ]
    replace_nodes(proto, nodes)
    if targets:
        _require_opset(proto)
    save_onnx(proto, dst)
    return len(targets), len(linear) - len(targets)


def _row_shapes(tensors: set[str], proto) -> dict[str, tuple]:
    """Each tensor's leading dims (all but the last) as onnxruntime's symbolic shape inference names them.

    Equal names mean equal sizes at run time (the inference unifies them), so tensors with equal
    leading dims can share one zero point. Tensors whose dims it cannot name are left out (each
    then gets its own), as is everything when it fails.
    """
    import logging

    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    previous = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)      # it logs every op it cannot infer as a warning
    try:
        inferred = SymbolicShapeInference.infer_shapes(_structure_only(proto), auto_merge=True)
    except Exception:   # noqa: BLE001 -- any failure only costs the sharing
        return {}
    finally:
        logging.getLogger().setLevel(previous)
    shapes = {}
    for value in (*inferred.graph.value_info, *inferred.graph.input):
        if value.name not in tensors:
            continue
        dims = value.type.tensor_type.shape.dim
        lead = tuple(d.dim_param if d.dim_param else (d.dim_value if d.HasField("dim_value") else None)
                     for d in dims[:-1])
        if dims and None not in lead:
            shapes[value.name] = lead
    return shapes


def _structure_only(proto):
    """The model without its big float tensors' data (names, types and dims stay), for shape inference.

    The inference copies the model, and evaluates ops whose inputs are all constants (a positional
    table's Unsqueeze); weight matrices feed only their MatMul, so theirs is the data it never reads.
    """
    from onnx import ModelProto, TensorProto

    light = ModelProto(ir_version=proto.ir_version)
    light.opset_import.extend(proto.opset_import)
    graph = light.graph
    for field in ("node", "input", "output", "value_info"):
        getattr(graph, field).extend(getattr(proto.graph, field))
    for tensor in proto.graph.initializer:
        if tensor.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16) and np.prod(tensor.dims) >= _BIG_TENSOR:
            graph.initializer.add(name=tensor.name, dims=tensor.dims, data_type=tensor.data_type)
        else:
            graph.initializer.append(tensor)
    return light


def _require_opset(proto) -> None:
    """Blocked QuantizeLinear is opset 21; a graph converted to CONVERTED_BELOW or newer means the same at 21."""
    from onnx import helper

    domains = {o.domain: o for o in proto.opset_import}
    default = domains.get("") or domains.get("ai.onnx")
    if default is None:
        proto.opset_import.append(helper.make_opsetid("", MIN_OPSET))
    elif default.version < MIN_OPSET:
        default.version = MIN_OPSET
    if "com.microsoft" not in domains:
        proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    proto.ir_version = max(proto.ir_version, 10)     # opset 21 needs IR 10


def _copy_model(src: Path, dst: Path) -> None:
    import onnx

    save_onnx(onnx.load(str(src)), dst)      # re-saved: external data is named after its file
