"""`edgeact quantize`, `edgeact calibrate` and `edgeact bench-quant`; onnxruntime and torch are imported inside handlers only."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from edgeact.runtime.cli_args import console as _console, positive_int as _positive_int, seed_value, writable_file

# Literal copies (quant_options imports nothing heavy, but `edgeact --help` should import nothing at all).
PRECISIONS = ("int8", "fp8", "int4")
INT8_MODES = ("w8a8", "w8a16", "w8a8-dynamic")
DOWN_PROJECTIONS = ("smoothquant", "w8a16")
TARGETS_HELP = "orin, orin-nx, orin-nano, thor, h100, h200, ada, ampere, a100"


def register(subparsers) -> None:
    _register_quantize(subparsers)
    _register_calibrate(subparsers)
    _register_bench(subparsers)


def _csv(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


# ------------------------------------------------------------------------------------ quantize
def _register_quantize(subparsers) -> None:
    p = subparsers.add_parser(
        "quantize", help="write a new bundle with stages quantized to int8, fp8 or int4 (the source is never modified)",
        description="Quantize a bundle's stages by a recipe into a new bundle: int8 w8a8-dynamic (int8 weights, "
                    "each token's activations scaled at run time, the MLP down-projections SmoothQuant-ed from "
                    "calibration ranges first; onnxruntime only, the default there), int8 w8a16 (weight-only "
                    "int8, no calibration: the default for TensorRT targets, as decoding is bandwidth-bound), "
                    "int8 w8a8 (per-channel weights, "
                    "calibrated activations, Q/DQ around linear layers, optional SmoothQuant), fp8 (E4M3 Q/DQ, "
                    "for SM >= 8.9: Ada, Hopper, Thor) or int4 (weight-only, block-wise). The new bundle's "
                    "manifest records the recipe, its options and a report against the source: size, agreement of "
                    "depth / trace / action tokens on held-out frames, action error in bins, CPU decode speed.")
    p.add_argument("bundle", type=Path, metavar="BUNDLE", help="fp32 bundle (`edgeact export` wrote it)")
    p.add_argument("--precision", choices=PRECISIONS, required=True)
    p.add_argument("--out", type=Path, required=True, help="new bundle directory")
    p.add_argument("--target", help=f"TensorRT target the bundle is for ({TARGETS_HELP}); refuses a precision "
                                    "it cannot run (fp8 on Orin); int4 and int8 w8a16 are written as Q/DQ for TensorRT targets")
    p.add_argument("--int8-mode", choices=INT8_MODES,
                   help="int8: w8a8-dynamic (per-token activation scales at run time; onnxruntime only, the "
                        "default without --target), w8a16 (weights only; the default for a --target) or w8a8 "
                        "(weights and calibrated activations; the default when --smoothquant, "
                        "--quantize-attention or more --op-types ask for it)")
    p.add_argument("--int8-format", choices=("auto", "nbits", "qdq"), default="auto",
                   help="int8 w8a16: nbits (onnxruntime MatMulNBits) or qdq (int8 DequantizeLinear, for TensorRT); "
                        "auto: by --target")
    p.add_argument("--down-projections", choices=DOWN_PROJECTIONS,
                   help="int8 w8a8-dynamic: the MLP down-projections as per-token int8 after SmoothQuant (smoothquant, "
                        "the default; --smoothquant sets its alpha, 0.5 unless given) or weight-only (w8a16: no "
                        "calibration)")
    p.add_argument("--calibration", type=Path, help="calibration set (`edgeact calibrate`); default: build 8 "
                                                    "synthetic-camera samples from BUNDLE on the fly (int8 w8a8, fp8, "
                                                    "w8a8-dynamic's SmoothQuant; the others refuse one)")
    p.add_argument("--stages", type=_csv, help="stages to quantize, comma-separated (default: vision,connector,"
                                               "decoder; int4: decoder)")
    p.add_argument("--op-types", type=_csv, default=("MatMul",),
                   help="int8 w8a8: op types to quantize (default MatMul: linear layers only; more wrecks "
                        "decoders); fp8 quantizes constant-weight MatMuls only")
    p.add_argument("--exclude-nodes", type=_csv, default=(), help="node names to keep in float, comma-separated")
    p.add_argument("--smoothquant", type=float, metavar="ALPHA",
                   help="int8: apply SmoothQuant with this alpha (0.5 usual; w8a8 without --int8-mode, the "
                        "down-projections' alpha with --int8-mode w8a8-dynamic)")
    p.add_argument("--per-tensor", action="store_true",
                   help="int8 w8a8, int8 w8a16 qdq and fp8: one weight scale per tensor, not per channel")
    p.add_argument("--quantize-attention", action="store_true",
                   help="int8 w8a8: also the attention's activation x activation products (fp8 quantizes "
                        "constant-weight MatMuls only)")
    p.add_argument("--block-size", type=int, default=128,
                   help="int4, int8 w8a16 nbits (and w8a8-dynamic's W8A16 layers): weights per scale (32, 64 or "
                        "128; default 128)")
    p.add_argument("--accuracy-level", type=int, help="MatMulNBits compute on the CPU: 0 fp32 ... 4 int8 "
                                                      "(default: 4 for int8 w8a16 and w8a8-dynamic's W8A16 "
                                                      "down-projections, 0 for int4)")
    p.add_argument("--int4-format", choices=("auto", "nbits", "qdq"), default="auto",
                   help="nbits: onnxruntime MatMulNBits; qdq: int4 DequantizeLinear for TensorRT (auto: by --target)")
    p.add_argument("--arrays-fp16", action="store_true", help="store the embedding and LM-head arrays as float16")
    p.add_argument("--backend", choices=("onnxruntime", "modelopt"), default="onnxruntime",
                   help="quantizer (modelopt: NVIDIA ModelOpt, if installed)")
    p.add_argument("--decode-steps", type=int, default=2, help="decoder calibration: single-token steps per sample")
    p.add_argument("--report-frames", type=int, default=4, help="held-out frames the report decodes (0: no report)")
    p.add_argument("--no-verify", action="store_true",
                   help="skip `edgeact verify` of the new bundle against the source checkpoint (its manifest then "
                        "says 'not_run'; verify it later with `edgeact verify OUT --checkpoint CKPT`)")
    p.add_argument("--checkpoint", type=Path, help="reference checkpoint to verify against (default: the one "
                                                   "BUNDLE's manifest records; refused before any work if missing)")
    p.add_argument("--seed", type=seed_value, default=0)
    p.add_argument("--threads", type=_positive_int, help="onnxruntime CPU threads (default: its own)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it is a bundle already")
    p.set_defaults(handler=_quantize)


def _quantize(args: argparse.Namespace) -> int:
    from edgeact.export.quant_options import QuantizeOptions
    from edgeact.export.quant_report import print_report
    from edgeact.export.quantize import QUANTIZE_STEPS, quantize_bundle

    options = QuantizeOptions(
        args.precision, target=args.target, stages=args.stages, op_types=args.op_types, exclude_nodes=args.exclude_nodes,
        smoothquant_alpha=args.smoothquant, per_channel=not args.per_tensor, quantize_attention=args.quantize_attention,
        block_size=args.block_size, accuracy_level=args.accuracy_level, int4_format=args.int4_format,
        arrays_dtype="float16" if args.arrays_fp16 else "float32", backend=args.backend, decode_steps=args.decode_steps,
        int8_mode=args.int8_mode, int8_format=args.int8_format, down_projections=args.down_projections)
    console = _console()
    with _progress(console) as progress:
        task = progress.add_task(f"quantize {args.precision}", total=len(QUANTIZE_STEPS))
        result = quantize_bundle(args.bundle, args.out, options, args.calibration, overwrite=args.overwrite,
                                 report_frames=args.report_frames, seed=args.seed, threads=args.threads,
                                 verify=not args.no_verify, checkpoint=args.checkpoint,
                                 on_step=lambda name: progress.advance(task))
    console.print(f"[bold]{result.out}[/bold]: {result.recipe}, stages "
                  + ", ".join(f"{n} ({notes.get('quantized_nodes', 0)} nodes)" for n, notes in result.stage_notes.items()))
    if result.report:
        print_report(result.report, console, title=f"{args.bundle.name} -> {args.out.name}")
    if result.verification == "failed":     # as `edgeact verify` says it: which gates, and how to load it anyway
        from rich.text import Text

        from edgeact.export.commands_export import failed_verification_text
        from edgeact.runtime.bundle import read_manifest

        console.print(Text(failed_verification_text(read_manifest(result.out).verification.failing(), result.out),
                           style="bold red"))
    elif result.verification is not None:
        console.print(f"verification: [bold]{result.verification}[/bold]")
    else:
        console.print(f"verification: [bold]not run[/bold] (--no-verify); before using the bundle: edgeact verify "
                      f"{result.out} --checkpoint CKPT", soft_wrap=True, highlight=False)
    return 1 if result.verification == "failed" else 0


def _progress(console):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=True)


# ----------------------------------------------------------------------------------- calibrate
def _register_calibrate(subparsers) -> None:
    p = subparsers.add_parser(
        "calibrate", help="build a quantization calibration set: camera frames, prompts and the fp32 model's answers",
        description="Preprocess frames from the synthetic camera or a RealSense recording as on the robot, prompt "
                    "each with an instruction, and answer it with the fp32 model (grammar-masked greedy decoding: "
                    "the bundle's ONNX stages, or the PyTorch reference for a checkpoint). `edgeact quantize "
                    "--calibration` reads the result.")
    p.add_argument("source", type=Path, metavar="BUNDLE", help="fp32 bundle (or a checkpoint directory)")
    p.add_argument("--out", type=Path, required=True, help="calibration set directory to create")
    p.add_argument("--samples", type=_positive_int, default=16, help="frames (default 16)")
    p.add_argument("--seed", type=seed_value, default=0)
    p.add_argument("--frames", default="synthetic", help="'synthetic' (default) or a RealSense recording (.db3/.bag)")
    p.add_argument("--instruction", action="append", help="instruction(s) to draw from (repeat; default: six "
                                                          "pick-and-place instructions)")
    p.add_argument("--width", type=_positive_int, default=320, help="synthetic camera width px (default 320)")
    p.add_argument("--height", type=_positive_int, default=240, help="synthetic camera height px (default 240)")
    p.add_argument("--threads", type=_positive_int)
    p.add_argument("--chunk", type=_positive_int, help="a checkpoint source: actions per answer, as the bundle to "
                                                       "quantize was exported with (its --chunk; default 1); a bundle "
                                                       "answers with its own")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(handler=_calibrate)


def _calibrate(args: argparse.Namespace) -> int:
    from rich.table import Table

    from edgeact.calibration.calibration_build import DEFAULT_INSTRUCTIONS, build_calibration_set

    console = _console()
    with _progress(console) as progress:
        task = progress.add_task("calibration samples", total=args.samples)
        calib = build_calibration_set(args.source, args.out, args.samples, args.seed, args.frames,
                                      instructions=tuple(args.instruction or DEFAULT_INSTRUCTIONS), width=args.width,
                                      height=args.height, threads=args.threads, overwrite=args.overwrite,
                                      on_sample=lambda i: progress.advance(task), n_actions=args.chunk)
    table = Table(title=f"calibration set {args.out}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    table.add_row("samples", str(len(calib)))
    table.add_row("frames", json.dumps(calib.frames_source))
    table.add_row("answered by", f"{calib.model.get('kind')} {calib.model.get('source')}")
    for name in ("prompt_ids", "answer_ids"):
        lengths = [len(getattr(s, name)) for s in calib.samples]
        table.add_row(name.replace("_ids", " tokens"), f"{min(lengths)}-{max(lengths)}")
    console.print(table)
    return 0


# ---------------------------------------------------------------------------------- bench-quant
def _register_bench(subparsers) -> None:
    p = subparsers.add_parser(
        "bench-quant", help="quantize a checkpoint or bundle to int8, fp8 and int4 and compare all with fp32",
        description="Export (or reuse) the fp32 bundle, build one calibration set, quantize to each precision "
                    "(fp8 for --fp8-target; Orin has no FP8) and print one table: size, agreement with fp32 "
                    "(depth / trace / action tokens), action error in bins, CPU decode tokens/s, ratios to fp32.")
    p.add_argument("source", type=Path, metavar="CHECKPOINT_OR_BUNDLE")
    p.add_argument("--work", type=Path, help="directory for the bundles (default: SOURCE-quant-bench beside SOURCE)")
    p.add_argument("--precisions", type=_csv, default=PRECISIONS, help="comma-separated (default int8,fp8,int4)")
    # The options below that belong to one precision default to None, so that one given for none of --precisions is
    # refused rather than ignored (BenchOptions' defaults fill the rest).
    p.add_argument("--fp8-target", help="target the fp8 bundle is for (SM >= 8.9; default thor)")
    p.add_argument("--int8-modes", type=_csv,
                   help="int8 modes to bench, a bundle and a row each (default w8a8,w8a16,w8a8-dynamic)")
    p.add_argument("--smoothquant", type=float, metavar="ALPHA",
                   help="int8 SmoothQuant alpha: w8a8 smoothed, and w8a8-dynamic's down-projections (default 0.5 "
                        "there, none for w8a8)")
    p.add_argument("--block-size", type=int, help="int4 block size (default 128)")
    p.add_argument("--samples", type=_positive_int, help="calibration samples (default 8)")
    p.add_argument("--frames", type=_positive_int, default=4, help="held-out frames for agreement (default 4)")
    p.add_argument("--seed", type=seed_value, default=0)
    p.add_argument("--threads", type=_positive_int)
    p.add_argument("--fresh", action="store_true", help="re-export and re-calibrate even if --work has them")
    p.add_argument("--json", type=Path, help="also write the rows as JSON here")
    p.set_defaults(handler=_bench)


def _bench(args: argparse.Namespace) -> int:
    from edgeact.export.quant_bench import BenchOptions, bench_quantization
    from edgeact.export.quant_report import print_report

    given = {"fp8_target": args.fp8_target, "int8_modes": args.int8_modes, "smoothquant_alpha": args.smoothquant,
             "int4_block_size": args.block_size, "calibration_samples": args.samples}
    options = BenchOptions(precisions=args.precisions, report_frames=args.frames, seed=args.seed, threads=args.threads,
                           fresh=args.fresh, **{k: v for k, v in given.items() if v is not None})
    unused = [flag for flag, key in (("--fp8-target", "fp8_target"), ("--int8-modes", "int8_modes"),
                                     ("--smoothquant", "smoothquant_alpha"), ("--block-size", "int4_block_size"),
                                     ("--samples", "calibration_samples"))
              if given[key] is not None and key not in options.used_fields()]
    if unused:
        from edgeact.runtime.errors import ConfigError

        raise ConfigError(f"{', '.join(unused)}: no bundle of --precisions {','.join(options.precisions)} uses "
                          f"{'it' if len(unused) == 1 else 'them'}; drop {'it' if len(unused) == 1 else 'them'}, or "
                          "bench the precision (or int8 mode) it is for")
    if args.json:       # before minutes of work: a bad path would lose every figure at the end
        writable_file(args.json, "--json")
    work = args.work or args.source.parent / f"{args.source.name}-quant-bench"
    console = _console()
    with _progress(console) as progress:
        task = progress.add_task("bench-quant", total=3 + len(options.recipes()))
        rows = bench_quantization(args.source, work, options, on_step=lambda name: progress.advance(task))
    print_report(rows, console, title=f"quantization of {args.source.name} (CPU, onnxruntime)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0
