"""The native TensorRT runner: profile choice, buffer sizing, engine records, and the whole decoder path.

Without a GPU, the runner is driven through stand-ins for `tensorrt` and cuda-python that
implement the documented API surface it uses (deserialize_cuda_engine, one context per
profile over user-managed activation memory, set_input_shape, set_tensor_address,
execute_async_v3; cudaMalloc, cudaMemcpyAsync) over host memory, and "execute" a plan by
running the stage's ONNX graph with onnxruntime on the tensors at the addresses the runner set.
So shapes, addresses, cache offsets and profile choice are checked against the onnxruntime
engine. The real run is the `gpu`-marked test.
"""
from __future__ import annotations

import ctypes
import shutil
import sys
import types

import numpy as np
import onnxruntime as ort
import pytest

from edgeact.runtime import stage_io as io, trt_engine
from edgeact.runtime.bundle import DimRange, EngineRecord, load_bundle
from edgeact.runtime.engines import open_backend
from edgeact.runtime.errors import BundleError, ConfigError, EdgeactError
from edgeact.runtime.kv_cache import CacheLayout
from edgeact.runtime.trt_engine import (
    TENSORRT_MISSING, engine_shape, pick_engine, profile_ranges, select_profile, tensor_bytes,
)
from edgeact.runtime.vision_stages import VisionStages
from tests.runtime.test_decode_program import MAX_SEQ, exported_bundle

FAKE_TRT_VERSION = "10.9.0"
FAKE_ACTIVATION_BYTES = 4096      # the stand-in engine's device_memory_size_v2
_ORT_TYPES = {"tensor(float)": np.float32, "tensor(int64)": np.int64}


def _record(stage="decoder", target="h100", cc="9.0", version=FAKE_TRT_VERSION, profiles=("prefill", "decode")):
    return EngineRecord(stage=stage, file=f"engines/{target}/{stage}.plan", target=target, trt_version=version,
                        compute_capability=cc, precision="fp32", sha256="0" * 64, profiles=profiles)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return exported_bundle(tmp_path_factory, "D", io.PORTABLE_ATTENTION)      # TensorRT takes the portable decoder


# ------------------------------------------------------------------------------- pure logic
def test_the_narrowest_profile_holding_the_shapes_is_chosen(exported):
    spec = exported.bundle.stage(io.DECODER_STAGE)
    ranges = profile_ranges(spec, _record())
    assert ranges[1][io.SEQ] == DimRange(1, 1, 1) and ranges[0][io.SEQ].max == MAX_SEQ
    assert select_profile(ranges, {io.SEQ: 1, io.PAST_SEQ: 300}) == 1        # a decode step
    assert select_profile(ranges, {io.SEQ: 120, io.PAST_SEQ: 0}) == 0        # the prompt
    assert select_profile(ranges, {io.SEQ: 40, io.PAST_SEQ: 200}) == 0       # a forced chunk after a past
    with pytest.raises(EdgeactError, match="no engine profile holds"):
        select_profile(ranges, {io.SEQ: MAX_SEQ + 1, io.PAST_SEQ: 0})
    with pytest.raises(BundleError, match=r"profiles \['turbo'\] are not in the manifest"):
        profile_ranges(spec, _record(profiles=("prefill", "turbo")))


def test_buffers_are_sized_for_the_largest_shapes_in_the_manifest(exported):
    spec = exported.bundle.stage(io.DECODER_STAGE)
    llm = exported.bundle.config.llm_config
    hidden = next(t for t in spec.outputs if t.name == io.HIDDEN_STATES)
    past = next(t for t in spec.inputs if t.name == io.past_key(0))
    assert tensor_bytes(hidden.dims, hidden.dtype, spec) == MAX_SEQ * llm.hidden_size * 4
    assert tensor_bytes(past.dims, past.dtype, spec) == (MAX_SEQ - 1) * llm.num_key_value_heads * llm.head_dim * 4


def test_the_engine_record_must_fit_this_gpu_and_tensorrt(exported, tmp_path):
    bundle = _with_records(exported, tmp_path, [_record(), _record(target="orin", cc="8.7")])
    assert pick_engine(bundle, "decoder", None, (9, 0), FAKE_TRT_VERSION).target == "h100"
    assert pick_engine(bundle, "decoder", "orin", None, FAKE_TRT_VERSION).target == "orin"
    with pytest.raises(BundleError, match=r"on SM 8\.9; it has h100 \(SM 9\.0\), orin \(SM 8\.7\)\. Build them"):
        pick_engine(bundle, "decoder", None, (8, 9), FAKE_TRT_VERSION)
    with pytest.raises(BundleError, match=r"built with TensorRT 10\.9\.0, this is TensorRT 10\.13\.0.*rebuild"):
        pick_engine(bundle, "decoder", None, (9, 0), "10.13.0")
    with pytest.raises(BundleError, match="no TensorRT engine for stage 'vision'"):
        pick_engine(bundle, "vision", None, (9, 0), FAKE_TRT_VERSION)


