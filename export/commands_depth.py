"""`edgeact train-depth-tokenizer` and `edgeact add-depth-tokenizer`; torch and mujoco are imported inside handlers only."""
from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path
from edgeact.runtime.cli_args import console as _console, positive_int as _positive_int, seed_value

# Literal copies of TrainOptions' defaults: importing it here would cost `edgeact --help` time.
DEFAULT_IMAGES, DEFAULT_STEPS, DEFAULT_SEED = 256, 400, 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train-depth-tokenizer", help="train the depth VQ-VAE (10x10 codes of 128) on simulated depth images",
        description="Render depth images of the simulated table scene (random block poses and arm poses) from the "
                    "robot camera, train a small VQ-VAE on the CPU, and save it (safetensors + config JSON with "
                    "the training report: reconstruction error in metres, codebook usage).",
    )
    p.add_argument("--out", type=Path, required=True, help="directory to write the tokenizer into (a new one)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it holds a depth tokenizer")
    p.add_argument("--images", type=_positive_int, default=DEFAULT_IMAGES,
                   help=f"training images to render (default {DEFAULT_IMAGES})")
    p.add_argument("--steps", type=_positive_int, default=DEFAULT_STEPS,
                   help=f"optimizer steps (default {DEFAULT_STEPS})")
    p.add_argument("--seed", type=seed_value, default=DEFAULT_SEED, help="scene randomization and training seed (default 0)")
    p.add_argument("--threads", type=_positive_int, default=1,
                   help="torch CPU threads (default 1: the model is small; more threads contend on a busy CPU)")
    p.set_defaults(handler=_train)

    p = subparsers.add_parser(
        "add-depth-tokenizer", help="write a new bundle: BUNDLE plus the depth tokenizer's encoder as a stage",
        description="Copy BUNDLE (checked, never modified) into NEW_BUNDLE with the tokenizer's encoder exported "
                    "as the 'depth_tokenizer' ONNX stage (depth_m (height, width) metres -> 100 codes), checked "
                    "against the PyTorch encoder on held-out simulated depth images. Policies with "
                    "forced_depth: sensor then encode the camera's depth instead of decoding 100 tokens.",
    )
    p.add_argument("bundle", type=Path, metavar="BUNDLE", help="source bundle directory (only read)")
    p.add_argument("--tokenizer", type=Path, required=True, help="directory written by train-depth-tokenizer")
    p.add_argument("--out", type=Path, required=True, metavar="NEW_BUNDLE", help="bundle directory to create")
    p.add_argument("--overwrite", action="store_true", help="replace NEW_BUNDLE if it is a bundle already")
    p.set_defaults(handler=_add)


def _train(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from edgeact.runtime.atomic_dir import occupied, partial_dir, publish, refuse_replacing
    from edgeact.export.train_depth_tokenizer import TrainOptions, train_and_save
    from edgeact.runtime.errors import ConfigError

    options = TrainOptions(images=args.images, steps=args.steps, seed=args.seed, threads=args.threads)
    out = Path(args.out)            # before any work; written aside, then renamed into place (never half written)
    if occupied(out) and not args.overwrite:
        raise ConfigError(f"--out {out}: already exists and is not empty; choose another --out, or pass --overwrite "
                          "to replace the depth tokenizer there")
    refuse_replacing(out, "a depth tokenizer", "--out")
    console = _console()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_dir(out)
    try:
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console, transient=True) as progress:
            task = progress.add_task("training", total=options.steps)
            report = train_and_save(tmp, options, on_step=lambda step, mse: progress.update(
                task, completed=step + 1, description=f"training (mse {mse:.4f})"))
        publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    table = Table(title=f"depth tokenizer -> {args.out}")
    table.add_column("measure")
    table.add_column("value")
    for name, value in (
        ("training images / steps", f"{report.images} / {report.steps}"),
        ("render / train time", f"{report.collect_seconds:.1f} s / {report.train_seconds:.1f} s"),
        ("held-out reconstruction error", f"{report.recon_mae_m * 100:.2f} cm (mean abs)"),
        ("constant-image baseline", f"{report.constant_mae_m * 100:.2f} cm (mean abs)"),
        ("codebook used", f"{report.codebook_used} / {report.codebook_size} (perplexity {report.perplexity:.1f})"),
        ("dead-code restarts", str(report.dead_code_restarts)),
    ):
        table.add_row(name, value)
    console.print(table)
    return 0


def _add(args: argparse.Namespace) -> int:
    from edgeact.export.depth_tokenizer_export import add_depth_tokenizer
    from edgeact.runtime.bundle import read_manifest

    console = _console()
    start = time.perf_counter()
    out = add_depth_tokenizer(args.bundle, args.tokenizer, args.out, overwrite=args.overwrite)
    manifest = read_manifest(out)
    row = next(r for r in manifest.verification.results if r["gate"] == "depth_tokenizer_codes")
    verdict = "agree" if row["passed"] else "DISAGREE"
    console.print(f"{out}: stage depth_tokenizer added in {time.perf_counter() - start:.1f} s; ONNX and PyTorch codes "
                  f"{verdict} on {row['agreement'] * 100:.2f}% of {row['images']} held-out images' codes "
                  f"(gate {row['min'] * 100:.0f}%); verification status {manifest.verification.status!r}")
    # Exit status: the saved verdict (passed or not_run: 0), of which the new row is one part.
    if not manifest.model.depth_codes:
        console.print(f"{out}: the bundle does not record which depth codes its model was trained on (a checkpoint "
                      "not trained by `edgeact train-reference`, or trained before it recorded them): the stage was not checked against them; forced "
                      "depth is right only if the model learned this tokenizer's codes", style="yellow",
                      highlight=False)
    inherited = [r["gate"] for r in manifest.verification.failing() if r is not row]
    if inherited:
        console.print(f"{out}: the source's verification failed at {', '.join(inherited)}, and so does this bundle's: "
                      "it is refused when loaded; verify the source against its checkpoint (`edgeact verify`) or "
                      "export it again, then add the stage to that", style="bold red", highlight=False)
    return 0 if manifest.verification.status in ("passed", "not_run") else 1
