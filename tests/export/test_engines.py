"""Engine building: clear refusals before any TensorRT work, and the build path against a recording stand-in.

The stand-in `tensorrt` module implements the documented Python API surface build_engines uses
and records every call, so the orchestration (network flags, profiles, workspace, timing cache,
plan files, manifest records) runs without a GPU. The real build is the `gpu`-marked test.
"""
from __future__ import annotations

import sys
import types

import pytest

import edgeact.export.engines as engines
from edgeact.export.engines import TENSORRT_MISSING, build_engines, device_compute_capability
from edgeact.runtime.trt_targets import optimization_profiles, targets_for_device
from edgeact.runtime.bundle import EngineRecord, load_bundle, sha256_file
from edgeact.runtime.cli import main
from edgeact.runtime.errors import BundleError, ConfigError, EdgeactError
from tests.runtime.test_bundle import write_tiny_bundle
from tests.runtime.test_decode_program import exported_bundle


def fake_tensorrt(calls: dict, parse_ok: bool = True) -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.99.0"

    class Logger:
        WARNING = 2

        def __init__(self, severity):
            calls["log_severity"] = severity

    class TimingCache:
        def __init__(self, data):
            self.data = bytes(data)
            self.device = calls.get("device", "orin-0")   # TensorRT keys a cache to the device that timed it

        def serialize(self):
            return self.data + b"+timed"

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, lo, opt, hi):
            self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))

    class Config:
        def __init__(self):
            self.profiles, self.cache = [], None
            self.flags = {trt.BuilderFlag.TF32}                # TensorRT: TF32 "Enabled by default"
            calls.setdefault("configs", []).append(self)

        def set_memory_pool_limit(self, pool, size):
            calls["workspace"] = (pool, size)

        def set_flag(self, flag):
            self.flags.add(flag)

        def clear_flag(self, flag):
            self.flags.discard(flag)

        def get_flag(self, flag):
            return flag in self.flags

        def create_timing_cache(self, data):
            calls.setdefault("cache_loaded", []).append(bytes(data))
            if bytes(data) in calls.get("unreadable_caches", ()):
                return None                                    # TensorRT: a cache it cannot deserialize
            cache = TimingCache(data)
            if data.startswith(b"other-gpu"):
                cache.device = "h100-0"
            return cache

        def set_timing_cache(self, cache, ignore_mismatch):
            if cache.device != calls.get("device", "orin-0") and not ignore_mismatch:
                return False                                   # another device's cache: rejected, none is set
            self.cache = cache
            return True

        def get_timing_cache(self):
            return self.cache

        def add_optimization_profile(self, profile):
            if len(self.profiles) in calls.get("invalid_profiles", ()):
                return -1                                      # TensorRT: an invalid profile is not added
            self.profiles.append(profile.shapes)
            return len(self.profiles) - 1

    class Network:
        def __init__(self, flags):
            self.flags, self.parsed = flags, None

    class Parser:
        def __init__(self, network, logger):
            self.network = network
            self.num_errors = 0 if parse_ok else 1

        def parse_from_file(self, path):
            self.network.parsed = path
            return parse_ok

        def get_error(self, i):
            return "In node 3 (Foo): unsupported operator"

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            return Network(flags)

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            calls.setdefault("built", []).append((network.flags, network.parsed, config.profiles))
            return memoryview(b"PLAN " + network.parsed.encode())

    trt.Logger, trt.Builder, trt.OnnxParser = Logger, Builder, Parser
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=1)
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")
    trt.BuilderFlag = types.SimpleNamespace(TF32="tf32")
    return trt


@pytest.fixture
def orin_gpu(monkeypatch):
    monkeypatch.setattr(engines, "device_compute_capability", lambda device=0: (8, 7))


def test_missing_tensorrt_is_one_clear_error(tmp_path, monkeypatch, orin_gpu):
    monkeypatch.setitem(sys.modules, "tensorrt", None)       # import tensorrt -> ImportError
    path = write_tiny_bundle(tmp_path / "b")
    with pytest.raises(EdgeactError) as err:
        build_engines(path, "orin")
    assert str(err.value) == TENSORRT_MISSING
    assert "Jetson: JetPack ships it" in TENSORRT_MISSING and "pip install tensorrt" in TENSORRT_MISSING


