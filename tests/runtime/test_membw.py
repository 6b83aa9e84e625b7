"""Memory measurements: bandwidth probe, weight bytes read per decode token (checked against the onnx package), peak RSS."""
from __future__ import annotations

import math

import numpy as np
import pytest

from edgeact.runtime import stage_io as io
from edgeact.runtime.bundle import load_bundle
from edgeact.runtime.errors import ConfigError, EdgeactError
from edgeact.runtime.membw import (
    Bandwidth, bandwidth_limit_tokens_s, best_of, decode_bytes_per_token,
    measure_bandwidth, onnx_initializers, policy_peak_rss,
)
from edgeact.runtime.telemetry import MEMORY_BUDGET_EXTRA_BYTES, MEMORY_BUDGET_FACTOR
from tests.runtime.test_decode_program import exported_bundle


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return exported_bundle(tmp_path_factory, "D")


def weight_only(exported, tmp_path_factory, precision: str):
    """The tiny bundle's decoder quantized weight-only in blocks of 32 (int4; int8 in its w8a16 mode)."""
    from edgeact.export.quant_options import QuantizeOptions
    from edgeact.export.quantize import quantize_bundle

    options = QuantizeOptions(precision, block_size=32, stages=("decoder",),
                              int8_mode="w8a16" if precision == "int8" else None)
    assert options.weight_only
    out = tmp_path_factory.mktemp("membw") / precision
    quantize_bundle(exported.bundle_dir, out, options, report_frames=0, threads=1)
    return load_bundle(out)


@pytest.fixture(scope="module")
def int4_bundle(exported, tmp_path_factory):
    return weight_only(exported, tmp_path_factory, "int4")


@pytest.fixture(scope="module")
def int8_bundle(exported, tmp_path_factory):
    return weight_only(exported, tmp_path_factory, "int8")


