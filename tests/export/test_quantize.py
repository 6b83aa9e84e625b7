"""`edgeact quantize`: int8 (w8a8, w8a16, w8a8-dynamic), fp8, int4 bundles load, run and decode; the source stays untouched."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from edgeact.export.quant_decode import OrtBundle
from edgeact.export.quant_fp8 import E4M3_MAX, fp8_scale, to_e4m3
from edgeact.export.quant_options import QuantizeOptions
from edgeact.export.quant_report import stage_bytes
from edgeact.export.quantize import quantize_bundle
from edgeact.export.smoothquant import apply_smoothquant
from edgeact.runtime import stage_io as io
from edgeact.runtime.bundle import load_bundle
from edgeact.runtime.cli import main
from edgeact.runtime.errors import BundleError, ConfigError
from tests.export.quant_fixtures import tiny_sources, tree_digest, with_depth_tokenizer

RECIPES = {
    "int8": QuantizeOptions("int8", int8_mode="w8a8"),
    "int8-smoothquant": QuantizeOptions("int8", smoothquant_alpha=0.5),      # static w8a8 with SmoothQuant
    "int8-w8a16": QuantizeOptions("int8", int8_mode="w8a16", block_size=32),
    "int8-dynamic": QuantizeOptions("int8"),                            # the default int8 mode on onnxruntime
    "int8-dynamic-w8a16": QuantizeOptions("int8", block_size=32, down_projections="w8a16"),
    "int8-w8a16-orin": QuantizeOptions("int8", int8_mode="w8a16", target="orin"),   # its TensorRT form
    "fp8": QuantizeOptions("fp8", target="thor"),
    "int4": QuantizeOptions("int4", block_size=32),
}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    return tiny_sources(tmp_path_factory)


@pytest.fixture(scope="module")
def quantized(sources, tmp_path_factory):
    """Each recipe's bundle, and the source bundle's digest before and after all of them."""
    before = tree_digest(sources["bundle"])
    root = tmp_path_factory.mktemp("quantized")
    # int4 goes under a directory that does not exist yet: quantize creates the parents it needs.
    # TensorRT targets quantize the portable decoder.
    results = {name: quantize_bundle(sources["portable" if options.target else "bundle"],
                                     root / ("missing-parent" if name == "int4" else "") / name,
                                     options, sources["calibration"] if options.needs_calibration else None,
                                     report_frames=1, threads=1)
               for name, options in RECIPES.items()}
    return results, before, tree_digest(sources["bundle"])


def test_a_tensorrt_target_refuses_the_fused_decoder_before_any_work(sources, tmp_path):
    with pytest.raises(BundleError, match=r"fused decoder .* which TensorRT \(orin\) cannot run; export the bundle "
                                          r"with `edgeact export --attention portable`"):
        quantize_bundle(sources["bundle"], tmp_path / "q", QuantizeOptions("int8", int8_mode="w8a16", target="orin"))
    assert not (tmp_path / "q").exists()


def test_missing_parent_directories_of_the_output_are_created(quantized):
    results, _, _ = quantized
    out = results["int4"].out
    assert out.parent.name == "missing-parent"
    assert load_bundle(out, allow_failed_verification=True).stage(io.DECODER_STAGE).precision == "int4"


def _graph(bundle_dir, stage=io.DECODER_STAGE):
    bundle = load_bundle(bundle_dir)
    return onnx.load(str(bundle.stage_path(stage)))


@pytest.mark.parametrize("name", list(RECIPES))
def test_quantized_bundle_loads_runs_and_decodes_a_full_answer(quantized, name):
    results, _, _ = quantized
    bundle = load_bundle(results[name].out, verify_checksums=True)
    runner = OrtBundle(bundle, threads=1)
    from edgeact.calibration.calibration_build import synthetic_frames
    from edgeact.runtime.prompt import build_prompt_ids

    _, rgb, _ = next(synthetic_frames(1, seed=3, held_out=True))
    inputs = runner.io.preprocessor(rgb)
    answer = runner.decode(build_prompt_ids(runner.io.tokenizer, runner.io.layout, "touch the blue box", inputs), inputs)
    parsed = runner.io.grammar.parse_ids(answer.token_ids.tolist())     # raises unless the answer is complete
    assert len(parsed.depth_codes) == 100 and parsed.action_ids.size == 7
    assert answer.token_ids[-1] == runner.io.layout.bos_id


def test_source_bundle_is_byte_identical_afterwards(quantized):
    _, before, after = quantized
    assert before == after


@pytest.mark.parametrize("name", list(RECIPES))
def test_manifest_records_recipe_options_report_and_stage_precisions(quantized, name):
    results, _, _ = quantized
    options = RECIPES[name]
    precision = options.precision
    m = load_bundle(results[name].out).manifest
    q = m.quantization
    assert q.recipe == results[name].recipe and q.recipe.startswith(precision)
    assert q.options["precision"] == precision and q.options["stages"].keys() == set(options.stages)
    assert q.options["int8_mode"] == options.int8_mode and (options.int8_mode is None) is (precision != "int8")
    assert q.options["calibration"]["used"] is options.needs_calibration
    assert [row["precision"] for row in q.report] == ["fp32", precision]
    for stage, spec in m.stages.items():
        assert spec.precision == (precision if stage in options.stages else "fp32")
    assert m.verification.status == "not_run"        # the copy's verdict is not inherited
    assert m.weights[io.EMBEDDING_WEIGHT].dtype == "float32"


def test_int8_puts_qdq_only_around_linear_matmuls(quantized, sources):
    results, _, _ = quantized
    assert results["int8"].recipe == "int8-qdq"
    source = _graph(sources["bundle"])
    inits = {t.name for t in source.graph.initializer}
    linear = {n.name for n in source.graph.node if n.op_type == "MatMul" and n.input[1] in inits}
    # Attention: the activation x activation MatMuls of a portable decoder, the GroupQueryAttention nodes of a fused one.
    attention = {n.name for n in source.graph.node if n.op_type in ("MatMul", "GroupQueryAttention")} - linear
    graph = _graph(results["int8"].out)
    dq_outputs = {n.output[0] for n in graph.graph.node if n.op_type == "DequantizeLinear"}
    readers = {n.name: n for n in graph.graph.node}
    # Shape nodes may read a dequantized tensor (dims only); no arithmetic but the linear MatMuls does.
    quantized_ops = {n.name for n in graph.graph.node if any(i in dq_outputs for i in n.input) and n.op_type != "Shape"}
    assert quantized_ops == linear and attention and not attention & quantized_ops
    for node in graph.graph.node:
        if node.name in linear:
            assert all(i in dq_outputs for i in node.input[:2]), node.name   # activation and weight both Q/DQ
    assert all(readers[name].op_type == "MatMul" for name in quantized_ops)
    weights = [t for t in graph.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2]
    assert len(weights) == len(linear)


def _linear_weights(graph) -> dict[str, np.ndarray]:
    """Float weight of each constant-weight MatMul, by node name."""
    inits = {t.name: t for t in graph.graph.initializer}
    return {n.name: numpy_helper.to_array(inits[n.input[1]]) for n in graph.graph.node
            if n.op_type == "MatMul" and n.input[1] in inits}


def test_int8_w8a16_is_weight_only_matmulnbits_8_bit_for_onnxruntime(quantized, sources):
    results, _, _ = quantized
    assert results["int8-w8a16"].recipe == "int8-w8a16-nbits"
    linear = _linear_weights(_graph(sources["bundle"]))
    graph = _graph(results["int8-w8a16"].out)
    ops = [n.op_type for n in graph.graph.node]
    assert ops.count("MatMulNBits") == len(linear) == results["int8-w8a16"].stage_notes["decoder"]["quantized_nodes"]
    assert "QuantizeLinear" not in ops and "DequantizeLinear" not in ops       # activations stay float
    assert not _linear_weights(graph)
    for node in graph.graph.node:
        if node.op_type == "MatMulNBits":
            attrs = {a.name: a.i for a in node.attribute}
            assert (attrs["bits"], attrs["block_size"], attrs["accuracy_level"]) == (8, 32, 4)
    # Weights shrink to a byte plus a float scale per 32: the linear layers' bytes drop to ~0.28x.
    fp32_bytes, w8a16_bytes = (stage_bytes(load_bundle(b))["decoder"]
                               for b in (sources["bundle"], results["int8-w8a16"].out))
    weight_bytes = sum(w.nbytes for w in linear.values())
    assert (weight_bytes - (fp32_bytes - w8a16_bytes)) / weight_bytes <= 0.3


def _check_per_token_int8(graph, n_nodes):
    """Every MatMulIntegerToFloat reads an int8 weight and activations quantized per row with a run-time scale."""
    inits = {t.name: t for t in graph.graph.initializer}
    by_output = {o: n for n in graph.graph.node for o in n.output}
    ops = [n.op_type for n in graph.graph.node]
    assert ops.count("MatMulIntegerToFloat") == ops.count("QuantizeLinear") == n_nodes
    for node in graph.graph.node:
        if node.op_type == "MatMulIntegerToFloat":
            weight = inits[node.input[1]]
            assert weight.data_type == onnx.TensorProto.INT8 and len(weight.dims) == 2
            quant = by_output[node.input[0]]                  # the activations: one scale per row, at run time
            attrs = {a.name: a.i for a in quant.attribute}
            assert quant.op_type == "QuantizeLinear" and attrs == {"axis": -1, "block_size": weight.dims[0]}
            assert by_output[quant.input[1]].op_type == "Mul"     # the scale is computed in the graph
    # Every decoder linear layer reads (batch, seq, width) rows: one zero point tensor serves them all.
    assert ops.count("Expand") == 1
    opset = {o.domain: o.version for o in graph.opset_import}
    assert opset[""] >= 21 and "com.microsoft" in opset


def test_int8_dynamic_quantizes_each_token_with_the_down_projections_smoothed(quantized, sources):
    from edgeact.export.quant_dynamic import KEEP_W8A16

    results, _, _ = quantized
    result = results["int8-dynamic"]
    assert result.recipe == "int8-w8a8-dynamic"
    linear = _linear_weights(_graph(sources["bundle"]))
    down = [name for name in linear if KEEP_W8A16.search(name)]
    assert down and len(down) < len(linear)                   # the tiny model has its MLP down-projections
    graph = _graph(result.out)
    ops = [n.op_type for n in graph.graph.node]
    assert "MatMulNBits" not in ops and not _linear_weights(graph)
    _check_per_token_int8(graph, len(linear))
    notes = result.stage_notes["decoder"]
    assert notes["quantized_nodes"] == len(linear) and notes["w8a16_nodes"] == 0
    assert notes["smoothquant"]["tensors"] == len(down) and notes["smoothquant"]["alpha"] == 0.5
    # Each down-projection's input is divided by its channel scales in one Mul before the row's quantizer.
    by_output = {o: n for n in graph.graph.node for o in n.output}
    inits = {t.name: numpy_helper.to_array(t) for t in graph.graph.initializer}
    for name in down:
        node = next(n for n in graph.graph.node if n.name == name)
        smooth = by_output[by_output[node.input[0]].input[0]]
        assert smooth.op_type == "Mul" and smooth.name.endswith(".smooth")
        inv = inits[smooth.input[1]]
        assert inv.shape == (linear[name].shape[0],) and np.all(inv > 0) and not np.allclose(inv, 1.0)
    options = load_bundle(result.out).manifest.quantization.options
    assert options["calibration"]["used"] is True and options["down_projections"] == "smoothquant"


def test_static_int8_with_smoothquant_records_its_smoothing(quantized, sources):
    results, _, _ = quantized
    result = results["int8-smoothquant"]
    assert result.recipe == "int8-smoothquant-qdq"
    notes = result.stage_notes["decoder"]["smoothquant"]
    linear = _linear_weights(_graph(sources["bundle"]))
    # The linear layers' inputs are smoothed: those made by an RMSNorm through its gain, the others by a Mul.
    graph = _graph(result.out)
    muls = [n for n in graph.graph.node if n.name.endswith(".smooth")]
    assert notes["alpha"] == 0.5 and 0 < notes["tensors"] <= len(linear)
    assert notes["folded_into_norms"] > 0 and notes["tensors"] == notes["folded_into_norms"] + len(muls)
    assert notes["max_act_absmax_after"] < notes["max_act_absmax_before"]


def test_int8_dynamic_can_keep_the_down_projections_w8a16_without_calibration(quantized, sources):
    from edgeact.export.quant_dynamic import KEEP_W8A16

    results, _, _ = quantized
    result = results["int8-dynamic-w8a16"]
    linear = _linear_weights(_graph(sources["bundle"]))
    down = [name for name in linear if KEEP_W8A16.search(name)]
    graph = _graph(result.out)
    ops = [n.op_type for n in graph.graph.node]
    _check_per_token_int8(graph, len(linear) - len(down))
    assert ops.count("MatMulNBits") == len(down) == result.stage_notes["decoder"]["w8a16_nodes"]
    assert result.stage_notes["decoder"]["quantized_nodes"] == len(linear) and not _linear_weights(graph)
    assert "smoothquant" not in result.stage_notes["decoder"] and not any(n.name.endswith(".smooth")
                                                                           for n in graph.graph.node)
    assert load_bundle(result.out).manifest.quantization.options["calibration"]["used"] is False


def test_smoothing_a_down_projection_cuts_its_per_token_int8_error_on_outlier_channels(tmp_path):
    """A few loud input channels (SiLU(gate) * up's) crush a row's other channels under one per-token scale; after
    SmoothQuant the same per-token int8 product is about 3x closer to the float one, and still equals it in
    exact arithmetic (the Mul by 1/s and the weight's rows times s cancel)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from edgeact.export.quant_dynamic import smooth_down_projections, write_dynamic_int8_matmuls

    rng = np.random.default_rng(0)
    k, n = 128, 48
    w = (rng.standard_normal((k, n)) * 0.1).astype(np.float32)

    def activations(rows):
        x = rng.standard_normal((rows, k)).astype(np.float32)
        x[:, [3, 40, 77]] *= 60.0                 # outlier channels, loud in every token
        return x

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="/blocks.0/mlp/ff_out/MatMul")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", n])], [numpy_helper.from_array(w, "w")])
    src = tmp_path / "fp32.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(src))
    calibration = [activations(16) for _ in range(4)]
    smoothed, notes = smooth_down_projections(src, lambda: iter({"x": x} for x in calibration),
                                              QuantizeOptions("int8"), tmp_path)
    assert notes["tensors"] == 1 and notes["max_act_absmax_after"] < notes["max_act_absmax_before"] / 10
    x = activations(32)
    exact = x @ w
    errors = {}
    for label, path in (("plain", src), ("smoothed", smoothed)):
        dst = tmp_path / f"{label}-dynamic.onnx"
        assert write_dynamic_int8_matmuls(path, dst, keep_w8a16=False) == (1, 0)
        if label == "smoothed":                   # the smoothed float graph alone: the same product
            y_float = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
            np.testing.assert_allclose(y_float, exact, rtol=1e-4, atol=1e-4 * np.abs(exact).max())
        y = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        errors[label] = np.linalg.norm(y - exact) / np.linalg.norm(exact)
    assert errors["smoothed"] < errors["plain"] / 2 and errors["smoothed"] < 0.015, errors   # 0.0085 vs 0.026


def _dynamic_graph(tmp_path, weight, exclude=(), name="/blocks.0/mlp/ff_proj/MatMul"):
    from onnx import TensorProto, helper

    from edgeact.export.quant_dynamic import write_dynamic_int8_matmuls

    k, n = weight.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name=name)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", n])], [numpy_helper.from_array(weight, "w")])
    src, dst = tmp_path / "fp32.onnx", tmp_path / "dynamic.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(src))
    counts = write_dynamic_int8_matmuls(src, dst, exclude)
    return dst, counts


