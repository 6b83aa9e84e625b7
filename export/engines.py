"""Build TensorRT engines for a bundle's stages on the GPU they will run on, and record them in its manifest.

Uses the documented `tensorrt` Python API: OnnxParser into a STRONGLY_TYPED network (the ONNX
graph's types, QDQ nodes included, are the contract the verification gates checked; TensorRT
10.12+ deprecates weak typing and 11.x removes it), one optimization profile per manifest
profile, a timing cache reused across stages and runs (one TensorRT rejects, e.g. another GPU's,
is replaced by an empty one with a warning), and a serialized plan per stage. TF32 (on by default in
TensorRT) is turned off unless asked for, so fp32 layers compute what the bundle verified.
tensorrt is imported inside functions: this module loads (and its errors explain) without it.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
from pathlib import Path
from typing import Callable, Iterable

from edgeact.export.bundle_writer import update_manifest, utc_now
from edgeact.runtime.device_info import jetson_model
from edgeact.runtime.trt_targets import (
    check_device, check_precision, engine_file, engine_record, get_target, optimization_profiles, profile_names,
)
from edgeact.runtime import stage_io as io
from edgeact.runtime.bundle import Bundle, EngineRecord, Manifest, StageSpec, load_bundle, sha256_file
from edgeact.runtime.errors import BundleError, ConfigError, EdgeactError
from edgeact.runtime.kv_cache import require_portable

log = logging.getLogger(__name__)

TENSORRT_MISSING = ("TensorRT is not installed; build engines on the target (Jetson: JetPack ships it) "
                    "or pip install tensorrt on a machine with an NVIDIA GPU")


def import_tensorrt():
    try:
        import tensorrt
    except (ImportError, OSError):   # OSError: the wheel is there but libnvinfer is not
        raise EdgeactError(TENSORRT_MISSING) from None
    return tensorrt


def device_compute_capability(device: int = 0) -> tuple[int, int]:
    """SM of the GPU here, asked of cuda-python, then torch, then nvidia-smi (Jetson Orin has no nvidia-smi)."""
    for probe in (_cc_from_cuda_python, _cc_from_torch, _cc_from_nvidia_smi):
        cc = probe(device)
        if cc is not None:
            return cc
    raise EdgeactError("cannot read this GPU's compute capability (no cuda-python, CUDA-enabled torch or nvidia-smi "
                       "found); pip install cuda-python, or check that the NVIDIA driver is loaded")


def _cc_from_cuda_python(device: int) -> tuple[int, int] | None:
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError:
            return None
    attr = cudart.cudaDeviceAttr
    try:
        err, major = cudart.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMajor, device)
        err2, minor = cudart.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMinor, device)
    except (RuntimeError, OSError):   # bindings present, CUDA runtime library missing
        return None
    ok = cudart.cudaError_t.cudaSuccess
    return (int(major), int(minor)) if err == ok and err2 == ok else None


def _cc_from_torch(device: int) -> tuple[int, int] | None:
    try:
        import torch
    except ImportError:
        return None
    return tuple(torch.cuda.get_device_capability(device)) if torch.cuda.is_available() else None


def _cc_from_nvidia_smi(device: int) -> tuple[int, int] | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, f"--id={device}", "--query-gpu=compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout.strip()
        major, minor = out.split(".")
        return int(major), int(minor)
    except (subprocess.SubprocessError, ValueError, OSError):
        return None


# onnxruntime contrib ops the fused export writes (the attention); every other one comes from an onnxruntime
# quantization recipe (MatMulNBits, int8 w8a8-dynamic's MatMulIntegerToFloat).
_FUSED_ATTENTION_OPS = frozenset({"GroupQueryAttention", "MultiHeadAttention"})


def require_standard_ops(stage: str, onnx_path: Path, target: str) -> None:
    """Refuse a stage holding onnxruntime contrib ops (com.microsoft), which TensorRT's ONNX parser cannot read."""
    try:
        import onnx
    except ImportError as exc:      # a robot installed with the runtime only (README "Installing on the robot")
        raise ConfigError(f"build-engines reads the stages' graphs with the onnx package ({exc}); install it on the "
                          "machine that builds the engines: pip install onnx") from None

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    contrib = sorted({n.op_type for n in graph.node if n.domain == "com.microsoft"})
    if not contrib:
        return
    fix = (f"export the bundle with `edgeact export --attention {io.PORTABLE_ATTENTION}`"
           if _FUSED_ATTENTION_OPS & set(contrib) else
           f"quantize the portable fp32 bundle for the target: `edgeact quantize --target {target}`")
    raise BundleError(f"stage {stage!r} ({onnx_path}) holds onnxruntime ops {', '.join(contrib)}, which TensorRT "
                      f"cannot parse; {fix}")


def check_buildable(bundle: Bundle, target: str, stages: Iterable[str] | None = None, workspace_gb: float = 4.0):
    """What build_engines checks before minutes of building, for a bundle already loaded: every chosen stage's
    precision on the target and its ops, that TensorRT imports, and that this GPU is the target's SM. Returns
    (target, chosen stages, the tensorrt module, the compute capability). `edgeact flash --target` runs it before
    copying a bundle into the store."""
    if not workspace_gb > 0:
        raise EdgeactError(f"workspace {workspace_gb} GB must be positive; Jetson Orin builds use 2-8 GB")
    tgt = get_target(target)
    chosen = [bundle.stage(name) for name in (stages if stages is not None else bundle.manifest.stages)]
    for stage in chosen:
        if stage.name == io.DECODER_STAGE:
            require_portable(stage, "TensorRT")
        try:
            check_precision(tgt, stage.precision)
        except EdgeactError as exc:
            raise BundleError(f"stage {stage.name!r} ({bundle.path(stage.file)}): {exc}") from None
    for stage in chosen:
        require_standard_ops(stage.name, bundle.path(stage.file), tgt.name)
    trt = import_tensorrt()
    cc = device_compute_capability()
    check_device(tgt, cc, jetson_model())
    return tgt, chosen, trt, cc