def onnx_counts(path) -> dict[str, tuple[str, int, tuple[int, ...]]]:
    """name -> (dtype, bytes, shape) by the onnx package itself: the independent count."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    return {t.name: (onnx.helper.tensor_dtype_to_np_dtype(t.data_type).name, numpy_helper.to_array(t).nbytes,
                     tuple(t.dims)) for t in model.graph.initializer}


def test_bandwidth_probe_gives_positive_finite_rates():
    bw = measure_bandwidth(4 << 20, threads=2, repeats=2)
    assert bw.array_bytes == 4 << 20 and bw.threads == 2
    for rate in (bw.read_gb_s, bw.copy_gb_s):
        assert math.isfinite(rate) and rate > 0
    with pytest.raises(ConfigError, match="at least 1 MiB"):
        measure_bandwidth(1024)


@pytest.mark.parametrize("threads, cores, dot_used", [(1, 2, False), (2, 2, True), (2, 4, False), (4, 4, True)])
def test_the_probe_uses_blas_only_with_a_thread_per_core(monkeypatch, threads, cores, dot_used):
    # BLAS runs its own pool on every core: with fewer probe threads than cores it would read faster than the
    # decoder it bounds may (the limit too high, the fraction too low).
    from edgeact.runtime import membw

    calls = []
    real_dot = np.dot
    monkeypatch.setattr(membw, "_cores", lambda: cores)
    monkeypatch.setattr(membw.np, "dot", lambda a, b: calls.append(1) or real_dot(a, b))
    bw = measure_bandwidth(4 << 20, threads=threads, repeats=1)
    assert bool(calls) == dot_used and bw.threads == threads and bw.read_gb_s > 0


def test_initializers_of_fp32_and_int4_graphs_match_the_onnx_package(exported, int4_bundle):
    for bundle in (exported.bundle, int4_bundle):
        for stage in (io.DECODER_STAGE, io.VISION_STAGE, io.CONNECTOR_STAGE):
            path = bundle.stage_path(stage)
            ours = {i.name: (i.dtype, i.nbytes, i.shape) for i in onnx_initializers(path)}
            assert ours == onnx_counts(path)


def test_fp32_decoder_reads_every_decoder_weight_once_per_token(exported):
    from edgeact.export.tensor_names import LLM, expected_tensor_shapes

    cfg = exported.bundle.config
    trunk = sum(math.prod(s) for name, s in expected_tensor_shapes(cfg).items()
                if name.startswith((LLM + "blocks.", LLM + "ln_f.")))
    per_token = decode_bytes_per_token(exported.bundle)
    D = cfg.llm_config.hidden_size
    assert per_token.decoder_by_kind == {"float32": 4 * trunk}
    assert per_token.head_bytes == 256 * D * 4 and per_token.embedding_bytes == D * 4
    assert per_token.total == 4 * trunk + 257 * D * 4
    llm = cfg.llm_config
    assert per_token.kv_bytes_per_position == 2 * llm.num_hidden_layers * llm.num_key_value_heads * llm.head_dim * 4


@pytest.mark.parametrize("bits", [4, 8])
def test_packed_decoder_weights_count_their_bits_and_scales(exported, int4_bundle, int8_bundle, bits):
    import onnx

    bundle = int4_bundle if bits == 4 else int8_bundle
    fp32_graph = onnx.load(str(exported.bundle.stage_path(io.DECODER_STAGE)))
    shapes = {t.name: tuple(t.dims) for t in fp32_graph.graph.initializer}
    matmul_weights = [shapes[n.input[1]] for n in fp32_graph.graph.node if n.op_type == "MatMul" and n.input[1] in shapes]
    assert matmul_weights                      # (K, N): N columns of ceil(K/32) blocks of 32 weights of `bits` bits
    packed = sum(n * math.ceil(k / 32) * 32 * bits // 8 for k, n in matmul_weights)
    per_token = decode_bytes_per_token(bundle)
    assert per_token.decoder_by_kind[f"int{bits}-packed"] == packed
    counted = onnx_counts(bundle.stage_path(io.DECODER_STAGE))
    assert per_token.decoder_bytes == sum(b for _, b, _ in counted.values())
    assert per_token.decoder_bytes < decode_bytes_per_token(exported.bundle).decoder_bytes * (bits + 2) / 32


def test_weights_in_an_external_data_file_count_like_inline_ones(tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((64, 32), np.float16), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [1, 32])], [weight])
    onnx.save(helper.make_model(graph), str(tmp_path / "m.onnx"), save_as_external_data=True,
              all_tensors_to_one_file=True, location="m.onnx.data", size_threshold=0)
    (init,) = onnx_initializers(tmp_path / "m.onnx")
    assert (init.name, init.dtype, init.shape, init.nbytes, init.consumers) == ("w", "float16", (64, 32), 4096, ("MatMul",))


def test_a_file_that_is_not_onnx_is_refused(tmp_path):
    path = tmp_path / "notes.onnx"
    path.write_bytes(b"\xff" * 64)
    with pytest.raises(EdgeactError, match="notes.onnx"):
        onnx_initializers(path)


def test_probes_at_two_moments_combine_to_each_rates_best():
    slow, fast = Bandwidth(30.0, 40.0, 1 << 29, 2, 5), Bandwidth(60.0, 35.0, 1 << 29, 2, 5)
    both = best_of([slow, fast])
    assert (both.read_gb_s, both.copy_gb_s, both.repeats, both.threads) == (60.0, 40.0, 10, 2)
    with pytest.raises(ValueError, match="no bandwidth probe"):
        best_of([])


def test_bandwidth_limit_is_bandwidth_over_bytes():
    assert bandwidth_limit_tokens_s(204.8, 7_600_000_000) == pytest.approx(26.95, abs=0.01)   # a 7B INT8 on AGX Orin
    with pytest.raises(EdgeactError):
        bandwidth_limit_tokens_s(10.0, 0)


def test_peak_rss_of_a_policy_process(exported):
    memory = policy_peak_rss(exported.bundle_dir, steps=1, threads=1, frame_px=(160, 120))
    assert 0 < memory.rss_after_load_bytes <= memory.peak_rss_bytes
    assert memory.bundle_bytes == exported.bundle.total_bytes()
    assert memory.budget_bytes == int(MEMORY_BUDGET_FACTOR * memory.bundle_bytes + MEMORY_BUDGET_EXTRA_BYTES)
    assert memory.budget_ratio == pytest.approx(memory.peak_rss_bytes / memory.budget_bytes)
    with pytest.raises(EdgeactError, match="memory probe process failed"):
        policy_peak_rss(exported.bundle_dir / "missing", steps=1)