def test_dynamic_int8_matmul_is_per_token_int8_arithmetic(tmp_path):
    """onnxruntime's result equals numpy's per-row uint8 x per-channel int8 product; small rows keep their precision."""
    import onnxruntime as ort

    from edgeact.export.quant_w8a16 import quantize_weight_int8

    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 48)).astype(np.float32)
    path, counts = _dynamic_graph(tmp_path, w)
    assert counts == (1, 0)
    x = rng.standard_normal((5, 64)).astype(np.float32)
    x[1] *= 1e-3                  # a quiet token beside loud ones: its own scale
    x[2] = 0.0                    # an all-zero row: scale 0, output exactly 0
    x[3, 7] = 40.0                # an outlier in one token only
    y = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]

    from edgeact.export.quant_dynamic import WEIGHT_MAX

    wq, w_scale = quantize_weight_int8(w, max_q=WEIGHT_MAX)
    assert WEIGHT_MAX == 63 and np.abs(wq).max() == 63    # 2 x 255 x 63 fits int16: no U8S8 saturation (AVX2)
    scale = np.abs(x).max(axis=1, keepdims=True) / 127
    q = np.clip(np.rint(np.divide(x, scale, out=np.zeros_like(x), where=scale > 0)), -127, 127)
    expected = (q @ wq.astype(np.float32)) * w_scale * scale
    assert np.all(np.isfinite(y)) and np.all(y[2] == 0.0)
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())
    exact = x @ w
    for row in (0, 1, 3, 4):      # every row within 7-bit x 8-bit rounding of its own range, the quiet one too
        assert np.linalg.norm(y[row] - exact[row]) <= 0.03 * np.linalg.norm(exact[row])