def test_on_a_jetson_the_engines_of_this_module_are_taken_not_only_of_this_sm(exported, tmp_path):
    """Orin AGX, NX and Nano all report SM 8.7; engines are specific to the module that built them."""
    bundle = _with_records(exported, tmp_path, [_record(target="orin", cc="8.7"),
                                                _record(target="orin-nano", cc="8.7")])
    agx, nano = "NVIDIA Jetson AGX Orin Developer Kit", "NVIDIA Jetson Orin Nano Developer Kit"
    assert pick_engine(bundle, "decoder", None, (8, 7), FAKE_TRT_VERSION, agx).target == "orin"
    assert pick_engine(bundle, "decoder", None, (8, 7), FAKE_TRT_VERSION, nano).target == "orin-nano"
    with pytest.raises(ConfigError, match="engines for targets"):        # not a Jetson, or not known: ambiguous
        pick_engine(bundle, "decoder", None, (8, 7), FAKE_TRT_VERSION)
    only_nano = _with_records(exported, tmp_path / "nano", [_record(target="orin-nano", cc="8.7")])
    with pytest.raises(BundleError, match=r"on SM 8\.7; it has orin-nano \(SM 8\.7\)\. Build them on this device"):
        pick_engine(only_nano, "decoder", None, (8, 7), FAKE_TRT_VERSION, agx)


def test_a_named_targets_engine_must_be_built_for_this_gpus_sm(exported, tmp_path):
    bundle = _with_records(exported, tmp_path, [_record(), _record(target="orin", cc="8.7")])
    with pytest.raises(BundleError, match=r"engines/orin/decoder\.plan: target 'orin' is built for SM 8\.7, this GPU is "
                                          r"SM 9\.0; .*build them on this device with edgeact build-engines .* --target "
                                          r"T, or set the target option to 'h100' \(built for SM 9\.0\)$"):
        pick_engine(bundle, "decoder", "orin", (9, 0), FAKE_TRT_VERSION)       # an Orin plan on an H100
    assert pick_engine(bundle, "decoder", "orin", (8, 7), FAKE_TRT_VERSION).target == "orin"
    # The SM numbers one chip reports under different CUDA toolkits (Thor: 10.1, 11.0) are one SM, as for
    # build-engines (trt_targets.check_device); the target's own number on another chip is not.
    thor = _with_records(exported, tmp_path / "thor", [_record(target="thor", cc="10.1")])
    assert pick_engine(thor, "decoder", "thor", (11, 0), FAKE_TRT_VERSION).target == "thor"
    assert pick_engine(thor, "decoder", None, (11, 0), FAKE_TRT_VERSION).target == "thor"
    with pytest.raises(BundleError, match=r"target 'thor' is built for SM 10\.1, this GPU is SM 9\.0; .*--target T$"):
        pick_engine(thor, "decoder", "thor", (9, 0), FAKE_TRT_VERSION)


def test_missing_tensorrt_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)      # import tensorrt raises ImportError
    with pytest.raises(EdgeactError) as err:
        open_backend("tensorrt")
    assert str(err.value) == TENSORRT_MISSING
    with pytest.raises(ConfigError, match="device_id is -1"):
        open_backend("tensorrt", device_id=-1)


# ----------------------------------------------------------------- the runner, end to end
def test_a_fused_decoder_is_refused_naming_the_portable_export(tmp_path_factory, tmp_path, monkeypatch):
    fused = exported_bundle(tmp_path_factory, "D")
    bundle = _with_records(fused, tmp_path, [_record()], plans=True)
    _install_fakes(monkeypatch)
    with pytest.raises(BundleError, match=r"fused decoder .* TensorRT cannot run; export the bundle with "
                                          r"`edgeact export --attention portable`"):
        open_backend("tensorrt").decoder(bundle, max_chunk=32)