def test_cli_build_engines_without_tensorrt(tmp_path, monkeypatch, capsys, orin_gpu):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    path = write_tiny_bundle(tmp_path / "b")
    assert main(["build-engines", str(path), "--target", "orin"]) == 2
    assert f"edgeact build-engines: error: {TENSORRT_MISSING}" in capsys.readouterr().err


def test_refusals_come_before_tensorrt_is_needed(tmp_path, tmp_path_factory, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    fp8 = write_tiny_bundle(tmp_path / "fp8", precision="fp8")
    with pytest.raises(BundleError, match=r"stage 'decoder' .*fp8 needs SM >= 8.9.*use int8 .* or int4 \(weight-only\)"):
        build_engines(fp8, "orin")
    with pytest.raises(ConfigError, match="unknown TensorRT target 'tx2'"):
        build_engines(fp8, "tx2")
    fused = exported_bundle(tmp_path_factory, "D").bundle_dir      # the fused decoder, the CPU default
    with pytest.raises(BundleError, match=r"fused decoder .* TensorRT cannot run; .*--attention portable"):
        build_engines(fused, "orin")
    # The fused export's ViT (MultiHeadAttention) is refused on its own too, with the same fix.
    with pytest.raises(BundleError, match=r"stage 'vision' .* MultiHeadAttention, which TensorRT cannot parse; "
                                          r"export the bundle with `edgeact export --attention portable`"):
        build_engines(fused, "orin", stages=["vision"], allow_unverified=True)
    failed = write_tiny_bundle(tmp_path / "failed", verification="failed")
    with pytest.raises(BundleError, match="verification failed at gate 'decoder.top1_agreement'.*--allow-unverified"):
        build_engines(failed, "orin")


def test_a_bundle_quantized_for_onnxruntime_is_refused_before_tensorrt_is_needed(tmp_path, tmp_path_factory,
                                                                                 monkeypatch):
    from edgeact.export.quant_options import QuantizeOptions
    from edgeact.export.quantize import quantize_bundle
    from tests.export.quant_fixtures import tiny_sources

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    portable = tiny_sources(tmp_path_factory)["portable"]
    out = tmp_path / "int8-dynamic"      # no --target: onnxruntime's w8a8-dynamic, even on a portable export
    quantize_bundle(portable, out, QuantizeOptions("int8", stages=("decoder",)), report_frames=0, threads=1)
    with pytest.raises(BundleError, match=r"stage 'decoder' .* MatMulIntegerToFloat, which TensorRT "
                                          r"cannot parse; quantize the portable fp32 bundle for the target: "
                                          r"`edgeact quantize --target orin`"):
        build_engines(out, "orin", allow_unverified=True)


def test_build_records_engines_in_the_manifest(tmp_path, monkeypatch, capsys, orin_gpu):
    calls: dict = {}
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(calls))
    path = write_tiny_bundle(tmp_path / "b")
    cache = tmp_path / "orin.timing"
    seen = []
    (record,) = build_engines(path, "orin", workspace_gb=2, timing_cache=cache,
                              on_stage=lambda name, i, n: seen.append((name, i, n)))

    assert seen == [("decoder", 0, 1)]
    flags, parsed, profiles = calls["built"][0]
    assert flags == 1 << 1 and parsed == str(path / "stages/decoder.onnx")   # STRONGLY_TYPED, from the file
    stage = load_bundle(path).stage("decoder")
    assert profiles == optimization_profiles(stage) and len(profiles) == 2
    assert calls["workspace"] == ("workspace", 2 << 30)
    assert (record.target, record.trt_version, record.compute_capability, record.profiles) == (
        "orin", "10.99.0", "8.7", ("prefill", "decode"))
    plan = path / "engines/orin/decoder.plan"
    assert plan.read_bytes() == b"PLAN " + parsed.encode() and record.sha256 == sha256_file(plan)
    assert cache.read_bytes() == b"+timed" and calls["cache_loaded"] == [b""]
    bundle = load_bundle(path)                     # checksums include the new engine
    assert bundle.engine("decoder", "orin") == record and "engines/orin/decoder.plan" in bundle.manifest.files
    assert main(["inspect", str(path)]) == 0
    shown = capsys.readouterr().out
    assert "engines/orin/decoder.plan" in shown and "10.99.0" in shown and record.sha256[:12] in shown

    # A rebuild reuses the saved timing cache and replaces (not duplicates) the record.
    build_engines(path, "orin", timing_cache=cache)
    assert calls["cache_loaded"][-1] == b"+timed"
    assert len(load_bundle(path).manifest.engines) == 1
    assert not [p for p in (path / "engines/orin").iterdir() if p.name.startswith(".")]


