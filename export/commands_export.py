"""`edgeact export CHECKPOINT --out BUNDLE` and `edgeact verify BUNDLE`; torch is imported inside handlers only."""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from edgeact.runtime import stage_io
from edgeact.runtime.bundle import UNVERIFIED_FIX_DEFAULT
from edgeact.runtime.cli_args import console as _console, positive_int as _positive_int

DEFAULT_FRAMES = 3   # literal copy of verify.DEFAULT_FRAMES: importing verify here would cost `edgeact --help` time


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="export a checkpoint to a bundle (vision, connector and decoder ONNX stages, weights, "
                       "tokenizer) and verify it",
        description="Trace the vision (ViT, run one crop at a time), connector (pooling + projector) and decoder "
                    "stages to ONNX (fp32), write them with the embedding table, "
                    "LM head, tokenizer, answer grammar and action statistics into a bundle (atomically), then "
                    "verify every stage against the PyTorch reference on held-out inputs and record the result.",
    )
    p.add_argument("checkpoint", type=Path, help="MolmoAct checkpoint directory")
    p.add_argument("--out", type=Path, required=True, help="bundle directory to create")
    p.add_argument("--max-seq", type=_positive_int, help="decoder positions, prompt + answer (default: the "
                   "config's max_position_embeddings); the runtime's KV cache holds this many")
    p.add_argument("--max-images", type=_positive_int, default=2, help="camera images per observation (default 2)")
    p.add_argument("--chunk", type=_positive_int, default=1, help="actions per answer (fine-tuned checkpoints: 8)")
    p.add_argument("--opset", type=int, help="ONNX opset (default 19)")
    p.add_argument("--attention", choices=stage_io.DECODER_ATTENTIONS, default=stage_io.FUSED_ATTENTION,
                   help="the decoder's attention: fused (default), onnxruntime's GroupQueryAttention updating the KV "
                        "cache in place, the fast form on a CPU; portable, standard ONNX ops, for TensorRT "
                        "(--target, build-engines) and onnxruntime's CUDA / TensorRT providers")
    p.add_argument("--external-data", action="store_true",
                   help="store every stage's weights in a .onnx.data file (default: only stages over 1 GiB)")
    p.add_argument("--name", default="", help="model name for the manifest (default: the checkpoint directory name)")
    p.add_argument("--overwrite", action="store_true", help="replace BUNDLE if it is a bundle already")
    p.add_argument("--no-verify", action="store_true", help="skip verification (the manifest says 'not_run')")
    _add_verify_options(p)
    p.set_defaults(handler=_export)

    p = subparsers.add_parser(
        "verify", help="compare every stage of a bundle with the PyTorch reference and record passed/failed",
        description="Run each stage with onnxruntime (CPU) and the PyTorch reference on held-out camera frames "
                    "and instructions: ViT patch features, connector image features, decoder hidden states and cache (prefill, single steps, "
                    "chunks), logits, and grammar-masked greedy token agreement for depth, trace and actions. "
                    "Gates depend on each stage's precision; the verdict is written into the manifest.",
    )
    p.add_argument("bundle", type=Path, metavar="BUNDLE", help="bundle directory")
    p.add_argument("--checkpoint", type=Path, help="reference checkpoint (default: the one recorded at export)")
    _add_verify_options(p)
    p.set_defaults(handler=_verify)


def _add_verify_options(p) -> None:
    p.add_argument("--frames", type=_positive_int, default=DEFAULT_FRAMES,
                   help=f"held-out observations to verify on (default {DEFAULT_FRAMES})")
    p.add_argument("--threads", type=_positive_int, help="CPU threads for torch and onnxruntime (default: theirs)")


def _progress(console):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=True)


def _export(args: argparse.Namespace) -> int:
    from edgeact.export.bundle_export import EXPORT_STEPS, ExportOptions, export_bundle

    options = ExportOptions(max_seq=args.max_seq, max_images=args.max_images, n_actions=args.chunk, opset=args.opset,
                            external_data=True if args.external_data else None, name=args.name,
                            attention=args.attention)
    _set_threads(args.threads)
    console = _console()
    start = time.perf_counter()
    reports = []
    with _progress(console) as progress:
        task = progress.add_task(EXPORT_STEPS[0], total=len(EXPORT_STEPS))

        def on_step(done: str) -> None:
            index = EXPORT_STEPS.index(done)
            progress.update(task, advance=1, description=EXPORT_STEPS[min(index + 1, len(EXPORT_STEPS) - 1)])

        def verify_staged(staged: Path) -> None:
            # The finished bundle, still in its temporary directory: the verdict is recorded before it is
            # published, and an existing bundle at --out stays in place until then.
            reports.append(_run_verification(console, staged, args.checkpoint, args, progress))

        out = export_bundle(args.checkpoint, args.out, options, overwrite=args.overwrite, on_step=on_step,
                            before_publish=None if args.no_verify else verify_staged)
    seconds = time.perf_counter() - start
    _print_bundle_summary(console, out, seconds)
    if reports:
        _print_report(console, reports[0])
        return 0 if reports[0].passed else 1
    console.print(f"verification not run (--no-verify); before using the bundle: edgeact verify {out} "
                  f"--checkpoint {args.checkpoint}", soft_wrap=True, highlight=False)
    return 0