def test_decoder_engine_matches_onnxruntime_through_the_tensorrt_api(exported, tmp_path, monkeypatch):
    bundle = _with_records(exported, tmp_path, [_record()], plans=True)
    calls = _install_fakes(monkeypatch)
    engine = open_backend("tensorrt").decoder(bundle, max_chunk=32)
    reference = open_backend("onnxruntime", threads=1).decoder(bundle, max_chunk=32)
    rng = np.random.default_rng(1)
    assert engine.all_hidden_states and reference.all_hidden_states
    for n in (20, 32, 1, 1, 5, 1):
        chunk = rng.standard_normal((n, engine.layout.hidden_size)).astype(np.float32)
        engine.embeds[:n] = reference.embeds[:n] = chunk
        np.testing.assert_allclose(engine.step(n), reference.step(n), rtol=1e-6, atol=1e-6)
        # Every row of the chunk comes back too (the decode program's drafting verifies each).
        np.testing.assert_allclose(engine.hidden_states(n), reference.hidden_states(n), rtol=1e-6, atol=1e-6)
    with pytest.raises(EdgeactError, match="the last step fed 1 positions"):
        engine.hidden_states(2)
    assert engine.length == reference.length == 60
    # One context per profile; single-token steps ran on the decode profile (index 1), chunks on prefill (0).
    assert [(profile, shape[1]) for profile, shape in calls["executed"]] == [(0, 20), (0, 32), (1, 1), (1, 1), (0, 5), (1, 1)]
    assert calls["contexts"] == [0, 1]


def test_the_profiles_contexts_share_one_activation_buffer(exported, tmp_path, monkeypatch):
    # TensorRT's default (STATIC) gives each context activation memory for the largest profile: the decoder held
    # it twice. The contexts run one after another on one stream, so one user-managed buffer serves both.
    bundle = _with_records(exported, tmp_path, [_record()], plans=True)
    calls = _install_fakes(monkeypatch)
    engine = open_backend("tensorrt").decoder(bundle, max_chunk=32)
    assert calls["strategies"] == ["USER_MANAGED", "USER_MANAGED"]
    (address, size), second = calls["device_memory"]
    assert second == (address, size) and size == FAKE_ACTIVATION_BYTES and calls["malloc"].count(size) == 1
    engine.embeds[:3] = 0.5
    engine.step(3)
    engine.step(1)                                   # both contexts ran on the shared buffer
    assert [profile for profile, _ in calls["executed"]] == [0, 1]


def test_tensorrt_10_0_names_for_the_shared_activation_buffer_work_too(exported, tmp_path, monkeypatch):
    # device_memory_size_v2 / set_device_memory came with TensorRT 10.1; 10.0 has device_memory_size and a setter.
    bundle = _with_records(exported, tmp_path, [_record()], plans=True)
    calls = _install_fakes(monkeypatch, trt_10_0=True)
    engine = open_backend("tensorrt").decoder(bundle, max_chunk=32)
    (address, size), second = calls["device_memory"]
    assert second == (address, size) and size == FAKE_ACTIVATION_BYTES and calls["malloc"].count(size) == 1
    engine.embeds[:3] = 0.5
    engine.step(3)
    engine.step(1)
    assert [profile for profile, _ in calls["executed"]] == [0, 1]


def test_a_profile_tensorrt_refuses_is_named(exported, tmp_path, monkeypatch):
    bundle = _with_records(exported, tmp_path, [_record()], plans=True)
    calls = _install_fakes(monkeypatch)
    calls["refused_profiles"] = {1}                  # the Python binding raises RuntimeError for a refused profile
    with pytest.raises(BundleError, match=r"engines/h100/decoder\.plan: TensorRT refused optimization profile 1 "
                                          r"\('decode'\) .*rebuild it: edgeact build-engines .* --target h100"):
        open_backend("tensorrt").decoder(bundle, max_chunk=32)


def test_an_address_tensorrt_refuses_is_named(exported, tmp_path, monkeypatch):
    bundle = _with_records(exported, tmp_path, [_record()], plans=True)
    calls = _install_fakes(monkeypatch)
    engine = open_backend("tensorrt").decoder(bundle, max_chunk=32)
    calls["refused_addresses"] = {io.new_key(0)}
    with pytest.raises(EdgeactError, match=rf"stage 'decoder': TensorRT refused address 0x[0-9a-f]+ for "
                                           rf"'{io.new_key(0)}' \(not a tensor of the engine, or not \d+-byte aligned"):
        engine.step(1)
    assert calls["executed"] == []                   # refused before the engine ran on a wrong address