def test_dynamic_int8_leaves_excluded_and_down_projection_matmuls_alone(tmp_path):
    w = np.ones((8, 4), np.float32)
    path, counts = _dynamic_graph(tmp_path, w, exclude=("/blocks.0/mlp/ff_proj/MatMul",))
    assert counts == (0, 0)       # excluded: stays float
    graph = onnx.load(str(path))
    assert [n.op_type for n in graph.graph.node] == ["MatMul"]       # untouched, and no opset raised for nothing
    assert {o.domain: o.version for o in graph.opset_import}[""] == 17
    path, counts = _dynamic_graph(tmp_path, w, name="/transformer/blocks.3/mlp/ff_out/MatMul")
    assert counts == (0, 1)       # a down-projection: left for the recipe's W8A16 pass
    assert [n.op_type for n in onnx.load(str(path)).graph.node] == ["MatMul"]


def test_dynamic_int8_shares_a_zero_point_where_shape_inference_proves_equal_rows(tmp_path, monkeypatch):
    """Two layers reading the same rows share one; if the inference fails each gets its own, with equal results."""
    import onnxruntime as ort
    from onnx import TensorProto, helper
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    from edgeact.export.quant_dynamic import write_dynamic_int8_matmuls

    rng = np.random.default_rng(1)
    w1, w2 = rng.standard_normal((16, 8)).astype(np.float32), rng.standard_normal((16, 4)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["y1"], name="/a/MatMul"),
         helper.make_node("MatMul", ["x", "w2"], ["y2"], name="/b/MatMul")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "rows", 16])],
        [helper.make_tensor_value_info("y1", TensorProto.FLOAT, ["batch", "rows", 8]),
         helper.make_tensor_value_info("y2", TensorProto.FLOAT, ["batch", "rows", 4])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    src = tmp_path / "fp32.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(src))
    x = rng.standard_normal((2, 3, 16)).astype(np.float32)
    results = []
    for fails in (False, True):
        if fails:
            def broken(*args, **kwargs):
                raise RuntimeError("no shapes")
            monkeypatch.setattr(SymbolicShapeInference, "infer_shapes", staticmethod(broken))
        dst = tmp_path / f"dynamic-{fails}.onnx"
        assert write_dynamic_int8_matmuls(src, dst) == (2, 0)
        ops = [n.op_type for n in onnx.load(str(dst)).graph.node]
        assert ops.count("Expand") == (2 if fails else 1)
        results.append(ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"]).run(None, {"x": x}))
    for shared, own in zip(*results):
        np.testing.assert_array_equal(shared, own)


def test_the_cli_choices_are_the_options_own():
    """The CLI keeps literal copies (so `edgeact --help` imports nothing): they must not drift from the options."""
    from edgeact.export import commands_quantize, quant_options

    assert commands_quantize.INT8_MODES == quant_options.INT8_MODES
    assert commands_quantize.DOWN_PROJECTIONS == quant_options.DOWN_PROJECTIONS
    assert commands_quantize.PRECISIONS == quant_options.PRECISIONS


def test_cli_quantize_int8_w8a8_dynamic_refuses_a_tensorrt_target(sources, tmp_path, capsys):
    rc = main(["quantize", str(sources["portable"]), "--precision", "int8", "--int8-mode", "w8a8-dynamic",
               "--target", "orin", "--out", str(tmp_path / "x")])
    assert rc == 2 and "use int8 mode w8a16 or w8a8 there" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_int8_w8a16_for_tensorrt_is_per_channel_int8_dequantize_into_matmul(quantized, sources):
    results, _, _ = quantized
    assert results["int8-w8a16-orin"].recipe == "int8-w8a16-qdq"
    linear = _linear_weights(_graph(sources["bundle"]))
    graph = _graph(results["int8-w8a16-orin"].out)
    inits = {t.name: numpy_helper.to_array(t) for t in graph.graph.initializer}
    dq = {n.output[0]: n for n in graph.graph.node if n.op_type == "DequantizeLinear"}
    ops = [n.op_type for n in graph.graph.node]
    assert "MatMulNBits" not in ops and "QuantizeLinear" not in ops and len(dq) == len(linear)
    for node in graph.graph.node:
        if node.name not in linear:
            assert not any(i in dq for i in node.input), node.name              # only linear weights are dequantized
            continue
        assert node.op_type == "MatMul" and node.input[0] not in dq             # activation float, weight int8
        weight_dq = dq[node.input[1]]
        q, scale = (inits[i] for i in weight_dq.input[:2])
        assert q.dtype == np.int8 and len(weight_dq.input) == 2               # no zero point: symmetric
        assert {a.name: a.i for a in weight_dq.attribute} == {"axis": 1}
        w = linear[node.name]
        assert scale.shape == (w.shape[1],) and np.abs(q).max() == 127     # one scale per output channel
        assert np.all(np.abs(q * scale - w) <= scale / 2 * 1.0001)          # round to nearest, per column


@pytest.mark.parametrize("name", ["int8-w8a16", "int8-w8a16-orin", "int8-dynamic", "int8-dynamic-w8a16"])
def test_int8_w8a16_and_dynamic_agree_with_fp32_within_the_int8_gate(quantized, name):
    """Teacher-forced agreement with the fp32 bundle on held-out frames (the quantize report's row)."""
    from edgeact.export.verify import GATES

    results, _, _ = quantized
    report = load_bundle(results[name].out).manifest.quantization.report
    assert report[1]["agreement_forced"] >= GATES["int8"].forced_agreement


def test_int8_mode_defaults_to_dynamic_on_onnxruntime_w8a16_for_tensorrt_and_w8a8_when_asked():
    default = QuantizeOptions("int8")
    assert default.int8_mode == "w8a8-dynamic" and not default.weight_only and default.needs_calibration
    assert (default.down_projections, default.smoothquant_alpha) == ("smoothquant", 0.5)   # channel ranges to measure
    kept = QuantizeOptions("int8", down_projections="w8a16")
    assert kept.int8_mode == "w8a8-dynamic" and not kept.needs_calibration and kept.smoothquant_alpha is None
    assert kept.accuracy_level == 4                      # its W8A16 down-projections: MatMulNBits' int8 kernel
    assert QuantizeOptions("int8", int8_mode="w8a8-dynamic", smoothquant_alpha=0.7).smoothquant_alpha == 0.7
    assert not QuantizeOptions("int8", stages=("vision", "connector")).needs_calibration    # no down-projection there
    assert QuantizeOptions("int8", smoothquant_alpha=0.5).int8_mode == "w8a8"
    assert QuantizeOptions("int8", quantize_attention=True).int8_mode == "w8a8"
    assert QuantizeOptions("int8", int8_mode="w8a8").needs_calibration and QuantizeOptions("fp8").needs_calibration
    orin = QuantizeOptions("int8", target="orin")
    assert orin.int8_mode == "w8a16" and orin.weight_only
    assert orin.resolved_int8_format() == "qdq" and orin.accuracy_level is None     # MatMulNBits only on the CPU
    assert QuantizeOptions("int4").int8_mode is None and QuantizeOptions("int4").accuracy_level is None


def test_w8a8_dynamic_records_only_what_it_applies():
    """Its SmoothQuant is the decoder's down-projections' and its MatMulNBits the kept W8A16 ones': without them the
    manifest must not record an alpha or an accuracy level, and an explicit --smoothquant there is refused."""
    default = QuantizeOptions("int8")
    assert default.accuracy_level is None                   # every layer per-token int8: no MatMulNBits written
    no_decoder = QuantizeOptions("int8", stages=("vision", "connector"))
    assert no_decoder.int8_mode == "w8a8-dynamic" and no_decoder.smoothquant_alpha is None
    with pytest.raises(ConfigError, match=r"smooths the decoder's MLP down-projections, and stages \['vision', "
                                          r"'connector'\] leave the decoder out"):
        QuantizeOptions("int8", int8_mode="w8a8-dynamic", smoothquant_alpha=0.8, stages=("vision", "connector"))
    assert QuantizeOptions("int8", int8_mode="w8a16").accuracy_level == 4
    # W8A16 down-projections are the decoder's: without it no MatMulNBits, so no level or block size is read.
    vision = QuantizeOptions("int8", int8_mode="w8a8-dynamic", down_projections="w8a16", stages=("vision",))
    assert vision.accuracy_level is None
    with pytest.raises(ConfigError, match="--block-size 32 and --accuracy-level 2: .*which --stages leaves out"):
        QuantizeOptions("int8", int8_mode="w8a8-dynamic", down_projections="w8a16", stages=("vision",),
                        accuracy_level=2, block_size=32)


@pytest.mark.parametrize("kwargs, message", [
    (dict(down_projections="fp16"), r"down-projections 'fp16' unknown; use one of smoothquant, w8a16"),
    (dict(down_projections="w8a16", smoothquant_alpha=0.5, int8_mode="w8a8-dynamic"),
     r"down-projections w8a16 keeps them weight-only: drop --smoothquant, or use --down-projections smoothquant"),
    (dict(down_projections="smoothquant", int8_mode="w8a16"),
     r"w8a8-dynamic option, but the int8 mode is w8a16: add --int8-mode w8a8-dynamic, or drop it"),
    (dict(down_projections="w8a16", target="orin"), r"but the int8 mode is w8a16"),
])
def test_down_projection_options_that_do_not_fit_are_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        QuantizeOptions("int8", **kwargs)
    with pytest.raises(ConfigError, match=r"down-projections are int8 options; drop them for int4"):
        QuantizeOptions("int4", down_projections="w8a16")


def test_int4_writes_matmulnbits_for_onnxruntime_and_int4_qdq_for_tensorrt(quantized, sources, tmp_path):
    results, _, _ = quantized
    graph = _graph(results["int4"].out)
    ops = [n.op_type for n in graph.graph.node]
    assert ops.count("MatMulNBits") == results["int4"].stage_notes["decoder"]["quantized_nodes"] > 0
    assert not any(n.op_type == "MatMul" and n.input[1] in {t.name for t in graph.graph.initializer}
                   for n in graph.graph.node)
    block = {a.name: a.i for n in graph.graph.node if n.op_type == "MatMulNBits" for a in n.attribute}
    assert block["block_size"] == 32 and block["bits"] == 4

    out = quantize_bundle(sources["portable"], tmp_path / "orin", QuantizeOptions("int4", target="orin", block_size=32),
                          report_frames=0).out
    trt = _graph(out)
    assert "MatMulNBits" not in [n.op_type for n in trt.graph.node]
    dq = [n for n in trt.graph.node if n.op_type == "DequantizeLinear"]
    int4 = {t.name for t in trt.graph.initializer if t.data_type == onnx.TensorProto.INT4}
    assert dq and all(n.input[0] in int4 for n in dq)
    assert load_bundle(out).manifest.quantization.recipe == "int4-rtn-qdq"


def test_fp8_graph_is_e4m3_qdq_at_opset_19(quantized):
    results, _, _ = quantized
    graph = _graph(results["fp8"].out)
    assert max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) >= 19
    fp8 = [t for t in graph.graph.initializer if t.data_type == onnx.TensorProto.FLOAT8E4M3FN]
    assert len(fp8) > results["fp8"].stage_notes["decoder"]["quantized_nodes"] > 0   # weights plus the zero point


def _optimized_graph(bundle, stage, tmp_path, emulate: bool):
    """The graph onnxruntime's CPU provider runs for a stage (saved after its optimizations)."""
    import onnxruntime as ort

    from edgeact.runtime.ort_engine import apply_cpu_emulation

    options = ort.SessionOptions()
    options.log_severity_level = 3       # saving an "all"-level graph warns that it is this machine's
    if emulate:
        apply_cpu_emulation(options, bundle.stage(stage))
    options.optimized_model_filepath = str(tmp_path / f"{stage}-{emulate}.onnx")
    ort.InferenceSession(str(bundle.stage_path(stage)), options, providers=["CPUExecutionProvider"])
    return onnx.load(options.optimized_model_filepath)


def test_fp8_weights_on_the_cpu_are_dequantized_once_at_load_and_activations_still_round(quantized, tmp_path):
    from ml_dtypes import float8_e4m3fn

    from edgeact.runtime.ort_engine import OrtOptions, make_session
    from edgeact.runtime.ort_stages import OrtStage

    results, _, _ = quantized
    bundle = load_bundle(results["fp8"].out, allow_failed_verification=True)
    source = onnx.load(str(bundle.stage_path(io.DECODER_STAGE)))
    inits = {t.name: t for t in source.graph.initializer}
    fp8_weights = {t.name for t in source.graph.initializer if t.data_type == onnx.TensorProto.FLOAT8E4M3FN
                   and t.dims}
    rounding = sum(n.op_type == "QuantizeLinear" for n in source.graph.node)
    assert fp8_weights and rounding

    # onnxruntime's own choice: a DequantizeLinear of every fp8 weight left in the graph, run on every call.
    left = _optimized_graph(bundle, io.DECODER_STAGE, tmp_path, emulate=False)
    assert {n.input[0] for n in left.graph.node if n.op_type == "DequantizeLinear"} >= fp8_weights

    emulated = _optimized_graph(bundle, io.DECODER_STAGE, tmp_path, emulate=True)
    dequantized = [n for n in emulated.graph.node if n.op_type == "DequantizeLinear"]
    assert not {n.input[0] for n in dequantized} & fp8_weights
    # The activations are still rounded to E4M3 at every linear layer's input.
    assert sum(n.op_type == "QuantizeLinear" for n in emulated.graph.node) == rounding
    assert len(dequantized) == rounding
    # The folded weights are the fp8 weights dequantized, not the fp32 ones they came from.
    node = next(n for n in source.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in fp8_weights)
    weight = np.frombuffer(inits[node.input[0]].raw_data, float8_e4m3fn).reshape(inits[node.input[0]].dims)
    expected = weight.astype(np.float32) * numpy_helper.to_array(inits[node.input[1]])
    folded = [numpy_helper.to_array(t) for t in emulated.graph.initializer if tuple(t.dims) == expected.shape]
    assert any(np.array_equal(f, expected) for f in folded)

    # Both onnxruntime runners take the setting for fp8 stages on the CPU, and only for them.
    key = "session.disable_quant_qdq"
    session = make_session(bundle, io.DECODER_STAGE, OrtOptions(threads=1))
    assert session.get_session_options().get_session_config_entry(key) == "1"
    assert OrtStage(bundle, io.DECODER_STAGE, threads=1).session.get_session_options().get_session_config_entry(key) == "1"
    int8 = load_bundle(results["int8-dynamic"].out, allow_failed_verification=True)
    with pytest.raises(RuntimeError, match="does not have configuration with key"):
        make_session(int8, io.DECODER_STAGE, OrtOptions(threads=1)).get_session_options().get_session_config_entry(key)


def test_fp8_for_orin_is_refused_naming_int8_and_int4(sources, tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"fp8 needs SM >= 8\.9.*int8.*int4"):
        QuantizeOptions("fp8", target="orin")
    rc = main(["quantize", str(sources["bundle"]), "--precision", "fp8", "--target", "orin", "--out", str(tmp_path / "x")])
    assert rc == 2 and "int8" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_quantizing_a_quantized_bundle_or_into_the_source_is_refused(quantized, sources):
    results, _, _ = quantized
    with pytest.raises(BundleError, match="already int8"):
        quantize_bundle(results["int8"].out, results["int8"].out.parent / "again", QuantizeOptions("int8"), report_frames=0)
    with pytest.raises(BundleError, match="never modified"):
        quantize_bundle(sources["bundle"], sources["bundle"], QuantizeOptions("int4"), report_frames=0)


@pytest.mark.parametrize("bad, match", [
    (dict(precision="fp8", smoothquant_alpha=0.5), "int8 option"),
    (dict(precision="int8", smoothquant_alpha=1.5), r"alpha 1\.5"),
    (dict(precision="int4", block_size=48), "power of two"),
    (dict(precision="int8", stages=("lm_head",)), "quantize some of"),
    (dict(precision="int8", op_types=("LayerNorm",)), "not quantizable"),
    (dict(precision="int2"), "precision 'int2' unknown"),
    (dict(precision="int8", int8_mode="w8a16", smoothquant_alpha=0.5), "use int8 mode w8a8"),
    (dict(precision="int8", int8_mode="w8a16", op_types=("MatMul", "Add")), "weights only"),
    (dict(precision="int8", int8_mode="w8a4"), "int8 mode 'w8a4' unknown"),
    (dict(precision="int8", int8_mode="w8a8", int8_format="nbits"), "w8a8 is always"),
    (dict(precision="int8", int8_mode="w8a8-dynamic", target="orin"), r"TensorRT \(orin\) cannot build it"),
    (dict(precision="int8", int8_mode="w8a8-dynamic", quantize_attention=True), "belong to static w8a8"),
    (dict(precision="int8", int8_mode="w8a8-dynamic", int8_format="qdq"), "keeps its W8A16 layers as MatMulNBits"),
    (dict(precision="int4", int8_mode="w8a16"), "int8 options"),
    (dict(precision="fp8", quantize_attention=True), "--quantize-attention: fp8 quantizes constant-weight MatMuls"),
    (dict(precision="fp8", op_types=("MatMul", "Softmax")), "--op-types MatMul,Softmax: fp8 quantizes constant-weight"),
])
def test_options_are_validated_with_a_fix(bad, match):
    with pytest.raises(ConfigError, match=match):
        QuantizeOptions(**bad)


def test_cli_quantize_int4_with_fp16_arrays(sources, tmp_path):
    out = tmp_path / "int4"
    rc = main(["quantize", str(sources["bundle"]), "--precision", "int4", "--block-size", "32", "--arrays-fp16",
               "--report-frames", "0", "--no-verify", "--out", str(out), "--threads", "1"])
    bundle = load_bundle(out)
    assert rc == 0 and bundle.manifest.weights[io.EMBEDDING_WEIGHT].dtype == "float16"
    assert bundle.manifest.quantization.options["arrays_dtype"] == "float16"


def test_cli_quantize_int8_mode_w8a16_needs_no_calibration_and_is_an_int8_option_only(sources, tmp_path, capsys):
    out = tmp_path / "w8a16"
    rc = main(["quantize", str(sources["portable"]), "--precision", "int8", "--int8-mode", "w8a16", "--target", "orin",
               "--stages", "decoder", "--report-frames", "0", "--no-verify", "--out", str(out), "--threads", "1"])
    q = load_bundle(out).manifest.quantization
    assert rc == 0 and q.recipe == "int8-w8a16-qdq" and q.options["int8_mode"] == "w8a16"
    assert q.options["calibration"]["used"] is False
    rc = main(["quantize", str(sources["bundle"]), "--precision", "int4", "--int8-mode", "w8a16",
               "--out", str(tmp_path / "x")])
    assert rc == 2 and "int8 options" in capsys.readouterr().err and not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------- transforms
def _two_linear_graph(rng):
    """y = (x * gain) @ W1 ; z = x @ W2 -- one foldable and one unfoldable activation."""
    from onnx import TensorProto, helper

    gain = rng.uniform(0.5, 2.0, 8).astype(np.float32)
    w1, w2 = rng.standard_normal((8, 4)).astype(np.float32), rng.standard_normal((8, 3)).astype(np.float32)
    nodes = [helper.make_node("Mul", ["x", "gain"], ["xg"], name="norm"),
             helper.make_node("MatMul", ["xg", "w1"], ["y"], name="fc1"),
             helper.make_node("MatMul", ["x", "w2"], ["z"], name="fc2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4]),
                               helper.make_tensor_value_info("z", TensorProto.FLOAT, ["n", 3])],
                              [numpy_helper.from_array(a, n) for a, n in ((gain, "gain"), (w1, "w1"), (w2, "w2"))])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])


