"""The onnxruntime engines compute what a plain InferenceSession computes, into buffers allocated at load."""
from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest

from edgeact.runtime import stage_io as io
from edgeact.runtime.bundle import load_bundle
from edgeact.runtime.engines import backend_names, open_backend
from edgeact.runtime.errors import BundleError, ConfigError, EdgeactError, SequenceTooLongError
from edgeact.runtime.kv_cache import KEY, VALUE
from edgeact.runtime.ort_engine import OrtOptions, make_session, recorded_graph_level, trt_profile_options
from tests.runtime.test_decode_program import MAX_SEQ, exported_bundle


@pytest.fixture(scope="module", params=[(v, a) for a in io.DECODER_ATTENTIONS for v in ("D", "O")],
                ids=lambda p: "-".join(p))
def exported(request, tmp_path_factory):
    return exported_bundle(tmp_path_factory, *request.param)


def plain_session(bundle, stage):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(bundle.stage_path(stage)), options, providers=["CPUExecutionProvider"])


def test_decoder_engine_matches_a_plain_session_chunk_by_chunk(exported):
    bundle = exported.bundle
    engine = open_backend("onnxruntime", threads=1).decoder(bundle, max_chunk=16)
    session = plain_session(bundle, io.DECODER_STAGE)
    layout = engine.layout
    assert (layout.max_seq, layout.n_layers) == (MAX_SEQ, bundle.config.llm_config.num_hidden_layers)
    assert layout.fused == (exported.attention == io.FUSED_ATTENTION)
    rng = np.random.default_rng(0)
    embeds = rng.standard_normal((24, layout.hidden_size)).astype(np.float32)
    # The plain session's past: portable, the filled prefix grown by each call's new entries; fused, whole
    # buffers of its own that the session returns updated (presents, not shared with the past).
    shape = layout.block_shape if layout.fused else (1, 0, layout.kv_heads, layout.head_dim)
    past = [np.zeros(shape, np.float32) for _ in range(2 * layout.n_layers)]
    # An empty past, a 7-token chunk, single steps, and a full max_chunk chunk.
    for start, stop in ((0, 7), (7, 8), (8, 9), (9, 10), (10, 24 - 8), (16, 24)):
        n = stop - start
        feeds = {io.INPUTS_EMBEDS: embeds[None, start:stop], io.POSITION_IDS: np.arange(start, stop)[None],
                 **layout.chunk_feeds(start, n)}
        for layer in range(layout.n_layers):
            feeds[io.past_key(layer)], feeds[io.past_value(layer)] = past[2 * layer], past[2 * layer + 1]
        want = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
        engine.embeds[:n] = embeds[start:stop]
        last = engine.step(n)
        np.testing.assert_allclose(engine.hidden_states(n), want[io.HIDDEN_STATES][0], rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(last, engine.hidden_states(n)[-1])
        assert engine.length == stop
        for layer in range(layout.n_layers):
            for kind, name in ((KEY, io.new_key(layer)), (VALUE, io.new_value(layer))):
                if layout.fused:
                    # Written by onnxruntime in place into the cache blocks bound as past and present.
                    name = io.present_key(layer) if kind == KEY else io.present_value(layer)
                    np.testing.assert_allclose(engine.cache.block(layer, kind)[:, :, :stop], want[name][:, :, :stop],
                                               rtol=1e-6, atol=1e-6)
                    past[2 * layer + kind] = np.ascontiguousarray(want[name])
                    continue
                # The new entries were written by onnxruntime straight into the cache, after the past.
                np.testing.assert_allclose(engine.cache.block(layer, kind)[:, start:stop], want[name], rtol=1e-6, atol=1e-6)
                past[2 * layer + kind] = np.concatenate([past[2 * layer + kind], want[name]], axis=1)
    # Sequence-major views of the cache, whichever layout it is stored in.
    assert engine.cache.keys.shape == (layout.n_layers, 1, MAX_SEQ, layout.kv_heads, layout.head_dim)


def test_vision_and_connector_engines_match_plain_sessions(exported):
    bundle = exported.bundle
    backend = open_backend("onnxruntime", threads=1)
    vit, connector = backend.stage(bundle, io.VISION_STAGE), backend.stage(bundle, io.CONNECTOR_STAGE)
    vit_session, connector_session = plain_session(bundle, io.VISION_STAGE), plain_session(bundle, io.CONNECTOR_STAGE)
    for frame in (1, 2):
        _, inputs, _ = exported.observation(frame)
        crop = {io.IMAGES: inputs.images[:1], io.IMAGE_MASKS: inputs.image_masks[:1]}
        patches = vit.run(crop, release=frame == 2)[io.PATCH_FEATURES]     # arena kept, then given back
        np.testing.assert_allclose(patches, vit_session.run(None, crop)[0], rtol=1e-6, atol=1e-6)
        feeds = {io.PATCH_FEATURES: vit_session.run(None, {io.IMAGES: inputs.images,
                                                            io.IMAGE_MASKS: inputs.image_masks})[0],
                 io.POOLED_PATCHES_IDX: inputs.pooled_patches_idx}
        got = connector.run(feeds)[io.IMAGE_FEATURES]
        np.testing.assert_allclose(got, connector_session.run(None, feeds)[0], rtol=1e-6, atol=1e-6)
    # Outputs are views of one buffer sized for the stage's largest n_tokens, allocated at load.
    assert got.base is not None and got.base.size >= bundle.stage(io.CONNECTOR_STAGE).dim_ranges[io.N_TOKENS].max * got.shape[1]


def test_stage_inputs_beyond_the_limits_or_of_another_kind_are_refused_by_name(tmp_path_factory):
    """The output buffers are sized for the manifest's largest dims: anything larger is refused before it runs,
    and an input of another kind (integer pixels, float indices) is refused rather than converted into garbage."""
    bundle = exported_bundle(tmp_path_factory, "D").bundle
    backend = open_backend("onnxruntime", threads=1)
    vit, connector = backend.stage(bundle, io.VISION_STAGE), backend.stage(bundle, io.CONNECTOR_STAGE)
    _, inputs, _ = exported_bundle(tmp_path_factory, "D").observation(1)
    crops = bundle.stage(io.VISION_STAGE).dim_ranges[io.N_CROPS].max
    too_many = {io.IMAGES: np.repeat(inputs.images[:1], crops + 1, axis=0),
                io.IMAGE_MASKS: np.repeat(inputs.image_masks[:1], crops + 1, axis=0)}
    with pytest.raises(EdgeactError, match=rf"stage 'vision': no engine profile holds \{{'{io.N_CROPS}': {crops + 1}"):
        vit.run(too_many)
    features = np.concatenate([vit.run({io.IMAGES: inputs.images[i:i + 1], io.IMAGE_MASKS: inputs.image_masks[i:i + 1]})
                               [io.PATCH_FEATURES].copy() for i in range(len(inputs.images))])   # views of one buffer
    tokens = bundle.stage(io.CONNECTOR_STAGE).dim_ranges[io.N_TOKENS].max
    index = np.zeros((tokens + 1, inputs.pooled_patches_idx.shape[1]), np.int64)
    with pytest.raises(EdgeactError, match=rf"stage 'connector': no engine profile holds .*'{io.N_TOKENS}': "
                                           rf"{tokens + 1}.*Feed smaller inputs"):
        connector.run({io.PATCH_FEATURES: features, io.POOLED_PATCHES_IDX: index})
    pixels = (inputs.images[:1] * 100).astype(np.uint8)
    with pytest.raises(EdgeactError, match=rf"input '{io.IMAGES}' is uint8 and the stage takes float32"):
        vit.run({io.IMAGES: pixels, io.IMAGE_MASKS: inputs.image_masks[:1]})
    with pytest.raises(EdgeactError, match=rf"input '{io.POOLED_PATCHES_IDX}' is float64 and the stage takes int64"):
        connector.run({io.PATCH_FEATURES: features, io.POOLED_PATCHES_IDX: inputs.pooled_patches_idx + 0.5})
    # the same kind in another width is converted: float64 pixels, int32 indices
    wide = vit.run({io.IMAGES: inputs.images[:1].astype(np.float64), io.IMAGE_MASKS: inputs.image_masks[:1]})
    np.testing.assert_array_equal(wide[io.PATCH_FEATURES], features[:1])
    pooled = connector.run({io.PATCH_FEATURES: features, io.POOLED_PATCHES_IDX: inputs.pooled_patches_idx})
    pooled = pooled[io.IMAGE_FEATURES].copy()
    narrow = connector.run({io.PATCH_FEATURES: features,
                            io.POOLED_PATCHES_IDX: inputs.pooled_patches_idx.astype(np.int32)})
    np.testing.assert_array_equal(narrow[io.IMAGE_FEATURES], pooled)


def test_the_cache_is_sized_from_the_manifest_and_overflow_is_refused(tmp_path_factory):
    exported = exported_bundle(tmp_path_factory, "D")
    engine = open_backend("onnxruntime", threads=1).decoder(exported.bundle, max_chunk=128)
    assert engine.cache.keys.shape[2] == exported.bundle.stage(io.DECODER_STAGE).dim_ranges[io.SEQ].max
    for _ in range(MAX_SEQ // 128):
        engine.step(128)
    with pytest.raises(SequenceTooLongError, match=rf"{MAX_SEQ + 1} positions exceed the bundle's max_seq {MAX_SEQ}"):
        engine.step(1)
    assert engine.length == MAX_SEQ            # a refused step leaves the cache as it was
    with pytest.raises(EdgeactError, match=r"1\.\.128 \(max_chunk\)"):
        engine.step(129)
    engine.reset()
    assert engine.length == 0 and engine.step(1).shape == (engine.layout.hidden_size,)


def test_options_are_validated_and_name_the_fix(tmp_path_factory):
    bundle = exported_bundle(tmp_path_factory, "D").bundle
    with pytest.raises(ConfigError, match=r"provider 'rocm' unknown; use one of cpu, cuda, tensorrt"):
        open_backend("onnxruntime", provider="rocm")
    with pytest.raises(ConfigError, match=r"backend 'onnxruntime'.*unexpected keyword"):
        open_backend("onnxruntime", workers=2)
    with pytest.raises(ConfigError, match=r"backend 'openvino' unknown; use one of onnxruntime, tensorrt"):
        open_backend("openvino")
    assert {"onnxruntime", "tensorrt"} <= set(backend_names())
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        portable = exported_bundle(tmp_path_factory, "D", io.PORTABLE_ATTENTION).bundle
        with pytest.raises(ConfigError, match="no CUDAExecutionProvider.*install onnxruntime-gpu"):
            open_backend("onnxruntime", provider="cuda").decoder(portable, 8)
    # The fused decoder is onnxruntime's CPU kernel: a GPU provider is refused before any session is made.
    for provider in ("cuda", "tensorrt"):
        with pytest.raises(BundleError, match=rf"fused decoder .* onnxruntime's {provider} provider cannot run; "
                                              r"export the bundle with `edgeact export --attention portable`"):
            open_backend("onnxruntime", provider=provider).decoder(bundle, 8)


def test_the_cuda_provider_computes_fp32_unless_tf32_is_asked_for(tmp_path_factory, tmp_path):
    from edgeact.runtime.ort_engine import _providers

    bundle = exported_bundle(tmp_path_factory, "D", io.PORTABLE_ATTENTION).bundle
    spec = bundle.stage(io.DECODER_STAGE)
    gpu = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    cuda = _providers(bundle, spec, OrtOptions(provider="cuda", device_id=1), gpu)
    assert cuda == [("CUDAExecutionProvider", {"device_id": 1, "use_tf32": 0}), "CPUExecutionProvider"]
    trt_options = OrtOptions(provider="tensorrt", trt_cache_dir=str(tmp_path / "cache"))   # not in the shared bundle
    trt = dict(p for p in _providers(bundle, spec, trt_options, gpu) if isinstance(p, tuple))
    assert trt["CUDAExecutionProvider"] == {"device_id": 0, "use_tf32": 0}      # TensorRT's fallback too
    tf32 = _providers(bundle, spec, OrtOptions(provider="cuda", cuda_tf32=True), gpu)
    assert tf32[0] == ("CUDAExecutionProvider", {"device_id": 0, "use_tf32": 1})


def test_graph_optimization_follows_the_level_the_quantizer_recorded(tmp_path_factory, tmp_path):
    import shutil

    src = exported_bundle(tmp_path_factory, "D").bundle_dir
    dst = shutil.copytree(src, tmp_path / "bundle")
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["quantization"] = {"recipe": "fp8", "options": {"stages": {"decoder": {"ort_graph_optimization": "basic"}}}}
    (dst / "manifest.json").write_text(json.dumps(manifest))
    bundle = load_bundle(dst)
    assert recorded_graph_level(bundle, io.DECODER_STAGE) == "basic"
    assert recorded_graph_level(bundle, io.VISION_STAGE) == recorded_graph_level(bundle, io.CONNECTOR_STAGE) == "all"
    level = make_session(bundle, io.DECODER_STAGE, OrtOptions(threads=1)).get_session_options().graph_optimization_level
    assert level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    level = make_session(bundle, io.DECODER_STAGE, OrtOptions(threads=1, graph_optimization="all")
                         ).get_session_options().graph_optimization_level
    assert level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    manifest["quantization"]["options"]["stages"]["decoder"]["ort_graph_optimization"] = "turbo"
    (dst / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="records graph optimization 'turbo'"):
        recorded_graph_level(load_bundle(dst), io.DECODER_STAGE)


class _FakeSession:
    """onnxruntime.InferenceSession as it comes back from a provider that failed to initialise: on its fallback."""
    made: list = []
    running: list = []

    def __init__(self, path, options, providers):
        _FakeSession.made.append(providers)

    def get_providers(self):
        return list(_FakeSession.running)


def _fake_gpu_onnxruntime(monkeypatch, running):
    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", _FakeSession)
    monkeypatch.setattr(_FakeSession, "made", [])
    monkeypatch.setattr(_FakeSession, "running", running)


def test_a_session_that_fell_back_from_the_requested_provider_is_refused(tmp_path_factory, tmp_path, monkeypatch):
    bundle = exported_bundle(tmp_path_factory, "D", io.PORTABLE_ATTENTION).bundle
    options = OrtOptions(provider="tensorrt", trt_cache_dir=str(tmp_path / "cache"))
    _fake_gpu_onnxruntime(monkeypatch, ["CUDAExecutionProvider", "CPUExecutionProvider"])
    with pytest.raises(ConfigError, match=r"stage 'vision': onnxruntime runs on CUDAExecutionProvider, not the "
                                          r"requested TensorrtExecutionProvider .*install the onnxruntime-gpu build "
                                          r"with TensorRT/CUDA .*LD_LIBRARY_PATH"):
        make_session(bundle, io.VISION_STAGE, options)
    _fake_gpu_onnxruntime(monkeypatch, ["CPUExecutionProvider"])
    with pytest.raises(ConfigError, match="runs on CPUExecutionProvider, not the requested CUDAExecutionProvider"):
        make_session(bundle, io.VISION_STAGE, OrtOptions(provider="cuda"))
    _fake_gpu_onnxruntime(monkeypatch, ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    assert make_session(bundle, io.VISION_STAGE, options).get_providers()[0] == "TensorrtExecutionProvider"


def test_the_tensorrt_ep_cache_directory_is_made_or_named(tmp_path_factory, tmp_path, monkeypatch):
    import shutil

    # onnxruntime creates only the cache path's last level: BUNDLE/engines/ort-tensorrt needs engines/ made first.
    root = shutil.copytree(exported_bundle(tmp_path_factory, "D", io.PORTABLE_ATTENTION).bundle_dir, tmp_path / "b")
    assert not (root / "engines").exists()
    _fake_gpu_onnxruntime(monkeypatch, ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    make_session(load_bundle(root), io.VISION_STAGE, OrtOptions(provider="tensorrt"))
    trt_options = dict(_FakeSession.made[-1][0][1])
    cache = root / "engines/ort-tensorrt"
    assert trt_options["trt_engine_cache_path"] == str(cache) and cache.is_dir()
    # Where it cannot be made (a read-only bundle; here a file in the way), the error names the option to move it.
    blocked = shutil.copytree(root, tmp_path / "blocked", ignore=shutil.ignore_patterns("engines"))
    (blocked / "engines").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"cannot create the TensorRT EP engine cache .*engines/ort-tensorrt .*set "
                                          r"the onnxruntime backend option trt_cache_dir to a writable directory"):
        make_session(load_bundle(blocked), io.VISION_STAGE, OrtOptions(provider="tensorrt"))
    elsewhere = tmp_path / "cache" / "orin"
    make_session(load_bundle(blocked), io.VISION_STAGE, OrtOptions(provider="tensorrt", trt_cache_dir=str(elsewhere)))
    assert elsewhere.is_dir()


def test_tensorrt_ep_gets_one_profile_covering_the_manifests(tmp_path_factory):
    # onnxruntime's TensorRT EP runs on profile 0 only: one profile spanning prefill and decode, tuned for decode.
    spec = exported_bundle(tmp_path_factory, "D", io.PORTABLE_ATTENTION).bundle.stage(io.DECODER_STAGE)
    options = trt_profile_options(spec)
    entries = {k: dict(e.split(":") for e in v.split(",")) for k, v in options.items()}
    assert all(list(v) == [t.name for t in spec.inputs] for v in entries.values())      # one entry per input
    low, opt, high = (entries[f"trt_profile_{k}_shapes"] for k in ("min", "opt", "max"))
    D = spec.inputs[0].dims[2]
    past_opt = spec.profiles[[p.name for p in spec.profiles].index("decode")].dim_ranges[io.PAST_SEQ].opt
    # seq from 1 (decode) to max_seq (prefill); past from 0 to max_seq-1; opt: a decode step at its typical past.
    assert (low[io.INPUTS_EMBEDS], opt[io.INPUTS_EMBEDS], high[io.INPUTS_EMBEDS]) == (f"1x1x{D}", f"1x1x{D}",
                                                                                      f"1x{MAX_SEQ}x{D}")
    assert low[io.past_key(0)].startswith("1x0x") and high[io.past_key(0)].startswith(f"1x{MAX_SEQ - 1}x")
    assert opt[io.past_key(0)].startswith(f"1x{past_opt}x") and 0 < past_opt < MAX_SEQ - 1


def test_the_tensorrt_ep_runs_an_int8_stage_with_its_int8_flag(tmp_path_factory, tmp_path):
    import dataclasses

    from edgeact.runtime.ort_engine import _providers

    bundle = exported_bundle(tmp_path_factory, "D", io.PORTABLE_ATTENTION).bundle
    spec = bundle.stage(io.DECODER_STAGE)
    available = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    options = OrtOptions(provider="tensorrt", trt_cache_dir=str(tmp_path))
    flags = {precision: dict(_providers(bundle, dataclasses.replace(spec, precision=precision), options,
                                        available)[0][1])["trt_int8_enable"] for precision in ("fp32", "int8", "int4")}
    assert flags == {"fp32": False, "int8": True, "int4": False}