def test_tf32_is_off_unless_asked_for_and_recorded(tmp_path, monkeypatch, orin_gpu):
    # TensorRT enables TF32 by default; fp32 stages were verified in fp32, so the build clears it on every
    # stage's config (strongly typed or not: a math mode, not a type), and the engine record says which.
    calls: dict = {}
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(calls))
    path = write_tiny_bundle(tmp_path / "b", precision="fp32")
    (record,) = build_engines(path, "orin")
    assert calls["configs"] and not [c for c in calls["configs"] if c.get_flag("tf32")]
    assert record.tf32 is False and load_bundle(path).engine("decoder", "orin").tf32 is False

    calls["configs"].clear()
    (record,) = build_engines(path, "orin", tf32=True)
    assert calls["configs"] and all(c.get_flag("tf32") for c in calls["configs"])
    assert record.tf32 is True and load_bundle(path).engine("decoder", "orin") == record


def test_cli_tf32_flag_reaches_the_build(tmp_path, monkeypatch, capsys, orin_gpu):
    calls: dict = {}
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(calls))
    path = write_tiny_bundle(tmp_path / "b", precision="fp32")
    assert main(["build-engines", str(path), "--target", "orin"]) == 0
    assert not calls["configs"][-1].get_flag("tf32") and load_bundle(path).engine("decoder", "orin").tf32 is False
    capsys.readouterr()
    assert main(["build-engines", str(path), "--target", "orin", "--tf32"]) == 0
    assert calls["configs"][-1].get_flag("tf32") and load_bundle(path).engine("decoder", "orin").tf32 is True
    assert "TF32" in capsys.readouterr().out
    assert main(["inspect", str(path), "--json"]) == 0
    assert '"tf32": true' in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["build-engines", "--help"])
    assert "use TF32 on Ampere and later" in " ".join(capsys.readouterr().out.split())   # however argparse wraps


def test_an_engine_record_without_tf32_reads_as_built_with_it():
    # Manifests written before the field: their engines were built with TensorRT's default, TF32 on, and read so;
    # a non-bool value is refused.
    record = EngineRecord("decoder", "engines/orin/decoder.plan", "orin", "10.3.0", "8.7", "fp32", "0" * 64)
    data = record.to_dict()
    assert data["tf32"] is False and EngineRecord.from_dict(data) == record
    del data["tf32"]
    assert EngineRecord.from_dict(data).tf32 is True
    assert EngineRecord.from_dict({**data, "tf32": False}).tf32 is False
    with pytest.raises(BundleError, match=r"engines\.tf32: expected bool, found 'yes'"):
        EngineRecord.from_dict({**data, "tf32": "yes"})


def test_a_timing_cache_tensorrt_rejects_is_replaced_not_fatal(tmp_path, monkeypatch, caplog, orin_gpu):
    # A cache saved on another GPU (set_timing_cache returns False) or damaged (create_timing_cache returns None):
    # the build warns, starts from an empty cache and saves that one, so the next run does not fail the same way.
    calls: dict = {}
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(calls))
    path = write_tiny_bundle(tmp_path / "b")
    cache = tmp_path / "orin.timing"
    for saved in (b"other-gpu", b"damaged"):
        calls["unreadable_caches"] = {b"damaged"}
        cache.write_bytes(saved)
        caplog.clear()
        with caplog.at_level("WARNING", logger="edgeact.export.engines"):
            (record,) = build_engines(path, "orin", timing_cache=cache)
        assert f"timing cache {cache} was rejected by TensorRT" in caplog.text
        assert calls["cache_loaded"][-2:] == [saved, b""] and cache.read_bytes() == b"+timed"
        assert record.target == "orin"
    # Even an empty cache refused: a clear error, not an AttributeError on None.
    calls["unreadable_caches"] = {b"", b"damaged"}
    cache.write_bytes(b"damaged")
    with pytest.raises(EdgeactError, match="TensorRT could not create or set even an empty timing cache"):
        build_engines(path, "orin", timing_cache=cache)


