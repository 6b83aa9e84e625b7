"""`edgeact quantize`: a new bundle whose stages are quantized by a recipe (int8, fp8, int4); the source bundle is only read.

The new bundle is the source copied file by file (checksums checked while copying), the chosen
stages replaced by their quantized graphs, and the manifest's `quantization` saying what was
done: recipe, every option, per-stage notes (Q/DQ format, nodes quantized, calibration) and
the report comparing it with the source (export/quant_report.py). Each quantized graph is
loaded and run in onnxruntime on the CPU before the bundle is published.

int8 has three modes: w8a8 (export/quant_int8.py: static Q/DQ on weights and calibrated
activations, SmoothQuant optional), w8a16 (export/quant_w8a16.py: weights only, no
calibration) and w8a8-dynamic (export/quant_dynamic.py: int8 weights, each token's activations
quantized with its own scale at run time; the MLP down-projections SmoothQuant-ed first, from a
calibration set's channel ranges; onnxruntime only).
QuantizeOptions._default_int8_mode says which is chosen when none is asked for, and why.
Recipe names: int8-qdq / int8-smoothquant-qdq (w8a8), int8-w8a16-nbits (onnxruntime's
MatMulNBits) / int8-w8a16-qdq (int8 DequantizeLinear + MatMul, for TensorRT targets),
int8-w8a8-dynamic.

Backends. onnxruntime.quantization (with this package's own FP8 writer) is the default: it is
a dependency already, runs on any CPU, and its Q/DQ placement -- int8/fp8 weights stored
quantized, one Q/DQ pair on each linear layer's input, nothing on GEMM outputs, norms,
residual adds or attention products -- is the explicit-quantization pattern TensorRT fuses
into INT8/FP8 GEMMs: TensorRT decides what runs in low precision from where the Q/DQ nodes
sit, not from a flag. NVIDIA ModelOpt (`--backend modelopt`, modelopt.onnx.quantization,
export/quant_modelopt.py) is an option where installed, not a dependency: 0.47.0 pins
onnxruntime-gpu 1.24, onnx 1.21 and cupy-cuda12x, which would replace this project's CPU
onnxruntime 1.32 and onnx 1.23. Tried in a separate environment with those swapped back for
the CPU onnxruntime 1.32: int8, fp8 and int4 (rtn_dq) all run on the CPU with
calibration_eps=['cpu'] and load at onnxruntime's default optimization level; it also puts
Q/DQ on the attention products (TensorRT's fused-attention rules), keeps int8/fp8 weights
in float behind a Q->DQ pair (TensorRT folds them at build; the ONNX file grows), and was
reported to write wrong int4 AWQ block scales for transposed Gemm weights (ours are MatMul).
"""
from __future__ import annotations

import dataclasses
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from edgeact.calibration.calibration_set import CalibrationError, CalibrationSet, config_meaning_sha256
from edgeact.export.quant_options import QuantizeOptions
from edgeact.runtime import stage_io
from edgeact.runtime.bundle import Bundle, load_bundle
from edgeact.runtime.errors import BundleError, ConfigError

DEFAULT_CALIBRATION_SAMPLES = 8
QUANTIZE_STEPS = ("calibration", "quantize stages", "check in onnxruntime", "report", "verify and publish bundle")
# Why a source bundle is refused, and what to do: quantize has no option to start from a failed bundle.
SOURCE_UNVERIFIED_FIX = ("quantize starts only from a bundle that passed (or has not run) verification: re-export "
                         "the source (`edgeact export CKPT --out SOURCE --overwrite`), or re-verify it against the "
                         "checkpoint it came from (`edgeact verify SOURCE --checkpoint CKPT`)")


def _recipes() -> dict[str, Callable[..., dict[str, Any]]]:
    """Recipe by precision (int8: by mode too): (src, dst, feeds, options, work_dir, threads) -> stage notes."""
    from edgeact.export.quant_dynamic import quantize_w8a8_dynamic
    from edgeact.export.quant_fp8 import quantize_fp8
    from edgeact.export.quant_int4 import quantize_int4
    from edgeact.export.quant_int8 import quantize_int8
    from edgeact.export.quant_w8a16 import quantize_w8a16

    return {"int8": quantize_int8, "int8-w8a16": quantize_w8a16, "int8-w8a8-dynamic": quantize_w8a8_dynamic,
            "fp8": quantize_fp8, "int4": quantize_int4}


def _recipe_key(options: QuantizeOptions) -> str:
    if options.precision == "int8" and options.int8_mode in ("w8a16", "w8a8-dynamic"):
        return f"int8-{options.int8_mode}"
    return options.precision