def test_smoothquant_keeps_the_function_and_flattens_outlier_channels():
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    model = _two_linear_graph(rng)
    x = rng.standard_normal((16, 8)).astype(np.float32)
    x[:, 3] *= 50.0                                         # an outlier channel
    def run(m):
        return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})

    before = run(model)
    xg = x * numpy_helper.to_array(model.graph.initializer[0])
    absmax = {"xg": np.abs(xg).max(0), "x": np.abs(x).max(0)}
    nodes = [n for n in model.graph.node if n.op_type == "MatMul"]
    rows = apply_smoothquant(model, nodes, absmax, alpha=0.5)
    onnx.checker.check_model(model)
    after = run(model)
    for a, b in zip(before, after):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    assert {r["tensor"]: r["folded"] for r in rows} == {"xg": True, "x": False}
    assert all(r["act_absmax_smoothed"] < r["act_absmax"] / 3 for r in rows)
    assert [n.op_type for n in model.graph.node].count("Mul") == 2     # the norm's, plus one inserted for x


def test_fp8_cast_saturates_at_448_and_scales_by_amax():
    from ml_dtypes import float8_e4m3fn

    scale = fp8_scale(896.0)
    assert scale == pytest.approx(2.0)
    q = to_e4m3(np.array([1e6, -1e6, 896.0, 1.0], np.float32), scale)
    assert q.dtype == float8_e4m3fn
    np.testing.assert_array_equal(q.astype(np.float32), [E4M3_MAX, -E4M3_MAX, E4M3_MAX, 0.5])


