"""INT4 recipe: weight-only, block-wise symmetric round-to-nearest over the input dim of every linear layer.

onnxruntime.quantization's MatMulNBitsQuantizer (the DefaultWeightOnlyQuantConfig, RTN) writes
it in one of two forms:
- `nbits`: com.microsoft MatMulNBits, onnxruntime's fused 4-bit kernel (the CPU runs it; its
  accuracy_level picks fp32 ... int8 compute);
- `qdq`: a standard int4 DequantizeLinear with a block size (opset 21) feeding a MatMul, the
  W4A16 pattern TensorRT builds weight-only INT4 GEMMs from. MatMulNBits is a contrib op
  TensorRT cannot parse, so TensorRT targets get this form.
No calibration data: RTN needs none (activation-aware variants such as AWQ would).
The int8 weight-only recipe (export/quant_w8a16.py) writes its MatMulNBits form with
`write_matmul_nbits` too.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from edgeact.export.quant_feeds import FeedSource, const_weight_matmuls, save_onnx
from edgeact.export.quant_int8 import quiet_quantizer_logs
from edgeact.export.quant_options import QuantizeOptions


def quantize_int4(src: Path, dst: Path, feeds: FeedSource, options: QuantizeOptions, work_dir: Path,
                  threads: int | None = None) -> dict[str, Any]:
    fmt = options.resolved_int4_format()
    count = write_matmul_nbits(src, dst, options, bits=4, qdq=fmt == "qdq")
    return {"format": fmt, "weights": f"int4 symmetric, blocks of {options.block_size} (RTN)", "activations": "fp32",
            "quantized_nodes": count, "accuracy_level": options.accuracy_level if fmt == "nbits" else None}


def write_matmul_nbits(src: Path, dst: Path, options: QuantizeOptions, bits: int, qdq: bool = False) -> int:
    """Block-wise symmetric RTN of every linear MatMul's weight to `bits`, saved at dst; returns the nodes quantized.

    qdq: a blocked DequantizeLinear + MatMul instead of MatMulNBits (onnxruntime writes it for 4 bits only).
    """
    import onnx
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    proto = onnx.load(str(src))
    linear = {n.name for n in const_weight_matmuls(proto, ("MatMul",))}
    # Activation x activation MatMuls (attention) have no weight to quantize.
    exclude = [n.name for n in proto.graph.node if n.op_type == "MatMul" and n.name not in linear]
    exclude += list(options.exclude_nodes)
    config = DefaultWeightOnlyQuantConfig(
        block_size=options.block_size, is_symmetric=True, accuracy_level=options.accuracy_level, bits=bits,
        quant_format=QuantFormat.QDQ if qdq else QuantFormat.QOperator, op_types_to_quantize=("MatMul",))
    with quiet_quantizer_logs():
        quantizer = MatMulNBitsQuantizer(proto, nodes_to_exclude=exclude, algo_config=config)
        quantizer.process()
    result = quantizer.model.model
    save_onnx(result, dst)
    op = "DequantizeLinear" if qdq else "MatMulNBits"
    return sum(1 for n in result.graph.node if n.op_type == op)