def build_engines(bundle_dir: str | Path, target: str, *, workspace_gb: float = 4.0,
                  timing_cache: str | Path | None = None, stages: Iterable[str] | None = None,
                  allow_unverified: bool = False, on_stage: Callable[[str, int, int], None] | None = None,
                  tf32: bool = False) -> list[EngineRecord]:
    """Build one engine per stage (or per named stage) into BUNDLE/engines/TARGET/ and record each.

    Checks first, before minutes of building: the bundle's checksums and verification, every
    stage's precision on the target, and that this GPU is the target's SM. Each finished engine is
    recorded at once (an interrupted run keeps the engines already built). tf32 lets fp32 layers use TF32
    (Ampere and later; TensorRT's default, which rounds matrix-product inputs to 10-bit mantissas); off, the
    default, fp32 stays fp32 as the bundle was verified (the onnxruntime paths' cuda_tf32 default too).
    """
    bundle = load_bundle(bundle_dir, verify_checksums=True, allow_failed_verification=allow_unverified)
    tgt, chosen, trt, cc = check_buildable(bundle, target, stages, workspace_gb)

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    cache_path = Path(timing_cache) if timing_cache else None
    cache = None
    records = []
    for i, stage in enumerate(chosen):
        if on_stage is not None:
            on_stage(stage.name, i, len(chosen))
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
        # TF32 is a math mode, not a type: it applies to a strongly typed network's fp32 layers too.
        (config.set_flag if tf32 else config.clear_flag)(trt.BuilderFlag.TF32)
        # One cache for every stage: layers the stages share (same GEMM shapes) are timed once.
        cache = _set_timing_cache(config, cache, cache_path)
        rel = engine_file(tgt, stage.name)
        _build_stage(trt, builder, logger, config, stage, bundle.path(stage.file), bundle.path(rel))
        if cache_path is not None:
            timed = config.get_timing_cache()
            if timed is None:
                log.warning("TensorRT returned no timing cache after stage %r; %s is not updated",
                            stage.name, cache_path)
            else:
                _write_atomically(cache_path, timed.serialize())
        record = engine_record(stage, tgt, trt_version=str(trt.__version__), compute_capability=cc,
                               sha256=sha256_file(bundle.path(rel)), built_utc=utc_now(), tf32=tf32)
        update_manifest(bundle.root, _recorder(record), rehash=[rel])
        records.append(record)
    return records


def _set_timing_cache(config, cache, cache_path: Path | None):
    """Give the builder config the timing cache (the saved one, read at the first stage); returns the cache set.

    TensorRT rejects a cache it cannot read (create_timing_cache returns None) or one from another device or
    version (set_timing_cache returns False, ignore_mismatch off); without a cache get_timing_cache then returns
    None, and every later run would fail on the same file. Such a cache is replaced by an empty one.
    """
    if cache is None and cache_path is not None and cache_path.is_file():
        cache = config.create_timing_cache(cache_path.read_bytes())
        if cache is not None and config.set_timing_cache(cache, False):
            return cache
        log.warning("timing cache %s was rejected by TensorRT (another GPU or TensorRT version, or damaged); "
                    "starting from an empty cache, which replaces it after this stage", cache_path)
        cache = None
    if cache is None:
        cache = config.create_timing_cache(b"")
    if cache is None or not config.set_timing_cache(cache, False):
        raise EdgeactError("TensorRT could not create or set even an empty timing cache (see its log); check the "
                           "TensorRT install and the GPU")
    return cache


def _build_stage(trt, builder, logger, config, stage: StageSpec, onnx_path: Path, plan_path: Path) -> None:
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    # parse_from_file (not parse(bytes)) so the parser finds external-data files beside the model.
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise BundleError(f"{onnx_path}: TensorRT {trt.__version__} cannot parse stage {stage.name!r}: "
                          f"{'; '.join(errors[:5]) or 'no error recorded'}; check the exporter's opset and ops")
    for profile_name, shapes in zip(profile_names(stage), optimization_profiles(stage)):
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes.items():
            profile.set_shape(name, lo, opt, hi)
        if config.add_optimization_profile(profile) < 0:
            raise BundleError(f"stage {stage.name!r}: TensorRT {trt.__version__} refused optimization profile "
                              f"{profile_name!r} as invalid (see its log); fix the stage's profiles or "
                              "dim_ranges in the manifest (re-export the bundle)")
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise BundleError(f"stage {stage.name!r}: TensorRT {trt.__version__} failed to build an engine (see its log "
                          "above); a larger --workspace-gb or narrower dim_ranges often help")
    _write_atomically(plan_path, plan)


def _write_atomically(path: Path, data) -> None:
    """Write via a hidden temporary + os.replace: a killed build never leaves a truncated plan."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _recorder(record: EngineRecord) -> Callable[[Manifest], None]:
    def add(manifest: Manifest) -> None:
        manifest.engines = [r for r in manifest.engines if (r.target, r.stage) != (record.target, record.stage)]
        manifest.engines.append(record)
    return add