def test_modelopt_backend_names_the_install_when_missing(sources, tmp_path):
    import importlib.util

    from edgeact.runtime.errors import EdgeactError

    if importlib.util.find_spec("modelopt") is not None:
        pytest.skip("NVIDIA ModelOpt is installed here; the message is for environments without it")
    with pytest.raises(EdgeactError, match=r"nvidia-modelopt\[onnx\]"):
        quantize_bundle(sources["bundle"], tmp_path / "mo", QuantizeOptions("int4", backend="modelopt"), report_frames=0)
    assert not (tmp_path / "mo").exists()


# ----------------------------------------------------------------------- verify and publish
INT4 = QuantizeOptions("int4", block_size=32)


def test_quantize_overwrite_verifies_the_new_bundle_before_it_replaces_the_verified_one(sources, tmp_path, monkeypatch):
    import shutil

    from edgeact.export import verify as verify_module
    from edgeact.runtime.bundle import read_manifest

    out = shutil.copytree(sources["bundle"], tmp_path / "out")
    verify_module.verify_bundle(out, frames=1, threads=1)
    old = tree_digest(out)
    assert read_manifest(out).verification.status == "passed"
    real, seen = verify_module.verify_bundle, []

    def watched(bundle_dir, *a, **kw):
        seen.append((bundle_dir, tree_digest(out)))       # the target while the new bundle is verified
        return real(bundle_dir, *a, **{**kw, "frames": 1})

    monkeypatch.setattr(verify_module, "verify_bundle", watched)
    result = quantize_bundle(sources["bundle"], out, INT4, overwrite=True, report_frames=1, threads=1, verify=True)
    (staged, during), = seen
    assert staged != out and during == old
    m = read_manifest(out)
    assert m.stages[io.DECODER_STAGE].precision == "int4"
    assert m.verification.status == result.verification and result.verification in ("passed", "failed")
    assert [row["bundle"] for row in m.quantization.report] == [str(sources["bundle"]), str(out)]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []

    # Verification interrupted: nothing is published, the bundle there stays whole.
    published = tree_digest(out)

    def interrupted(bundle_dir, *a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(verify_module, "verify_bundle", interrupted)
    with pytest.raises(KeyboardInterrupt):
        quantize_bundle(sources["bundle"], out, INT4, overwrite=True, report_frames=0, threads=1, verify=True)
    assert tree_digest(out) == published
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def _source_copy(sources, tmp_path, edit):
    import shutil

    from edgeact.export.bundle_writer import update_manifest

    src = shutil.copytree(sources["bundle"], tmp_path / "source")
    update_manifest(src, edit)
    return src


def test_quantize_refuses_before_any_work_when_the_recorded_checkpoint_is_gone(sources, tmp_path, capsys):
    import dataclasses

    gone = tmp_path / "moved-away-checkpoint"
    src = _source_copy(sources, tmp_path, lambda m: setattr(
        m, "model", dataclasses.replace(m.model, source_checkpoint=str(gone))))
    out = tmp_path / "int4"
    expected = (f"the reference checkpoint {gone} recorded in {src} is not here, so the quantized bundle cannot be "
                f"verified: pass --checkpoint CKPT (the checkpoint source was exported from), or pass --no-verify, "
                f"then `edgeact verify {out} --checkpoint CKPT` before using it")
    with pytest.raises(BundleError) as err:
        quantize_bundle(src, out, INT4, report_frames=0, threads=1, verify=True)
    assert str(err.value) == expected and not out.exists()
    rc = main(["quantize", str(src), "--precision", "int4", "--block-size", "32", "--report-frames", "0",
               "--out", str(out), "--threads", "1"])
    assert rc == 2 and expected in " ".join(capsys.readouterr().err.split()) and not out.exists()

    # The checkpoint named instead of the recorded one: verified, verdict recorded.
    result = quantize_bundle(src, out, INT4, report_frames=0, threads=1, verify=True, checkpoint=sources["checkpoint"])
    assert result.verification in ("passed", "failed")
    assert load_bundle(out, allow_failed_verification=True).manifest.verification.status == result.verification
    # --no-verify: the bundle says not_run, and the command says so with the way to verify it.
    rc = main(["quantize", str(src), "--precision", "int4", "--block-size", "32", "--report-frames", "0", "--no-verify",
               "--out", str(tmp_path / "unverified"), "--threads", "1"])
    assert rc == 0 and load_bundle(tmp_path / "unverified").manifest.verification.status == "not_run"
    assert (f"verification: not run (--no-verify); before using the bundle: edgeact verify {tmp_path / 'unverified'} "
            "--checkpoint CKPT") in capsys.readouterr().out


def test_quantize_from_a_failed_source_says_what_to_do_and_offers_no_flag_it_lacks(sources, tmp_path):
    from edgeact.runtime.bundle import VerificationInfo

    src = _source_copy(sources, tmp_path, lambda m: setattr(m, "verification", VerificationInfo(
        "failed", {}, ({"gate": "tokens.forced", "passed": False, "value": 0.5, "limit": 1.0},))))
    with pytest.raises(BundleError) as err:
        quantize_bundle(src, tmp_path / "q", INT4, report_frames=0, threads=1)
    msg = str(err.value)
    assert "verification failed at gate 'tokens.forced'" in msg and "--allow-unverified" not in msg
    assert "re-export the source (`edgeact export CKPT --out SOURCE --overwrite`)" in msg
    assert "(`edgeact verify SOURCE --checkpoint CKPT`)" in msg
    assert not (tmp_path / "q").exists()


def test_a_quantized_bundle_that_fails_verification_is_named_with_its_gates_and_how_to_load_it(
        sources, tmp_path, monkeypatch, capsys):
    # The command's last word on a failed verdict: which gates failed and the way to load the bundle anyway, as
    # `edgeact verify` says it (not a bare "failed").
    from types import SimpleNamespace

    from edgeact.export import quantize as quantize_module
    from edgeact.runtime.bundle import UNVERIFIED_FIX_DEFAULT, VerificationInfo

    rows = tuple({"gate": f"gate{i}", "passed": False, "value": 0.5, "limit": 0.99} for i in range(10))
    failed = _source_copy(sources, tmp_path, lambda m: setattr(m, "verification", VerificationInfo(
        "failed", {}, ({"gate": "logits.cosine", "passed": True, "value": 1.0, "limit": 0.99},) + rows)))
    monkeypatch.setattr(quantize_module, "quantize_bundle", lambda *a, **k: SimpleNamespace(
        out=failed, recipe="int4", stage_notes={}, report=None, verification="failed"))
    rc = main(["quantize", str(sources["bundle"]), "--precision", "int4", "--out", str(tmp_path / "q")])
    said = " ".join(capsys.readouterr().out.split())
    assert rc == 1
    assert (f"verification FAILED at gate0, gate1, gate2, gate3, gate4, gate5, gate6, gate7 and 2 more; recorded in "
            f"the manifest (`edgeact inspect {failed}` shows every gate)") in said
    assert " ".join(UNVERIFIED_FIX_DEFAULT.split()) in said and "logits.cosine" not in said


# ---------------------------------------------------------------------------- review fixes
def _softmax_graph():
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Softmax", ["x"], ["p"], name="softmax")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "seq"])],
                              [helper.make_tensor_value_info("p", TensorProto.FLOAT, [1, "seq"])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])


