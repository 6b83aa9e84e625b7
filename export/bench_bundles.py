"""The bundles a benchmark compares: a checkpoint (synthetic if missing), its fp32 export and default quantizations, reused when valid.

The layout is `edgeact bench-quant`'s work directory (fp32/, calibration/, one directory per
recipe), so bench-policy and bench-quant reuse each other's bundles. "Valid" is checked, never
assumed: the fp32 bundle must come from this checkpoint (path, config hash, written after its
weights), and a quantized one must record the options it would be made with now and hold the
fp32 bundle's own arrays.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from edgeact.runtime import stage_io as io
from edgeact.runtime.errors import ConfigError
from edgeact.runtime.kv_cache import is_fused

QUANTIZED = ("int8", "int4")
DEFAULT_SIZE = "bench"


def ensure_checkpoint(path: str | Path, size: str = DEFAULT_SIZE, seed: int = 0) -> Path:
    """`path` if it holds a checkpoint; a synthetic -D checkpoint of `size` written there if nothing is there."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{path}: a file, not a checkpoint directory; point at a checkpoint directory or at a new "
                          "one to create a synthetic checkpoint in")
    if path.exists() and any(path.iterdir()):
        raise ConfigError(f"{path}: not a checkpoint (no config.json) and not empty; point at a checkpoint "
                          "directory or at a new one to create a synthetic checkpoint in")
    from edgeact.export.synthetic import make_checkpoint

    return make_checkpoint("D", size, seed, path, overwrite=path.exists())


def prepare_bundles(checkpoint: str | Path, bundles_dir: str | Path, precisions: tuple[str, ...] = QUANTIZED, *,
                    seed: int = 0, threads: int | None = None, calibration_samples: int = 8, fresh: bool = False,
                    on_step: Callable[[str], None] | None = None, attention: str = io.FUSED_ATTENTION,
                    int8_mode: str | None = None) -> dict[str, Path]:
    """{"fp32": ..., "int8": ..., "int4": ...}: bundles under bundles_dir in bench-quant's layout, reused when valid.

    Each precision is `edgeact quantize --precision P` with its default options (int8: `int8_mode`, or
    the default mode), in the directory bench-quant gives that recipe, so either command reuses the other's.
    `attention` is the decoder's form (fused on a CPU, portable for onnxruntime's CUDA EP); bundles of
    the other form are re-exported.
    """
    from edgeact.export.bundle_export import ExportOptions, export_bundle
    from edgeact.export.quantize import quantize_bundle

    step = on_step or (lambda name: None)
    checkpoint, root = Path(checkpoint).absolute(), Path(bundles_dir).absolute()
    fp32 = root / "fp32"
    exported = fresh or not exported_from(fp32, checkpoint, attention)
    if exported:
        export_bundle(checkpoint, fp32, ExportOptions(attention=attention), overwrite=True)
    step("fp32 bundle")
    bundles = {"fp32": fp32}
    for precision in precisions:
        name, quant = default_recipe(precision, int8_mode if precision == "int8" else None)
        out = root / name
        if fresh or not quantized_from(out, fp32, quant):
            calibration = None
            if quant.needs_calibration:
                calibration = calibration_for(fp32, root / "calibration", calibration_samples, seed, threads, exported)
            quantize_bundle(fp32, out, quant, calibration, overwrite=True, report_frames=0, seed=seed, threads=threads)
        bundles[precision] = out
        step(f"{precision} bundle")
    return bundles


def default_recipe(precision: str, int8_mode: str | None = None):
    """(directory name in bench-quant's work dir, QuantizeOptions) of `edgeact quantize --precision P [--int8-mode M]`."""
    from edgeact.export.quant_bench import BenchOptions
    from edgeact.export.quant_options import QuantizeOptions

    default = QuantizeOptions(precision, int8_mode=int8_mode)
    names = [name for name, quant in BenchOptions(precisions=(precision,)).recipes() if quant == default]
    return (names[0] if names else precision), default


