"""SmoothQuant on an ONNX graph: move activation outliers into the weights of the linear layers that read them.

LLM activations have a few channels 10-100x larger than the rest; a per-tensor INT8 scale set
by those channels leaves the others a handful of levels. SmoothQuant (Xiao et al., 2023)
divides each input channel j by s_j = max|X_j|^alpha / max|W_j|^(1-alpha) and multiplies row
j of every weight reading X by s_j: the product is unchanged, the activation is flatter and
the weight, quantized per output channel, absorbs the difference. The division is folded into
the norm gain that produces X when there is one (Qwen2's pre-norm blocks), else it is an
explicit Mul before the quantizer (TensorRT fuses it into the quantize scale).
onnxruntime's own SmoothQuant needs neural-compressor; this is the same transform, numpy only.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

_S_RANGE = (1e-5, 1e5)     # keep scales finite for channels that are all zero


def smooth_scales(act_absmax: np.ndarray, weight_absmax: np.ndarray, alpha: float) -> np.ndarray:
    act = np.maximum(act_absmax.astype(np.float64), 1e-8)
    weight = np.maximum(weight_absmax.astype(np.float64), 1e-8)
    return np.clip(act ** alpha / weight ** (1.0 - alpha), *_S_RANGE).astype(np.float32)


def apply_smoothquant(proto, nodes, act_absmax: dict[str, np.ndarray], alpha: float) -> list[dict[str, Any]]:
    """Smooth the activation inputs of `nodes` (const-weight MatMuls) in place; one row per smoothed tensor."""
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in proto.graph.initializer}
    readers = defaultdict(list)
    for node in nodes:
        readers[node.input[0]].append(node)
    consumers = _consumers(proto)
    producers = {out: node for node in proto.graph.node for out in node.output}
    rows, added = [], []
    for tensor, matmuls in readers.items():
        if tensor not in act_absmax:
            continue
        weights = {n.input[1]: numpy_helper.to_array(inits[n.input[1]]) for n in matmuls}
        if any(consumers[w] != 1 for w in weights):
            continue                  # a weight shared with another node cannot be rescaled for this one alone
        w_absmax = np.max([np.abs(w).max(axis=1) for w in weights.values()], axis=0)
        scales = smooth_scales(act_absmax[tensor], w_absmax, alpha)
        for name, w in weights.items():
            inits[name].CopyFrom(numpy_helper.from_array((w * scales[:, None]).astype(np.float32), name))
        folded = _fold_into_gain(proto, producers.get(tensor), inits, consumers, tensor, len(matmuls), 1.0 / scales)
        if not folded:
            inv_name, out_name = f"{tensor}.smooth_inv", f"{tensor}.smoothed"
            proto.graph.initializer.append(numpy_helper.from_array((1.0 / scales).astype(np.float32), inv_name))
            added.append(helper.make_node("Mul", [tensor, inv_name], [out_name], name=f"{tensor}.smooth"))
            for n in matmuls:
                n.input[0] = out_name
        rows.append({"tensor": tensor, "layers": [n.input[1] for n in matmuls], "folded": folded,
                     "act_absmax": float(act_absmax[tensor].max()),
                     "act_absmax_smoothed": float((act_absmax[tensor] / scales).max())})
    _place_after_producers(proto, added)
    return rows


def smooth_measured(proto, src: Path, nodes, feeds, alpha: float, work_dir: Path,
                    threads: int | None = None) -> tuple[Path, dict[str, Any]]:
    """Smooth `nodes` of `proto` (the graph loaded from `src`) in place, with their inputs' channel ranges measured
    on the calibration `feeds`; save it to work_dir/smoothed.onnx; (that path, the manifest's notes)."""
    from edgeact.export.quant_feeds import save_onnx, tensor_stats

    stats = tensor_stats(src, sorted({n.input[0] for n in nodes}), feeds, work_dir, threads)
    rows = apply_smoothquant(proto, nodes, {k: v.channel_absmax for k, v in stats.items()}, alpha)
    path = Path(work_dir) / "smoothed.onnx"
    save_onnx(proto, path)
    return path, {"alpha": alpha, "tensors": len(rows), "folded_into_norms": sum(r["folded"] for r in rows),
                  "max_act_absmax_before": round(max((r["act_absmax"] for r in rows), default=0.0), 4),
                  "max_act_absmax_after": round(max((r["act_absmax_smoothed"] for r in rows), default=0.0), 4)}


def _consumers(proto) -> dict[str, int]:
    count: dict[str, int] = defaultdict(int)
    for node in proto.graph.node:
        for name in node.input:
            count[name] += 1
    for out in proto.graph.output:
        count[out.name] += 1
    return count


def _fold_into_gain(proto, producer, inits, consumers, tensor: str, n_readers: int, factor: np.ndarray) -> bool:
    """If `tensor` = Mul(x, gain) with a 1-D gain read by nothing else, scale the gain instead of adding a Mul."""
    from onnx import numpy_helper

    if producer is None or producer.op_type != "Mul" or consumers[tensor] != n_readers:
        return False
    for name in producer.input:
        gain = inits.get(name)
        if gain is not None and len(gain.dims) == 1 and gain.dims[0] == factor.shape[0] and consumers[name] == 1:
            value = numpy_helper.to_array(gain)
            inits[name].CopyFrom(numpy_helper.from_array((value * factor).astype(value.dtype), name))
            return True
    return False


def _place_after_producers(proto, added: list) -> None:
    """Put each added Mul right after the node that makes its input (ONNX wants nodes in topological order)."""
    after: dict[str, list] = defaultdict(list)
    for node in added:
        after[node.input[0]].append(node)
    ordered = [n for i in proto.graph.input for n in after.pop(i.name, [])]
    for node in proto.graph.node:
        ordered.append(node)
        for out in node.output:
            ordered += after.pop(out, [])
    del proto.graph.node[:]
    proto.graph.node.extend(ordered)