def recipe_name(options: QuantizeOptions) -> str:
    if options.backend == "modelopt":
        return f"modelopt-{options.precision}"
    if options.precision == "int8":
        if options.int8_mode == "w8a16":
            return f"int8-w8a16-{options.resolved_int8_format()}"
        if options.int8_mode == "w8a8-dynamic":
            return "int8-w8a8-dynamic"
        return "int8-smoothquant-qdq" if options.smoothquant_alpha is not None else "int8-qdq"
    if options.precision == "fp8":
        return "fp8-e4m3-qdq"
    return f"int4-rtn-{options.resolved_int4_format()}"


@dataclass(frozen=True)
class QuantizeResult:
    out: Path
    recipe: str
    stage_notes: dict[str, dict[str, Any]]
    report: list[dict[str, Any]]
    verification: str | None = None     # "passed" / "failed" when verified against the checkpoint, else None


def quantize_bundle(src: str | Path, out: str | Path, options: QuantizeOptions,
                    calibration: str | Path | CalibrationSet | None = None, *, overwrite: bool = False,
                    report_frames: int = 4, seed: int = 0, threads: int | None = None, verify: bool = False,
                    checkpoint: str | Path | None = None,
                    on_step: Callable[[str], None] | None = None) -> QuantizeResult:
    """Quantize `options.stages` of bundle `src` into a new bundle at `out` (atomic); returns what was done.

    calibration: a calibration set (or its directory); None builds DEFAULT_CALIBRATION_SAMPLES
    synthetic-camera samples answered by `src` itself (recipes that measure no activation ranges, int4, int8
    w8a16 and w8a8-dynamic with W8A16 down-projections, need none and refuse one given; the default w8a8-dynamic
    reads its down-projections' channel ranges from it). report_frames: held-out frames the report decodes with
    both bundles (0: no report). verify: run `edgeact verify`'s comparison with the reference checkpoint
    (`checkpoint`, default the one the source's manifest records; refused before any work if it is not
    there) and record the verdict. Report and verdict are recorded before the bundle is published, so an
    existing bundle at `out` (overwrite) is replaced only by a finished, judged one.
    """
    from edgeact.export.bundle_writer import BundleWriter, copy_bundle, refuse_out_in_source, update_manifest
    from edgeact.export.quant_decode import OrtBundle
    from edgeact.export.quant_report import compare_bundles
    from edgeact.export.verify import unmeasured_rows

    step = on_step or (lambda name: None)
    refuse_out_in_source(src, out)
    src, out = Path(src).absolute(), Path(out).absolute()
    if calibration is not None and (why := _no_calibration_why(options)):
        raise ConfigError(f"--calibration: {recipe_name(options)} {why}, so it reads no calibration set; drop it")
    if checkpoint is not None and not verify:
        raise ConfigError(f"--checkpoint {checkpoint}: the reference checkpoint is read only to verify the quantized "
                          "bundle, and verification is off (--no-verify): drop one of them")
    if options.backend == "modelopt":
        from edgeact.export.quant_modelopt import require_modelopt

        require_modelopt()                                   # before any long work
    source = load_bundle(src, unverified_fix=SOURCE_UNVERIFIED_FIX)
    _check_source(source, options)
    _check_exclude_nodes(source, options)
    reference = _reference_checkpoint(source, checkpoint, out) if verify else None   # before any long work
    BundleWriter(out, overwrite=overwrite)                  # refuse an existing --out before the long work
    fp32 = OrtBundle(source, threads=threads)
    calib, calib_info = _calibration(source, calibration, options, seed, threads)
    step(QUANTIZE_STEPS[0])

    stage_notes: dict[str, dict[str, Any]] = {}
    arrays = [n for n in source.manifest.weights if options.arrays_dtype == "float16"]
    rows: list[dict[str, Any]] = []
    verdict: list[str] = []

    def report_and_verify(staged: Path) -> None:
        """On the finished bundle in its temporary directory: nothing at `out` is replaced before this is done."""
        if report_frames > 0:
            rows.extend(compare_bundles(src, [staged], n_frames=report_frames, seed=seed, threads=threads))
            for row in rows:
                if row.get("bundle") == str(staged):
                    row["bundle"] = str(out)                # where it is published

            def set_report(m):
                m.quantization = dataclasses.replace(m.quantization, report=rows)

            update_manifest(staged, set_report)
        step(QUANTIZE_STEPS[3])
        if reference is not None:
            from edgeact.export.verify import verify_bundle

            verdict.append(verify_bundle(staged, reference, threads=threads).status)

    out.parent.mkdir(parents=True, exist_ok=True)   # the scratch space sits beside the new bundle
    # The scratch space goes first (before report_and_verify runs as the writer commits).
    with BundleWriter(out, overwrite=overwrite, before_publish=report_and_verify) as writer, \
            tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.quant-") as scratch:
        manifest = copy_bundle(src, writer, skip_stages=options.stages, skip_weights=arrays)
        # Rows of stages copied unchanged that `edgeact verify` cannot measure (the depth tokenizer's) still hold.
        writer.set_verification("not_run", {}, unmeasured_rows(manifest))
        for name in options.stages:
            stage_notes[name] = _quantize_stage(source, fp32, calib, name, options, Path(scratch) / name, writer,
                                                manifest.stages[name], seed, threads)
        step(QUANTIZE_STEPS[1])
        step(QUANTIZE_STEPS[2])
        for name in arrays:
            writer.add_array(name, source.weight(name).astype("float16"), rel=manifest.weights[name].file)
        recipe = recipe_name(options)
        writer.set_quantization(recipe, {**options.to_dict(), "calibration": calib_info, "stages": stage_notes})
        del fp32, calib          # the source's sessions are not needed by the report and verification
    step(QUANTIZE_STEPS[4])
    return QuantizeResult(out, recipe, stage_notes, rows, verdict[0] if verdict else None)