def test_a_cache_whose_rows_break_tensorrts_address_alignment_is_refused(exported, tmp_path, monkeypatch):
    # A step binds new keys/values at base + past * row_bytes; the tiny size's rows (2 kv heads x 16 x 4 bytes) are
    # 128 bytes, so every odd past would hand TensorRT an address off its 256-byte alignment.
    bundle = _with_records(exported, tmp_path, [_record()], plans=True)
    calls = _install_fakes(monkeypatch, alignment=256)
    with pytest.raises(BundleError, match=r"decoder: this model size's KV cache rows are 128 bytes \(kv_heads 2 x "
                                          r"head_dim 16 x 4 bytes of float32\), not a multiple of the 256 bytes "
                                          r"TensorRT requires .*onnxruntime backend"):
        open_backend("tensorrt").decoder(bundle, max_chunk=32)
    assert calls["malloc"] == []                     # refused before any device memory was taken


def test_the_decoder_feeds_no_chunk_longer_than_its_engines_profiles_take(exported, tmp_path, monkeypatch):
    # A prefill chunk asked for (policy.prefill_chunk) beyond the engine's prefill profile is cut to it, so the
    # decode program's chunks always fit a profile.
    import dataclasses

    from edgeact.export.bundle_writer import update_manifest
    from edgeact.runtime.bundle import StageProfile

    bundle = _with_records(exported, tmp_path, [_record()], plans=True)

    def narrow(manifest):
        spec = manifest.stages[io.DECODER_STAGE]
        manifest.stages[io.DECODER_STAGE] = dataclasses.replace(spec, profiles=tuple(
            StageProfile(p.name, {**p.dim_ranges, io.SEQ: DimRange(1, 16, 48)}) if p.name == "prefill" else p
            for p in spec.profiles))
    update_manifest(bundle.root, narrow)
    bundle = load_bundle(bundle.root)
    calls = _install_fakes(monkeypatch)
    engine = open_backend("tensorrt").decoder(bundle, max_chunk=1024)
    assert engine.max_chunk == 48 < MAX_SEQ
    engine.embeds[:48] = 0.5
    engine.step(48)
    assert calls["executed"] == [(0, (1, 48, engine.layout.hidden_size))]
    with pytest.raises(EdgeactError, match=r"decoder step of 49 positions; this engine takes 1\.\.48"):
        engine.step(49)


def test_vision_crop_by_crop_and_connector_through_the_tensorrt_api(exported, tmp_path, monkeypatch):
    records = [_record(), _record(stage=io.VISION_STAGE, profiles=("crop",)), _record(stage=io.CONNECTOR_STAGE, profiles=())]
    bundle = _with_records(exported, tmp_path, records, plans=True)
    calls = _install_fakes(monkeypatch)
    backend = open_backend("tensorrt")
    assert backend.on_device
    # crops_per_run unset (a GPU backend's default): as many as the engine takes, here its one-crop profile.
    vision = VisionStages(backend.stage(bundle, io.VISION_STAGE), backend.stage(bundle, io.CONNECTOR_STAGE),
                          crops_per_run=None)
    assert vision.vit.largest(io.N_CROPS) == vision.crops_per_run == 1
    cpu = open_backend("onnxruntime", threads=1)
    reference = VisionStages(cpu.stage(bundle, io.VISION_STAGE), cpu.stage(bundle, io.CONNECTOR_STAGE))
    assert reference.vit.largest(io.N_CROPS) == bundle.stage(io.VISION_STAGE).dim_ranges[io.N_CROPS].max > 1
    _, inputs, _ = exported.observation(3)
    args = (inputs.images, inputs.image_masks, inputs.pooled_patches_idx)
    np.testing.assert_allclose(vision.run(*args), reference.run(*args), rtol=1e-6, atol=1e-6)
    n_crops = len(inputs.images)
    # The ViT engine ran once per crop (its one profile: one crop), the connector once over all crops.
    assert [shape[0] for _, shape in calls["executed"]] == [1] * n_crops + [n_crops]
    with pytest.raises(EdgeactError, match="no engine profile holds"):
        vision.vit.run({io.IMAGES: inputs.images[:2], io.IMAGE_MASKS: inputs.image_masks[:2]})