def test_an_optimization_profile_tensorrt_refuses_is_named(tmp_path, monkeypatch, orin_gpu):
    calls: dict = {"invalid_profiles": {1}}
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(calls))
    path = write_tiny_bundle(tmp_path / "b")
    with pytest.raises(BundleError, match=r"stage 'decoder': TensorRT 10\.99\.0 refused optimization profile "
                                          r"'decode' as invalid .*re-export the bundle"):
        build_engines(path, "orin")
    assert "built" not in calls and load_bundle(path).manifest.engines == []


def test_parse_failure_and_wrong_gpu_are_named(tmp_path, monkeypatch):
    calls: dict = {}
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(calls, parse_ok=False))
    path = write_tiny_bundle(tmp_path / "b")
    monkeypatch.setattr(engines, "device_compute_capability", lambda device=0: (9, 0))
    with pytest.raises(ConfigError, match="this GPU is SM 9.0 .* but target orin is SM 8.7"):
        build_engines(path, "orin")
    with pytest.raises(BundleError, match=r"decoder.onnx: TensorRT 10.99.0 cannot parse stage 'decoder': In node 3 \(Foo\)"):
        build_engines(path, "h100")
    assert load_bundle(path).manifest.engines == [] and not (path / "engines").exists()


@pytest.mark.gpu
def test_real_tensorrt_build(tmp_path):
    pytest.importorskip("tensorrt", reason="TensorRT not installed (JetPack on a Jetson; pip install tensorrt on a GPU machine)")
    try:
        cc = device_compute_capability()
    except EdgeactError as exc:
        pytest.skip(f"no CUDA device readable: {exc}")
    targets = targets_for_device(cc)
    if not targets:
        pytest.skip(f"SM {cc} is not in the target table")
    path = write_tiny_bundle(tmp_path / "b")
    (record,) = build_engines(path, targets[0].name, workspace_gb=1, timing_cache=tmp_path / "cache")
    assert (path / record.file).stat().st_size > 0 and (tmp_path / "cache").stat().st_size > 0
    assert load_bundle(path).engine("decoder", targets[0].name) == record


def test_compute_capability_probes_fall_through_in_order(monkeypatch):
    monkeypatch.setattr(engines, "_cc_from_cuda_python", lambda device: None)
    monkeypatch.setattr(engines, "_cc_from_torch", lambda device: (8, 7))
    monkeypatch.setattr(engines, "_cc_from_nvidia_smi", lambda device: (9, 0))
    assert device_compute_capability() == (8, 7)
    monkeypatch.setattr(engines, "_cc_from_torch", lambda device: None)
    monkeypatch.setattr(engines, "_cc_from_nvidia_smi", lambda device: None)
    with pytest.raises(EdgeactError, match="cannot read this GPU's compute capability .*pip install cuda-python"):
        device_compute_capability()


def test_engines_for_another_jetson_module_of_the_same_sm_are_refused(tmp_path, monkeypatch, orin_gpu):
    calls: dict = {}
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(calls))
    monkeypatch.setattr(engines, "jetson_model", lambda: "NVIDIA Jetson Orin Nano Engineering Reference Developer Kit")
    path = write_tiny_bundle(tmp_path / "b")
    with pytest.raises(ConfigError, match=r"not a Jetson AGX Orin 64GB .* build with --target orin-nano$"):
        build_engines(path, "orin")
    assert "built" not in calls and not (path / "engines").exists()
    (record,) = build_engines(path, "orin-nano")
    assert record.target == "orin-nano"