def _reference_checkpoint(source: Bundle, checkpoint: str | Path | None, out: Path) -> Path:
    """The checkpoint to verify the new bundle against; refused before any work, naming both ways on, if it is
    not here: a bundle must never come out unverified without the user knowing."""
    from edgeact.export.verify import reference_checkpoint

    later = f"or pass --no-verify, then `edgeact verify {out} --checkpoint CKPT` before using it"
    recorded = source.manifest.model.source_checkpoint
    if checkpoint is None and not (recorded and (Path(recorded) / "config.json").is_file()):
        raise BundleError(f"the reference checkpoint {recorded or '(none)'} recorded in {source.root} is not here, "
                          f"so the quantized bundle cannot be verified: pass --checkpoint CKPT (the checkpoint "
                          f"{source.root.name} was exported from), {later}")
    try:
        return reference_checkpoint(source, checkpoint)
    except BundleError as exc:
        raise BundleError(f"cannot verify the quantized bundle: {exc}; {later}") from None


def _check_source(source: Bundle, options: QuantizeOptions) -> None:
    if options.target is not None or options.backend == "modelopt":
        from edgeact.runtime.kv_cache import require_portable

        require_portable(source.stage(stage_io.DECODER_STAGE),
                         f"TensorRT ({options.target})" if options.target else "TensorRT Model Optimizer")
    for name in options.stages:
        spec = source.stage(name)
        if spec.precision not in ("fp32", "fp16", "bf16"):
            raise BundleError(f"{source.root}: stage {name!r} is already {spec.precision}; quantize from the fp32 "
                              f"bundle `edgeact export` wrote (quantization is not stacked)")
    done = source.manifest.quantization
    if done is not None:
        # One record per bundle: a second run's would replace the first's recipe, options and calibration.
        quantized = sorted(n for n, spec in source.manifest.stages.items()
                           if spec.precision not in ("fp32", "fp16", "bf16"))
        raise BundleError(f"{source.root}: already quantized (recipe {done.recipe!r}, stages {quantized}), and "
                          "quantizing it again would replace that record: quantize all the stages in one run "
                          "(--stages) from the fp32 bundle `edgeact export` wrote (quantization is not stacked)")


def _check_exclude_nodes(source: Bundle, options: QuantizeOptions) -> None:
    """Refuse exclude_nodes names that no quantized stage has: a typo would quantize the layer meant to stay float."""
    if not options.exclude_nodes:
        return
    import difflib

    import onnx

    names = sorted({n.name for stage in options.stages
                    for n in onnx.load(str(source.stage_path(stage)), load_external_data=False).graph.node})
    unknown = [x for x in options.exclude_nodes if x not in set(names)]
    if unknown:
        closest = "; ".join(f"{x!r}: " + (", ".join(map(repr, difflib.get_close_matches(x, names, n=3))) or "none near")
                            for x in unknown)
        raise ConfigError(f"exclude nodes {unknown} are not nodes of the stages quantized "
                          f"({', '.join(options.stages)}); closest node names: {closest}; give the ONNX node names "
                          "exactly (a leading '/' included)")


def _no_calibration_why(options: QuantizeOptions) -> str | None:
    """Why the recipe measures no activation statistics; None if it does."""
    if options.needs_calibration or options.backend != "onnxruntime":
        return None
    if options.int8_mode == "w8a8-dynamic":
        return "scales activations at run time, and no down-projection is SmoothQuant-ed here"
    return "is weight-only"