def test_buffers_of_a_one_crop_engine_hold_one_crop(exported):
    spec = exported.bundle.stage(io.VISION_STAGE)
    images, features = spec.inputs[0], spec.outputs[0]
    one_crop = profile_ranges(spec, _record(stage=io.VISION_STAGE, profiles=("crop",)))
    n_patches, width = features.dims[1:]
    assert tensor_bytes(features.dims, features.dtype, spec, one_crop) == n_patches * width * 4
    assert engine_shape(images.dims, spec, one_crop) == (1, *images.dims[1:])
    # Without the profile, the engine takes the graph's whole range of crops.
    assert engine_shape(images.dims, spec, [spec.dim_ranges])[0] == spec.dim_ranges[io.N_CROPS].max > 1


@pytest.mark.gpu
def test_decoder_engine_on_a_real_gpu(exported, tmp_path):
    try:
        import tensorrt  # noqa: F401
        from cuda.bindings import runtime  # noqa: F401
    except ImportError:
        pytest.skip("needs an NVIDIA GPU with TensorRT 10 and cuda-python")
    from edgeact.export.engines import build_engines, device_compute_capability
    from edgeact.runtime.trt_targets import targets_for_device

    targets = targets_for_device(device_compute_capability())
    if not targets:
        pytest.skip("this GPU is no known TensorRT target")
    bundle_dir = shutil.copytree(exported.bundle_dir, tmp_path / "gpu")
    build_engines(bundle_dir, targets[0].name, stages=[io.DECODER_STAGE])
    bundle = load_bundle(bundle_dir)
    row_bytes = CacheLayout.from_stage(bundle.stage(io.DECODER_STAGE)).row_bytes
    if row_bytes % 256:
        # The tiny size's 128-byte cache rows break TensorRT's address alignment: the runner refuses it at load,
        # and the comparison runs on the small size (256-byte rows).
        with pytest.raises(BundleError, match="KV cache rows are 128 bytes"):
            open_backend("tensorrt").decoder(bundle, max_chunk=64)
        from edgeact.export.bundle_export import ExportOptions, export_bundle
        from edgeact.export.synthetic import make_checkpoint

        checkpoint = make_checkpoint("D", "small", seed=0, out_dir=tmp_path / "small")
        bundle_dir = export_bundle(checkpoint, tmp_path / "small-bundle",
                                   ExportOptions(max_seq=1024, attention=io.PORTABLE_ATTENTION))
        build_engines(bundle_dir, targets[0].name, stages=[io.DECODER_STAGE])
        bundle = load_bundle(bundle_dir)
        assert CacheLayout.from_stage(bundle.stage(io.DECODER_STAGE)).row_bytes % 256 == 0
    engine = open_backend("tensorrt").decoder(bundle, max_chunk=64)
    reference = open_backend("onnxruntime", threads=1).decoder(bundle, max_chunk=64)
    rng = np.random.default_rng(2)
    for n in (40, 1, 1, 7):
        engine.embeds[:n] = reference.embeds[:n] = rng.standard_normal((n, engine.layout.hidden_size))
        np.testing.assert_allclose(engine.step(n), reference.step(n), rtol=1e-3, atol=1e-3)


# ------------------------------------------------------------------------------ stand-ins
def _with_records(exported, tmp_path, records, plans=False):
    """A copy of the bundle whose manifest lists `records`; with plans, each 'plan' is its stage's ONNX bytes."""
    from edgeact.export.bundle_writer import update_manifest

    root = shutil.copytree(exported.bundle_dir, tmp_path / "bundle")
    for r in records:
        path = root / r.file
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes((root / "stages" / f"{r.stage}.onnx").read_bytes() if plans else b"plan")

    def add(manifest):
        manifest.engines = list(records)
    update_manifest(root, add)
    return load_bundle(root)


def _host_array(address: int, shape, dtype) -> np.ndarray:
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    return np.frombuffer((ctypes.c_char * nbytes).from_address(address), dtype=dtype).reshape(shape)


