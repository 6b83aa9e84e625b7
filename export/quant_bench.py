"""`edgeact bench-quant`: one checkpoint or bundle quantized every way, compared side by side with its fp32 bundle.

From a checkpoint the fp32 bundle is exported first (reused when the work directory already
holds one exported from the same config); then one calibration set (reused when it has the samples
and seed asked for and was answered by this fp32 bundle's model) serves the int8 w8a8 and fp8
recipes and w8a8-dynamic's SmoothQuant (int8 w8a16 and int4 need none, and are given none), and
every bundle decodes the same held-out frames in one report run, so the decode speeds compare on one
machine at one time. int8 gets a bundle (and a row) per int8 mode, in work/int8-w8a8,
work/int8-w8a16 and work/int8-w8a8-dynamic. FP8 is built for a target with SM >= 8.9 (Thor by default): Orin has no FP8.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from edgeact.export.quant_options import INT8_MODES, QuantizeOptions
from edgeact.runtime import stage_io as io
from edgeact.runtime.bundle import load_bundle
from edgeact.runtime.errors import ConfigError
from edgeact.runtime.kv_cache import is_fused

BENCH_RECIPES = ("int8", "fp8", "int4")
SMOOTHED = ("w8a8", "w8a8-dynamic")       # int8 modes SmoothQuant applies to


@dataclass(frozen=True)
class BenchOptions:
    precisions: tuple[str, ...] = BENCH_RECIPES
    fp8_target: str = "thor"
    calibration_samples: int = 8
    report_frames: int = 4
    seed: int = 0
    threads: int | None = None
    smoothquant_alpha: float | None = None
    int4_block_size: int = 128
    int8_modes: tuple[str, ...] = INT8_MODES     # int8: a bundle per mode
    max_seq: int | None = None                   # export: decoder positions (default the config's)
    fresh: bool = False                          # re-export and re-calibrate even when the work dir has them
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = [p for p in self.precisions if p not in BENCH_RECIPES]
        if unknown or not self.precisions:
            raise ConfigError(f"precisions {unknown or '(none)'}: bench some of {', '.join(BENCH_RECIPES)}")
        bad_modes = [m for m in self.int8_modes if m not in INT8_MODES]
        if "int8" in self.precisions and (bad_modes or not self.int8_modes):
            raise ConfigError(f"int8 modes {bad_modes or '(none)'}: bench some of {', '.join(INT8_MODES)}")
        from edgeact.runtime.trt_targets import check_precision

        if "fp8" in self.precisions:
            check_precision(self.fp8_target, "fp8")

    def recipes(self) -> list[tuple[str, QuantizeOptions]]:
        """(bundle directory name, options) of every quantized bundle, in table order."""
        out: list[tuple[str, QuantizeOptions]] = []
        for precision in self.precisions:
            if precision == "int8":
                # SmoothQuant as `edgeact quantize --smoothquant` applies it: w8a8 and w8a8-dynamic (the latter's
                # down-projections); w8a16 keeps its weights alone.
                out += [(f"int8-{mode}", QuantizeOptions(
                    "int8", int8_mode=mode, smoothquant_alpha=self.smoothquant_alpha if mode in SMOOTHED else None))
                    for mode in self.int8_modes]
            elif precision == "fp8":
                out.append(("fp8", QuantizeOptions("fp8", target=self.fp8_target)))
            else:
                out.append(("int4", QuantizeOptions("int4", block_size=self.int4_block_size)))
        return out

    def used_fields(self) -> set[str]:
        """The per-precision options some recipe of these precisions uses (the others would be ignored)."""
        recipes = [quant for _, quant in self.recipes()]
        used = {"fp8_target"} if "fp8" in self.precisions else set()
        if "int8" in self.precisions:
            used.add("int8_modes")
            if any(mode in SMOOTHED for mode in self.int8_modes):
                used.add("smoothquant_alpha")
        if "int4" in self.precisions:
            used.add("int4_block_size")
        if any(quant.needs_calibration for quant in recipes):
            used.add("calibration_samples")
        return used


def bench_quantization(source: str | Path, work_dir: str | Path, options: BenchOptions = BenchOptions(),
                       on_step: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Rows (fp32 first) of the side-by-side report; bundles are left in work_dir for inspection."""
    from edgeact.export.bench_bundles import calibration_for
    from edgeact.export.quant_report import compare_bundles
    from edgeact.export.quantize import quantize_bundle

    step = on_step or (lambda name: None)
    recipes = options.recipes()
    work = Path(work_dir).absolute()
    work.mkdir(parents=True, exist_ok=True)
    fp32 = _fp32_bundle(Path(source).absolute(), work / "fp32", options)
    # TensorRT-targeted recipes (fp8 for Thor) quantize the portable decoder, which TensorRT parses.
    portable = None
    if any(quant.target for _, quant in recipes) and is_fused(load_bundle(fp32, verify_checksums=False).stage(io.DECODER_STAGE)):
        portable = _fp32_bundle(Path(source).absolute(), work / "fp32-portable", options, io.PORTABLE_ATTENTION)
    step("fp32 bundle")
    calib_dir = work / "calibration"
    if any(quant.needs_calibration for _, quant in recipes):      # reused only if it has the samples, seed and model
        calibration_for(fp32, calib_dir, options.calibration_samples, options.seed, options.threads, options.fresh)
    step("calibration set")
    outputs = []
    for name, quant in recipes:
        out = work / name
        quantize_bundle(portable if quant.target and portable else fp32, out, quant,
                        calib_dir if quant.needs_calibration else None, overwrite=True, report_frames=0,
                        seed=options.seed, threads=options.threads)
        outputs.append(out)
        step(f"{name} bundle")
    rows = compare_bundles(fp32, outputs, n_frames=options.report_frames, seed=options.seed, threads=options.threads)
    step("report")
    return rows


def _fp32_bundle(source: Path, out: Path, options: BenchOptions, attention: str = io.FUSED_ATTENTION) -> Path:
    """The source itself if it is a bundle; else the checkpoint exported to `out` with this form of the decoder
    (reused when it matches)."""
    from edgeact.export.bench_bundles import exported_from
    from edgeact.runtime.bundle import MANIFEST_NAME, load_bundle

    if (source / MANIFEST_NAME).is_file():
        bundle = load_bundle(source, verify_checksums=False)
        if any(s.precision != "fp32" for s in bundle.manifest.stages.values()):
            raise ConfigError(f"{source}: not an fp32 bundle; bench from the checkpoint or the bundle `edgeact export` wrote")
        return source
    config = source / "config.json"
    if not config.is_file():
        raise ConfigError(f"{source}: neither a bundle nor a checkpoint (no {MANIFEST_NAME} or config.json)")
    if not options.fresh and exported_from(out, source, attention):
        return out
    from edgeact.export.bundle_export import ExportOptions, export_bundle

    return export_bundle(source, out, ExportOptions(max_seq=options.max_seq, attention=attention), overwrite=True)