def test_tensor_ranges_take_feeds_of_any_width_and_channel_ranges_name_a_tensor_without_them(tmp_path):
    from edgeact.calibration.calibration_set import CalibrationError
    from edgeact.export.quant_feeds import tensor_stats

    onnx.save(_softmax_graph(), str(tmp_path / "g.onnx"))
    feeds = lambda: iter([{"x": np.array([[1.0, -2.0, 3.0]], np.float32)},      # noqa: E731
                          {"x": np.array([[4.0, 0.0, 1.0, -5.0, 2.0]], np.float32)}])   # the sequence grew
    stats = tensor_stats(tmp_path / "g.onnx", ["x"], feeds, tmp_path, threads=1, channels=False)
    assert (stats["x"].min, stats["x"].max, stats["x"].absmax) == (-5.0, 4.0, 5.0)
    with pytest.raises(CalibrationError, match="tensor 'x': its last axis is 3 wide in one calibration feed and 5"):
        tensor_stats(tmp_path / "g.onnx", ["x"], feeds, tmp_path, threads=1)


def test_int8_w8a8_quantizes_the_portable_decoders_attention_products(sources, tmp_path):
    out = tmp_path / "attention"
    quantize_bundle(sources["portable"], out, QuantizeOptions("int8", int8_mode="w8a8", stages=(io.DECODER_STAGE,),
                                                              quantize_attention=True),
                    sources["calibration"], report_frames=0, threads=1)
    graph = _graph(out).graph
    inits = {t.name for t in graph.initializer}
    dq_of = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    matmuls = [n for n in graph.node if n.op_type == "MatMul"]
    products = [n for n in matmuls if dq_of.get(n.input[1], n.input[1]) not in inits]     # QK^T and PV
    assert len(products) == 4 and all(n.input[0] in dq_of and n.input[1] in dq_of for n in products)