def exported_from(bundle_dir: Path, checkpoint: Path, attention: str = io.FUSED_ATTENTION) -> bool:
    """An fp32 bundle exported from this checkpoint (path, config and, where the bundle records them, weights), after
    its weights were last written, with this form of the decoder."""
    from edgeact.calibration.calibration_set import weights_sha256
    from edgeact.runtime.bundle import MANIFEST_NAME, load_bundle, sha256_file
    from edgeact.runtime.errors import BundleError

    if not (bundle_dir / MANIFEST_NAME).is_file():
        return False
    try:
        manifest = load_bundle(bundle_dir, verify_checksums=False, allow_failed_verification=True).manifest
    except BundleError:
        return False
    newest_weights = max(p.stat().st_mtime for p in checkpoint.glob("*.safetensors*"))
    return (all(s.precision == "fp32" for s in manifest.stages.values())
            and is_fused(manifest.stages[io.DECODER_STAGE]) == (attention == io.FUSED_ATTENTION)
            and manifest.model.source_checkpoint == str(checkpoint)
            and manifest.model.source_config_sha256 == sha256_file(checkpoint / "config.json")
            and (bundle_dir / MANIFEST_NAME).stat().st_mtime >= newest_weights
            # another model of the same config copied in with its older times (cp -p, rsync -t) is caught here
            and (not manifest.model.source_weights_sha256     # hashed only where recorded (a full read)
                 or manifest.model.source_weights_sha256 == weights_sha256("checkpoint", checkpoint)))


def quantized_from(bundle_dir: Path, fp32_dir: Path, quant) -> bool:
    """A bundle quantized with these options whose copied files (the arrays) are the fp32 bundle's own."""
    from edgeact.runtime.bundle import MANIFEST_NAME, load_bundle
    from edgeact.runtime.errors import BundleError

    if not (bundle_dir / MANIFEST_NAME).is_file():
        return False
    try:
        manifest = load_bundle(bundle_dir, verify_checksums=False, allow_failed_verification=True).manifest
        source = load_bundle(fp32_dir, verify_checksums=False, allow_failed_verification=True).manifest
    except BundleError:
        return False
    q = manifest.quantization
    if q is None:
        return False
    # The manifest records every option, except that "stages" holds per-stage notes keyed by stage.
    recorded = {**q.options, "stages": list(q.options.get("stages") or ())}
    wanted = {k: v for k, v in quant.to_dict().items() if k != "extra"}
    arrays = [spec.file for spec in source.weights.values()]
    return (all(recorded.get(k) == v for k, v in wanted.items())
            and is_fused(manifest.stages[io.DECODER_STAGE]) == is_fused(source.stages[io.DECODER_STAGE])
            and all(rel in manifest.files and manifest.files[rel].sha256 == source.files[rel].sha256 for rel in arrays))


def calibration_for(fp32: Path, calib_dir: Path, samples: int, seed: int, threads: int | None, rebuild: bool) -> Path:
    """The benchmarks' calibration set: the one in calib_dir when it holds `samples` samples of `seed` answered by the
    fp32 bundle's model; else built (and kept) there."""
    from edgeact.calibration.calibration_build import build_calibration_set

    if rebuild or not _calibration_fits(calib_dir, fp32, samples, seed):
        build_calibration_set(fp32, calib_dir, samples, seed, threads=threads, overwrite=True)
    return calib_dir


def _calibration_fits(calib_dir: Path, fp32: Path, samples: int, seed: int) -> bool:
    from edgeact.calibration.calibration_set import MANIFEST_FILE, CalibrationError, CalibrationSet, weights_sha256
    from edgeact.runtime.bundle import read_manifest

    if not (calib_dir / MANIFEST_FILE).is_file():
        return False
    try:
        calib = CalibrationSet.load(calib_dir)
    except CalibrationError:
        return False
    model = calib.model
    return (len(calib) == samples and calib.seed == seed and model.get("kind") == "bundle"
            and model.get("config_sha256") == read_manifest(fp32).model.source_config_sha256
            and model.get("weights_sha256", "") == weights_sha256("bundle", fp32) != "")