def _verify(args: argparse.Namespace) -> int:
    _set_threads(args.threads)
    console = _console()
    report = _run_verification(console, args.bundle, args.checkpoint, args)
    _print_report(console, report)
    return 0 if report.passed else 1


def _set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def _run_verification(console, bundle: Path, checkpoint: Path | None, args: argparse.Namespace, progress=None):
    from edgeact.export.verify import verify_bundle

    if progress is None:
        with _progress(console) as progress:
            return _run_verification(console, bundle, checkpoint, args, progress)
    task = progress.add_task("verifying on held-out frames", total=args.frames)
    return verify_bundle(bundle, checkpoint, frames=args.frames, threads=args.threads,
                         on_frame=lambda done, total: progress.update(task, completed=done))


def _print_bundle_summary(console, out: Path, seconds: float) -> None:
    from rich.table import Table
    from rich.text import Text

    from edgeact.runtime.bundle import read_manifest

    m = read_manifest(out)
    table = Table(title=f"bundle {out} ({seconds:.1f} s)")
    for col in ("part", "precision", "files", "size", "shape / dim ranges (min/opt/max)"):
        table.add_column(col)
    for s in m.stages.values():
        ranges = ", ".join(f"{k} {r.min}/{r.opt}/{r.max}" for k, r in s.dim_ranges.items())
        size = sum(m.files[f].bytes for f in s.files())
        table.add_row(*map(Text, (f"stage {s.name}", s.precision, ", ".join(s.files()), _size(size), ranges)))
    for w in m.weights.values():
        table.add_row(*map(Text, (f"weight {w.name}", w.dtype, w.file, _size(m.files[w.file].bytes), str(list(w.shape)))))
    total = sum(f.bytes for f in m.files.values())
    table.add_row(*map(Text, ("total", "", f"{len(m.files)} files", _size(total), "")))
    console.print(table)


def _value(row: dict) -> str:
    v = row["value"]
    if v is None:
        return "nan"
    # A cosine near 1 reads better as its distance from 1.
    return f"1 - {1 - v:.1e}" if row["gate"].endswith(".cosine") and 0 < 1 - v < 1e-3 else f"{v:.6f}"


def _limit(row: dict) -> str:
    return "-" if row["limit"] is None else f"{row['limit']:g}"     # a kept row recorded without one


def _size(n_bytes: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n_bytes < 1024:
            return f"{n_bytes:.0f} {unit}" if unit == "B" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1024
    return f"{n_bytes:.2f} GiB"


def _print_report(console, report) -> None:
    from rich.table import Table
    from rich.text import Text

    table = Table(title=f"verification against {report.checkpoint}: {report.frames} held-out frames, {report.seconds:.1f} s")
    for col in ("gate", "stage", "precision", "value", "limit", "detail", "result"):
        table.add_column(col)
    for row in report.rows:
        value = _value(row)
        table.add_row(*map(Text, (row["gate"], row["stage"], row["precision"], value, _limit(row), row["detail"])),
                      Text("pass", style="green") if row["passed"] else Text("FAIL", style="bold red"))
    console.print(table)
    if report.passed:
        console.print(Text("verification passed; recorded in the manifest", style="green"))
    else:
        console.print(Text(failed_verification_text(report.failing()), style="bold red"))


GATES_NAMED = 8        # a failed verdict's message names this many gates, then counts the rest


def failed_verification_text(failing: list[dict], bundle_dir: str | Path | None = None) -> str:
    """What a failed verdict means, as `verify` and `quantize` say it: the gates that failed, and how to load the
    bundle anyway; with `bundle_dir` (no table printed above), where to see every gate."""
    more = len(failing) - GATES_NAMED
    gates = ", ".join(r["gate"] for r in failing[:GATES_NAMED]) + (f" and {more} more" if more > 0 else "")
    where = f" (`edgeact inspect {bundle_dir}` shows every gate)" if bundle_dir is not None else ""
    return (f"verification FAILED at {gates}; recorded in the manifest{where}, and the bundle is refused when "
            f"loaded: {UNVERIFIED_FIX_DEFAULT}")