def test_exclude_nodes_that_name_no_node_are_refused_with_the_closest_names(sources, tmp_path):
    typo = "transformer/blocks.0/mlp/ff_out/MatMul"          # the leading '/' forgotten
    options = QuantizeOptions("int8", int8_mode="w8a16", stages=(io.DECODER_STAGE,), exclude_nodes=(typo,))
    with pytest.raises(ConfigError, match=rf"exclude nodes \['{typo}'\] are not nodes of the stages quantized "
                                          rf"\(decoder\); closest node names: '{typo}': '/{typo}'"):
        quantize_bundle(sources["bundle"], tmp_path / "q", options, report_frames=0, threads=1)
    assert not (tmp_path / "q").exists()


def test_a_calibrated_recipe_with_nothing_to_quantize_blames_the_options_not_the_calibration(sources, tmp_path):
    """--op-types matching no layer of a stage, or --exclude-nodes leaving none: the stage and the options are named
    (the calibration set has samples: it is not what is wrong)."""
    from edgeact.export.quant_feeds import const_weight_matmuls

    options = QuantizeOptions("int8", int8_mode="w8a8", op_types=("Conv",), stages=(io.VISION_STAGE,))
    with pytest.raises(ConfigError, match=r"vision.*no node to quantize: --op-types Conv matches none"):
        quantize_bundle(sources["bundle"], tmp_path / "conv", options, sources["calibration"], report_frames=0,
                        threads=1)
    connector = onnx.load(str(sources["bundle"] / "stages" / f"{io.CONNECTOR_STAGE}.onnx"), load_external_data=False)
    every = tuple(n.name for n in const_weight_matmuls(connector, ("MatMul",), ()))
    options = QuantizeOptions("fp8", stages=(io.CONNECTOR_STAGE,), exclude_nodes=every)
    with pytest.raises(ConfigError, match=rf"connector.*no node to quantize.*\({len(every)} excluded\)"):
        quantize_bundle(sources["bundle"], tmp_path / "fp8", options, sources["calibration"], report_frames=0,
                        threads=1)
    assert not (tmp_path / "conv").exists() and not (tmp_path / "fp8").exists()


def test_the_calibration_source_is_recorded_absolute_and_an_unread_checkpoint_is_refused(sources, tmp_path,
                                                                                         monkeypatch):
    calibration = Path(sources["calibration"])
    monkeypatch.chdir(calibration.parent)
    options = QuantizeOptions("fp8", stages=(io.CONNECTOR_STAGE,))
    out = quantize_bundle(sources["bundle"], tmp_path / "fp8", options, calibration.name, report_frames=0,
                          threads=1).out
    recorded = load_bundle(out).manifest.quantization.options["calibration"]["source"]
    assert recorded == str(calibration.absolute())          # where it is, read from anywhere later
    with pytest.raises(ConfigError, match="--checkpoint .*verification is off"):
        quantize_bundle(sources["bundle"], tmp_path / "nv", INT4, report_frames=0, threads=1,
                        checkpoint=tmp_path / "no-such-checkpoint")
    assert not (tmp_path / "nv").exists()


def test_quantizing_the_other_stages_of_a_quantized_bundle_is_refused(sources, tmp_path):
    first = quantize_bundle(sources["bundle"], tmp_path / "int4", INT4, report_frames=0, threads=1).out
    with pytest.raises(BundleError, match=r"already quantized \(recipe 'int4-rtn-nbits', stages \['decoder'\]\).*"
                                          r"quantize all the stages in one run \(--stages\) from the fp32 bundle"):
        quantize_bundle(first, tmp_path / "stacked", QuantizeOptions("int8", int8_mode="w8a16", stages=("vision",)),
                        report_frames=0, threads=1)
    assert not (tmp_path / "stacked").exists()


def test_a_calibration_set_answered_by_other_weights_of_the_same_config_is_refused(sources, tmp_path, caplog):
    import json
    import shutil

    from edgeact.calibration.calibration_set import MANIFEST_FILE, CalibrationError, CalibrationSet
    from edgeact.export.bundle_writer import update_manifest

    other = shutil.copytree(sources["bundle"], tmp_path / "other")          # same config, other weights
    np.save(other / "weights" / "embedding.npy", np.load(other / "weights" / "embedding.npy") * 1.5)
    update_manifest(other, lambda m: None, rehash=["weights/embedding.npy"])
    ours = CalibrationSet.load(sources["calibration"])
    answered_by = {k: v for k, v in ours.model.items() if k != "weights_sha256"} | {"source": str(other)}
    theirs = CalibrationSet(ours.samples, ours.seed, ours.frames_source, answered_by)     # recorded as it is built
    assert theirs.model["weights_sha256"] not in ("", ours.model["weights_sha256"])
    int8 = QuantizeOptions("int8", int8_mode="w8a8", stages=("connector",))
    with pytest.raises(CalibrationError, match=r"decoded by another model: same config, but the weights of the bundle "
                                               rf"'{other}' that answered .* rebuild the set from this bundle"):
        quantize_bundle(sources["bundle"], tmp_path / "q", int8, theirs, report_frames=0, threads=1)

    # A set written before sets recorded the digest: accepted, with a warning saying how to have it checked.
    legacy = shutil.copytree(sources["calibration"], tmp_path / "legacy")
    meta = json.loads((legacy / MANIFEST_FILE).read_text())
    del meta["model"]["weights_sha256"]
    (legacy / MANIFEST_FILE).write_text(json.dumps(meta))
    with caplog.at_level("WARNING", logger="edgeact.calibration.calibration_set"):
        quantize_bundle(sources["bundle"], tmp_path / "q", int8, legacy, report_frames=0, threads=1)
    assert "records no weights digest" in caplog.text and "`edgeact calibrate`" in caplog.text


def test_a_depth_tokenizer_row_survives_quantization_and_its_verification(sources, tmp_path):
    source = with_depth_tokenizer(sources["bundle"], tmp_path)
    result = quantize_bundle(source, tmp_path / "int4", INT4, report_frames=0, threads=1, verify=True,
                             checkpoint=sources["checkpoint"])
    v = load_bundle(result.out, allow_failed_verification=True).manifest.verification
    assert v.status == result.verification and "depth_tokenizer_codes" in [r["gate"] for r in v.results]


