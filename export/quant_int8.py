"""INT8 recipe: per-channel symmetric weights, statically calibrated symmetric activations, as Q/DQ around linear layers.

onnxruntime.quantization.quantize_static writes the QDQ graph. Choices, for TensorRT first:
- symmetric activations and weights (zero point 0): TensorRT supports only symmetric INT8;
- weights per output channel (axis 1 of a MatMul's (in, out) weight), activations per tensor;
- MatMul with a constant weight only by default (MatMulConstBOnly): Q/DQ on the attention's
  activation x activation products and on norms / residual adds costs accuracy for little speed;
- MinMax calibration: the histogram methods stack every feed into one array and cannot mix a
  prefill chunk with single-token steps; ranges are merged after every few feeds to bound memory;
- optional SmoothQuant (export/smoothquant.py) before calibration, for outlier channels.
"""
from __future__ import annotations

import contextlib
import logging
import shutil
from pathlib import Path
from typing import Any, Iterator

from edgeact.export.quant_feeds import FeedSource, activation_absmax, as_calibration_reader, const_weight_matmuls
from edgeact.export.quant_options import QuantizeOptions

_MERGE_EVERY_FEEDS = 4


@contextlib.contextmanager
def quiet_quantizer_logs() -> Iterator[None]:
    """onnxruntime.quantization logs every skipped node at INFO and advises pre-processing on the root logger."""
    loggers = [logging.getLogger(), logging.getLogger("onnxruntime"), logging.getLogger("onnxruntime.quantization")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def target_nodes(proto, options: QuantizeOptions) -> list[str]:
    """Names of the nodes to quantize: linear layers (constant weight), plus the attention products if asked."""
    names = [n.name for n in const_weight_matmuls(proto, ("MatMul", "Gemm"), options.exclude_nodes)
             if n.op_type in options.op_types]
    others = [n.name for n in proto.graph.node if n.op_type in options.op_types and n.name not in names
              and n.name not in options.exclude_nodes and (options.quantize_attention or n.op_type != "MatMul")]
    return names + others


def quantize_int8(src: Path, dst: Path, feeds: FeedSource, options: QuantizeOptions, work_dir: Path,
                  threads: int | None = None) -> dict[str, Any]:
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    notes: dict[str, Any] = {"format": "qdq", "activations": "int8 per-tensor symmetric, minmax",
                             "weights": "int8 per-channel symmetric" if options.per_channel else "int8 per-tensor symmetric"}
    proto = onnx.load(str(src))
    nodes = target_nodes(proto, options)
    if options.smoothquant_alpha is not None:
        linear = const_weight_matmuls(proto, ("MatMul",), options.exclude_nodes)
        linear = [n for n in linear if n.name in set(nodes)]
        absmax = activation_absmax(src, sorted({n.input[0] for n in linear}), feeds, work_dir, threads)
        from edgeact.export.smoothquant import apply_smoothquant

        rows = apply_smoothquant(proto, linear, absmax, options.smoothquant_alpha)
        smoothed = work_dir / "smoothed.onnx"
        onnx.save_model(proto, str(smoothed), save_as_external_data=_big(proto), all_tensors_to_one_file=True,
                        location="smoothed.onnx.data")
        src = smoothed
        notes["smoothquant"] = {"alpha": options.smoothquant_alpha, "tensors": len(rows),
                                "folded_into_norms": sum(r["folded"] for r in rows),
                                "max_act_absmax_before": max((r["act_absmax"] for r in rows), default=0.0),
                                "max_act_absmax_after": max((r["act_absmax_smoothed"] for r in rows), default=0.0)}
    big = _big(proto)
    del proto
    extra = {"ActivationSymmetric": True, "WeightSymmetric": True, "MatMulConstBOnly": not options.quantize_attention,
             "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1}, "CalibMaxIntermediateOutputs": _MERGE_EVERY_FEEDS}
    with quiet_quantizer_logs():
        quantize_static(str(src), str(dst), as_calibration_reader(feeds), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=list(options.op_types), nodes_to_quantize=nodes,
                        per_channel=options.per_channel, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax, use_external_data_format=big,
                        extra_options={**extra, **options.extra.get("ort_extra_options", {})})
    notes["quantized_nodes"] = count_qdq_matmuls(dst)
    return notes


def count_qdq_matmuls(path: Path) -> int:
    """MatMuls whose weight now comes out of a DequantizeLinear."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    dq_out = {n.output[0] for n in proto.graph.node if n.op_type == "DequantizeLinear"}
    return sum(1 for n in proto.graph.node if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1 and n.input[1] in dq_out)


def _big(proto) -> bool:
    return sum(len(t.raw_data) for t in proto.graph.initializer) > (1 << 30)


def copy_stage(src: Path, dst_dir: Path, external: tuple[Path, ...] = ()) -> Path:
    """A private copy of a source stage (and its external data) to quantize: the source bundle is only read."""
    dst_dir.mkdir(parents=True, exist_ok=True)
    for path in (src, *external):
        shutil.copyfile(path, dst_dir / path.name)
    return dst_dir / src.name
