"""Optional backend: NVIDIA ModelOpt's ONNX post-training quantization (`--backend modelopt`), where it is installed.

Why it is optional, and what it was seen to do, is in export/quantize.py's docstring. Here:
calibration runs on the CPU (calibration_eps=['cpu']: ModelOpt's default asks for CUDA and
TensorRT first); activation ranges use "max" (its default "entropy" for int8 builds histograms
that cannot mix a prefill chunk with single-token steps); int4 uses "rtn_dq" (block-wise RTN
written as int4 DequantizeLinear + MatMul, the TensorRT W4A16 pattern), not AWQ.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from edgeact.export.quant_feeds import FeedSource, as_calibration_reader, is_big
from edgeact.export.quant_options import QuantizeOptions
from edgeact.runtime.errors import EdgeactError

MODELOPT_MISSING = ("--backend modelopt needs NVIDIA ModelOpt, which is not installed here. Install it in a separate "
                    "environment (pip install 'nvidia-modelopt[onnx]==0.47.0', then replace its onnxruntime-gpu and "
                    "cupy with the CPU onnxruntime), or use --backend onnxruntime")


def require_modelopt():
    try:
        import modelopt.onnx.quantization as moq
    except ImportError:
        raise EdgeactError(MODELOPT_MISSING) from None
    return moq


def quantize_modelopt(src: Path, dst: Path, feeds: FeedSource, options: QuantizeOptions, work_dir: Path,
                      threads: int | None = None) -> dict[str, Any]:
    import onnx

    moq = require_modelopt()

    big = is_big(onnx.load(str(src), load_external_data=False)) or bool(list(src.parent.glob(f"{src.name}.data")))
    kwargs: dict[str, Any] = dict(
        quantize_mode=options.precision, calibration_data_reader=as_calibration_reader(feeds),
        calibration_method="rtn_dq" if options.precision == "int4" else "max", calibration_eps=["cpu"],
        output_path=str(dst), op_types_to_quantize=list(options.op_types),
        nodes_to_exclude=list(options.exclude_nodes) or None, high_precision_dtype="fp32", log_level="WARNING",
        use_external_data_format=big)
    if options.precision == "int4":
        kwargs["block_size"] = options.block_size
    moq.quantize(str(src), **kwargs)
    proto = onnx.load(str(dst), load_external_data=False)
    counts = {op: sum(1 for n in proto.graph.node if n.op_type == op) for op in ("QuantizeLinear", "DequantizeLinear")}
    return {"format": "qdq", "backend": "modelopt", "calibration": kwargs["calibration_method"], **counts}
