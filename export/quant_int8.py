"""INT8 recipe: per-channel symmetric weights, statically calibrated symmetric activations, as Q/DQ around linear layers.

onnxruntime.quantization.quantize_static writes the QDQ graph. Choices, for TensorRT first:
- symmetric activations and weights (zero point 0): TensorRT supports only symmetric INT8;
- weights per output channel (axis 1 of a MatMul's (in, out) weight), activations per tensor;
- MatMul with a constant weight only by default (MatMulConstBOnly), and its inputs only: Q/DQ
  on the attention's activation x activation products, on GEMM outputs (onnxruntime's default),
  norms or residual adds costs accuracy for little speed;
- MinMax calibration: the histogram methods stack every feed into one array and cannot mix a
  prefill chunk with single-token steps; ranges are merged after every few feeds to bound memory;
- optional SmoothQuant (export/smoothquant.py) before calibration, for outlier channels.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Iterator

from edgeact.export.quant_feeds import FeedSource, const_weight_matmuls, is_big, tensor_stats
from edgeact.export.quant_options import QuantizeOptions, require_targets
from edgeact.runtime.errors import ConfigError



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

    _range_cache_api()          # before the smoothing and the range statistics, minutes of work
    notes: dict[str, Any] = {"format": "qdq", "activations": "int8 per-tensor symmetric, minmax",
                             "weights": "int8 per-channel symmetric" if options.per_channel else "int8 per-tensor symmetric"}
    proto = onnx.load(str(src))
    nodes = target_nodes(proto, options)
    require_targets(nodes, src, options)
    if options.smoothquant_alpha is not None:
        from edgeact.export.smoothquant import smooth_measured

        linear = [n for n in const_weight_matmuls(proto, ("MatMul",), options.exclude_nodes) if n.name in set(nodes)]
        src, notes["smoothquant"] = smooth_measured(proto, src, linear, feeds, options.smoothquant_alpha, work_dir,
                                                    threads)
    cache = work_dir / "int8_ranges.json"
    # Per-tensor ranges only: QK^T / PV inputs and Softmax have the sequence length as their last axis.
    _write_range_cache(cache, tensor_stats(src, _calibrated_tensors(proto, nodes), feeds, work_dir, threads,
                                           channels=False))
    big = is_big(proto)
    del proto
    # Outputs stay float: Q/DQ on a GEMM's output would round the residual stream it is added to.
    extra = {"ActivationSymmetric": True, "WeightSymmetric": True, "MatMulConstBOnly": not options.quantize_attention,
             "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1},
             "OpTypesToExcludeOutputQuantization": list(options.op_types), "DedicatedQDQPair": True}
    with quiet_quantizer_logs():
        quantize_static(str(src), str(dst), None, quant_format=QuantFormat.QDQ, calibration_cache_path=str(cache),
                        op_types_to_quantize=list(options.op_types), nodes_to_quantize=nodes,
                        per_channel=options.per_channel, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax, use_external_data_format=big,
                        extra_options={**extra, **options.extra.get("ort_extra_options", {})})
    notes["quantized_nodes"] = count_qdq_matmuls(dst)
    return notes


def _calibrated_tensors(proto, node_names: list[str]) -> list[str]:
    """Activations into the nodes to quantize: the tensors that get a Q/DQ pair."""
    wanted = set(node_names)
    inits = {t.name for t in proto.graph.initializer}
    return sorted({t for n in proto.graph.node if n.name in wanted for t in n.input if t and t not in inits})


def _write_range_cache(path: Path, stats) -> None:
    """Ranges computed feed by feed, handed to quantize_static as its calibration cache.

    onnxruntime's own MinMax calibrator keeps every feed's activations until the end (gigabytes
    for a decoder over whole answers), and its CalibMaxIntermediateOutputs option drops the
    collected feeds instead of merging them (onnxruntime 1.32).
    """
    import numpy as np

    calibrate = _range_cache_api()
    CalibrationMethod, TensorData = calibrate.CalibrationMethod, calibrate.TensorData
    TensorsData, save_tensors_data = calibrate.TensorsData, calibrate.save_tensors_data

    data = {name: TensorData(lowest=np.float32(min(s.min, 0.0)), highest=np.float32(max(s.max, 0.0)))
            for name, s in stats.items()}
    save_tensors_data(TensorsData(CalibrationMethod.MinMax, data), path)


def _range_cache_api():
    """onnxruntime.quantization.calibrate, which hands quantize_static its ranges (save_tensors_data), or a
    ConfigError: an older build (1.23.2, the newest for a Jetson's Python 3.10) lacks it."""
    import onnxruntime
    from onnxruntime.quantization import calibrate

    if not hasattr(calibrate, "save_tensors_data"):
        raise ConfigError(f"the int8 quantizer hands its ranges to onnxruntime through save_tensors_data, which "
                          f"onnxruntime {onnxruntime.__version__} here lacks; quantize with the tested build "
                          "(pip install onnxruntime==1.32.0, as make setup installs)")
    return calibrate


def count_qdq_matmuls(path: Path) -> int:
    """MatMuls whose weight now comes out of a DequantizeLinear."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    dq_out = {n.output[0] for n in proto.graph.node if n.op_type == "DequantizeLinear"}
    return sum(1 for n in proto.graph.node if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1 and n.input[1] in dq_out)