def _install_fakes(monkeypatch, alignment: int = 1, trt_10_0: bool = False) -> dict:
    """Stand-ins for tensorrt and cuda-python; `alignment`: the address alignment the runner must keep (TensorRT's
    256 bytes; 1 by default, so the tiny bundle's 128-byte cache rows run on the host-memory stand-in); `trt_10_0`:
    TensorRT 10.0's names for the activation memory (device_memory_size, the device_memory setter; no V2 calls)."""
    monkeypatch.setattr(trt_engine, "TENSOR_ALIGNMENT_BYTES", alignment)
    calls = {"executed": [], "contexts": [], "strategies": [], "device_memory": [], "malloc": [],
             "refused_profiles": set(), "refused_addresses": set()}
    blocks = {}

    cudart = types.SimpleNamespace(
        cudaMemcpyKind=types.SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2),
        cudaDeviceAttr=types.SimpleNamespace(cudaDevAttrComputeCapabilityMajor=75, cudaDevAttrComputeCapabilityMinor=76),
        cudaSetDevice=lambda device: (0,),
        cudaStreamCreate=lambda: (0, 7),
        cudaStreamSynchronize=lambda stream: (0,),
        cudaDeviceGetAttribute=lambda attr, device: (0, 9 if attr == 75 else 0),
        cudaFree=lambda ptr: (blocks.pop(ptr, None), 0)[1:],
    )

    def malloc(nbytes):
        calls["malloc"].append(nbytes)
        block = np.zeros(nbytes, np.uint8)
        blocks[block.ctypes.data] = block
        return 0, block.ctypes.data

    def memcpy(dst, src, nbytes, kind, stream):
        ctypes.memmove(dst, src, nbytes)
        return (0,)

    cudart.cudaMalloc, cudart.cudaMemcpyAsync = malloc, memcpy

    class Context:
        def __init__(self, engine, strategy):
            self.engine, self.shapes, self.addresses, self.profile = engine, {}, {}, 0
            self.strategy, self.device_memory = strategy, None

        def set_device_memory(self, address, size):
            self.device_memory = (address, size)
            calls["device_memory"].append((address, size))


        def set_optimization_profile_async(self, index, stream):
            if index in calls["refused_profiles"]:
                raise RuntimeError("Error in set optimization profile async.")
            self.profile = index
            calls["contexts"].append(index)
            return True

        def set_input_shape(self, name, shape):
            self.shapes[name] = tuple(shape)
            return True

        def set_tensor_address(self, name, address):
            if name in calls["refused_addresses"]:
                return False
            self.addresses[name] = address
            return True

        def execute_async_v3(self, stream):
            if self.strategy == "USER_MANAGED" and (self.device_memory is None
                                                    or self.device_memory[1] < FAKE_ACTIVATION_BYTES):
                return False          # TensorRT: a user-managed context runs only once it has its memory
            session = self.engine.session
            feeds = {i.name: _host_array(self.addresses[i.name], self.shapes[i.name], _ORT_TYPES[i.type]).copy()
                     for i in session.get_inputs()}
            for out, value in zip(session.get_outputs(), session.run(None, feeds)):
                _host_array(self.addresses[out.name], value.shape, value.dtype)[...] = value
            calls["executed"].append((self.profile, self.shapes[session.get_inputs()[0].name]))
            return True

    class Context10(Context):       # TensorRT 10.0: a setter without the size, no set_device_memory
        def __setattr__(self, name, value):
            if name == "device_memory" and value is not None:
                value = (value, FAKE_ACTIVATION_BYTES)     # TensorRT takes the engine's size
                calls["device_memory"].append(value)
            object.__setattr__(self, name, value)

        def __getattribute__(self, name):
            if name == "set_device_memory":
                raise AttributeError(name)
            return object.__getattribute__(self, name)

    class Engine:
        def __init__(self, data):
            options = ort.SessionOptions()
            options.intra_op_num_threads = 1
            self.session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
            self.num_optimization_profiles = 2 if any(i.name == io.POSITION_IDS for i in self.session.get_inputs()) else 1
            if trt_10_0:
                self.device_memory_size = FAKE_ACTIVATION_BYTES
            else:
                self.device_memory_size_v2 = FAKE_ACTIVATION_BYTES

        def create_execution_context(self, strategy="STATIC"):
            calls["strategies"].append(strategy)
            return (Context10 if trt_10_0 else Context)(self, strategy)

    trt = types.ModuleType("tensorrt")
    trt.__version__ = FAKE_TRT_VERSION
    trt.ExecutionContextAllocationStrategy = types.SimpleNamespace(
        STATIC="STATIC", ON_PROFILE_CHANGE="ON_PROFILE_CHANGE", USER_MANAGED="USER_MANAGED")
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, severity: None})
    trt.Runtime = type("Runtime", (), {"__init__": lambda self, logger: None,
                                       "deserialize_cuda_engine": lambda self, data: Engine(data)})
    cuda = types.ModuleType("cuda")
    bindings = types.ModuleType("cuda.bindings")
    bindings.runtime = cudart
    cuda.bindings = bindings
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "cuda", cuda)
    monkeypatch.setitem(sys.modules, "cuda.bindings", bindings)
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", cudart)
    return calls