def _calibration(source: Bundle, calibration, options: QuantizeOptions, seed: int, threads: int | None
                 ) -> tuple[CalibrationSet | None, dict[str, Any]]:
    if why := _no_calibration_why(options):
        what = {"int4": "int4 RTN", "int8": f"int8 {options.int8_mode}"}[options.precision]
        return None, {"used": False, "why": f"{what} {why}: no activation statistics"}
    if calibration is None:
        from edgeact.calibration.calibration_build import build_calibration_set

        calib = build_calibration_set(source.root, None, DEFAULT_CALIBRATION_SAMPLES, seed, threads=threads)
        where = f"built on the fly: {DEFAULT_CALIBRATION_SAMPLES} synthetic-camera samples, seed {seed}"
    else:
        calib = calibration if isinstance(calibration, CalibrationSet) else CalibrationSet.load(calibration)
        where = str(Path(calibration).absolute()) if not isinstance(calibration, CalibrationSet) else "in memory"
    cfg = source.config
    try:
        calib.check_model(source.manifest.model.source_config_sha256, cfg.vit_config.patch_dim,
                          source.weight("embedding").shape[0], lambda kind: _weights_sha256(source, kind),
                          model_weights_sha256=source.manifest.model.source_weights_sha256,
                          n_actions=int(source.manifest.grammar.get("n_actions", 1)),
                          config_meaning=config_meaning_sha256(cfg))
    except CalibrationError as exc:
        raise CalibrationError(f"{where}: {exc}") from None
    return calib, {"used": True, "source": where, "samples": len(calib), "seed": calib.seed,
                   "frames": calib.frames_source, "answered_by": calib.model, "decode_steps": options.decode_steps}


def _weights_sha256(source: Bundle, kind: str) -> str:
    """The source's weights digest as a calibration set answered by a `kind` source records it: the bundle's own, or
    its source checkpoint's if that is here with the config it was exported from ('' otherwise)."""
    from edgeact.calibration.calibration_set import weights_sha256
    from edgeact.export.verify import config_matches

    if kind == "bundle":
        return weights_sha256(kind, source.root)
    model = source.manifest.model
    if kind == "checkpoint" and model.source_weights_sha256:
        return model.source_weights_sha256      # what export hashed, not what the path holds now (retrained, moved)
    config = Path(model.source_checkpoint) / "config.json" if model.source_checkpoint else None
    if kind != "checkpoint" or config is None or not config.is_file():
        return ""
    return weights_sha256(kind, config.parent) if config_matches(config, model) else ""


def _quantize_stage(source: Bundle, fp32, calib, name: str, options: QuantizeOptions, work: Path, writer,
                    spec, seed: int, threads: int | None) -> dict[str, Any]:
    import onnx

    from edgeact.export.quant_feeds import stage_feeds

    local = _copy_stage(source.stage_path(name), work, tuple(source.path(e) for e in spec.external_data))
    feeds = stage_feeds(fp32, calib, name, options.decode_steps, seed) if calib is not None else (lambda: iter(()))
    dst = work / "quantized.onnx"
    if options.backend == "modelopt":
        from edgeact.export.quant_modelopt import quantize_modelopt

        notes = quantize_modelopt(local, dst, feeds, options, work, threads)
    else:
        notes = _recipes()[_recipe_key(options)](local, dst, feeds, options, work, threads)
    _check_runs(dst, name, feeds, calib is not None)
    proto = onnx.load(str(dst))
    big = sum(len(t.raw_data) for t in proto.graph.initializer) > (1 << 30)
    writer.add_onnx(name, proto, precision=options.precision, dim_ranges=spec.dim_ranges, profiles=spec.profiles,
                    inputs=spec.inputs, outputs=spec.outputs, external_data=bool(spec.external_data) or big, doc=spec.doc)
    return notes


def _copy_stage(src: Path, dst_dir: Path, external: tuple[Path, ...] = ()) -> Path:
    """A private copy of a source stage (and its external data) to quantize: the source bundle is only read."""
    dst_dir.mkdir(parents=True, exist_ok=True)
    for path in (src, *external):
        shutil.copyfile(path, dst_dir / path.name)
    return dst_dir / src.name


def _check_runs(path: Path, stage: str, feeds, have_feeds: bool) -> None:
    """Load and run the quantized graph on the CPU (at onnxruntime's default graph optimizations, as the runtime does)."""
    from edgeact.export.quant_decode import make_session

    try:
        session = make_session(path, threads=1)
        if have_feeds:
            names = {i.name for i in session.get_inputs()}
            session.run(None, {k: v for k, v in next(feeds()).items() if k in names})
    except Exception as exc:  # onnxruntime raises its own Fail / InvalidGraph types
        raise BundleError(f"the quantized {stage} stage does not run in onnxruntime on the CPU "
                          f"({str(exc).splitlines()[0][:300]}); try another recipe or --exclude-nodes for the "
                          "failing nodes") from None