def test_default_int8_of_an_opset_17_export_is_converted_not_relabelled(sources, tmp_path):
    """Opset 18 moved ReduceMean's axes from an attribute to an input: the graph is converted before it is raised to
    the blocked QuantizeLinear's opset 21, and decodes as the fp32 bundle does."""
    from edgeact.export.bundle_export import ExportOptions, export_bundle
    from edgeact.export.verify import GATES

    b17 = export_bundle(sources["checkpoint"], tmp_path / "b17", ExportOptions(max_seq=1024, opset=17))
    result = quantize_bundle(b17, tmp_path / "int8", QuantizeOptions("int8"), sources["calibration"], report_frames=1,
                             threads=1)
    assert result.recipe == "int8-w8a8-dynamic"
    for stage in io.MODEL_STAGES:
        assert {o.domain: o.version for o in _graph(result.out, stage).opset_import}[""] == 21
    assert result.report[1]["agreement_forced"] >= GATES["int8"].forced_agreement


def test_the_source_is_never_the_output_through_a_symlink(sources, tmp_path):
    import shutil

    src = shutil.copytree(sources["bundle"], tmp_path / "src")
    (tmp_path / "link").symlink_to(src)
    before = tree_digest(src)
    with pytest.raises(BundleError, match="is the source bundle .*never modified"):
        quantize_bundle(tmp_path / "link", src, INT4, overwrite=True, report_frames=0, threads=1)
    assert tree_digest(src) == before


@pytest.mark.parametrize("fmt", ["int4_format", "int8_format"])
def test_a_tensorrt_target_refuses_the_matmulnbits_format(fmt):
    precision = "int4" if fmt == "int4_format" else "int8"
    flag = "--" + fmt.replace("_", "-")
    with pytest.raises(ConfigError, match=rf"^{flag} nbits with --target orin: TensorRT cannot parse MatMulNBits; "
                                          rf"drop {flag} \(a target gets qdq\) or give {flag} qdq$"):
        QuantizeOptions(precision, target="orin", **{fmt: "nbits"})
    assert QuantizeOptions(precision, target="orin", **{fmt: "qdq"}).for_tensorrt


@pytest.mark.parametrize("value", ["nbits", "qdq"])
def test_another_precisions_weight_format_is_refused_as_unread_not_as_nbits(value):
    # Not "give --int4-format qdq" to an int8 run, a fix that is refused in turn.
    with pytest.raises(ConfigError, match=rf"^--int4-format {value}: .*it does not read --int4-format"):
        QuantizeOptions("int8", target="orin", int4_format=value)


def test_decode_steps_for_stages_without_the_decoder_says_why():
    with pytest.raises(ConfigError, match=r"it does not read --decode-steps \(it calibrates the decoder, which "
                                          r"--stages leaves out\)"):
        QuantizeOptions("int8", int8_mode="w8a8", stages=("vision", "connector"), decode_steps=4)


@pytest.mark.parametrize("kwargs, flag, recipe", [
    (dict(precision="int8", per_channel=False), "--per-tensor", "int8 w8a8-dynamic"),
    (dict(precision="int8", block_size=32), "--block-size 32", "int8 w8a8-dynamic"),   # SmoothQuant-ed: no W8A16 layer
    (dict(precision="int8", accuracy_level=1), "--accuracy-level 1", "int8 w8a8-dynamic"),
    (dict(precision="int4", quantize_attention=True), "--quantize-attention", "int4 nbits"),
    (dict(precision="int4", op_types=("MatMul", "Gemm")), "--op-types MatMul,Gemm", "int4 nbits"),
    (dict(precision="int4", per_channel=False), "--per-tensor", "int4 nbits"),
    (dict(precision="int4", decode_steps=4), "--decode-steps 4", "int4 nbits"),
    (dict(precision="int4", int4_format="qdq", accuracy_level=4), "--accuracy-level 4", "int4 qdq"),
    (dict(precision="int8", int8_mode="w8a16", int8_format="qdq", block_size=32), "--block-size 32", "int8 w8a16 qdq"),
    (dict(precision="int8", int8_mode="w8a16", int8_format="qdq", accuracy_level=1), "--accuracy-level 1",
     "int8 w8a16 qdq"),
    (dict(precision="int8", int8_mode="w8a16", per_channel=False), "--per-tensor", "int8 w8a16 nbits"),
    (dict(precision="int8", int8_mode="w8a8", block_size=64), "--block-size 64", "int8 w8a8"),
    (dict(precision="int8", int4_format="qdq"), "--int4-format qdq", "int8 w8a8-dynamic"),
    (dict(precision="fp8", accuracy_level=2), "--accuracy-level 2", "fp8"),
    (dict(precision="fp8", block_size=32), "--block-size 32", "fp8"),
])
def test_an_option_the_recipe_does_not_read_is_refused_not_recorded(kwargs, flag, recipe):
    with pytest.raises(ConfigError, match=rf"^{flag}: {recipe} .*; it does not read {flag.split()[0]} \(read by "
                                          r".*\), which the manifest would record as applied: drop it"):
        QuantizeOptions(**kwargs)


def test_every_option_the_recipe_does_not_read_is_named_at_once():
    with pytest.raises(ConfigError, match=r"^--op-types MatMul,Gemm, --quantize-attention and --per-tensor: int4 nbits "
                                          r".*; it does not read --op-types \(read by int8 w8a8\), --quantize-attention "
                                          r"\(read by int8 w8a8\) or --per-tensor \(read by .*\), .*: drop them"):
        QuantizeOptions("int4", quantize_attention=True, op_types=("MatMul", "Gemm"), per_channel=False)


@pytest.mark.parametrize("kwargs", [
    dict(precision="int8", int8_mode="w8a8", per_channel=False, quantize_attention=True, op_types=("MatMul", "Gemm"),
         decode_steps=4),
    dict(precision="int8", int8_mode="w8a16", block_size=32, accuracy_level=1),
    dict(precision="int8", int8_mode="w8a16", int8_format="qdq", per_channel=False),
    dict(precision="int8", down_projections="w8a16", block_size=32, accuracy_level=1),
    dict(precision="int8", decode_steps=4),                              # the down-projections' calibration
    dict(precision="int4", block_size=32, accuracy_level=4, int4_format="nbits"),
    dict(precision="int4", target="orin", block_size=32),
    dict(precision="fp8", per_channel=False, decode_steps=4),
])
def test_the_options_each_recipe_reads_are_accepted(kwargs):
    QuantizeOptions(**kwargs)


def test_a_calibration_set_for_a_recipe_that_reads_none_is_refused_before_any_work(sources, tmp_path, capsys):
    for options, recipe in ((INT4, "int4-rtn-nbits"), (QuantizeOptions("int8", int8_mode="w8a16"), "int8-w8a16-nbits"),
                            (QuantizeOptions("int8", down_projections="w8a16"), "int8-w8a8-dynamic")):
        with pytest.raises(ConfigError, match=rf"--calibration: {recipe} .* reads no calibration set; drop it"):
            quantize_bundle(sources["bundle"], tmp_path / "q", options, sources["calibration"], report_frames=0)
    rc = main(["quantize", str(sources["bundle"]), "--precision", "int4", "--calibration", str(sources["calibration"]),
               "--out", str(tmp_path / "q")])
    assert rc == 2 and "--calibration: int4-rtn-nbits" in capsys.readouterr().err and not (tmp_path / "q").exists()


def test_an_onnxruntime_without_the_range_cache_api_is_named_before_any_work(monkeypatch):
    """onnxruntime 1.23.2 (the newest for a Jetson's Python 3.10) lacks save_tensors_data, through which the static
    int8 recipe hands its ranges to quantize_static: said with the build to use, before the minutes of statistics."""
    from onnxruntime.quantization import calibrate

    from edgeact.export import quant_int8

    monkeypatch.delattr(calibrate, "save_tensors_data")
    with pytest.raises(ConfigError, match=r"lacks; quantize with the tested build \(pip install onnxruntime==1\.32\.0"):
        quant_int8.quantize_int8(Path("unread.onnx"), Path("unwritten.onnx"), None, None, Path("."))
