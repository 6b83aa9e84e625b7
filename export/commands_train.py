"""`edgeact train-reference`: train the reference ARM on simulated expert demos (optionally recording them first)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from edgeact.runtime.cli_args import positive_int as _positive_int, seed_value

# Literal copies of TrainOptions' defaults: importing it here would pull torch into `edgeact --help`.
DEFAULT_STEPS, DEFAULT_BATCH, DEFAULT_LR, DEFAULT_SIZE = 2400, 8, 1.5e-3, "reference"
# Pointing samples and the grounding loss are off by default: tried (README, "The reference task and its
# evaluation"), they taught pointing but not a better closed loop.
DEFAULT_POINTING_BATCH, DEFAULT_GROUNDING_WEIGHT = 0, 0.0
LOSS_PLOT = "training_loss.png"
# The recording --generate-demos makes: a sample every 2 actions, executed with noise (see ExpertConfig). Siblings
# (DemoConfig.siblings 2) and traces to the episode's end (trace_horizon_actions 0) were tried and did not help:
# README, "The reference task and its evaluation".
DEMO_STRIDE, DEMO_EXECUTION_NOISE = 2, 0.25
# --generate-scenes: episode i of the first-chunk set is seeded SCENE_SEED_OFFSET + --seed + i, away from the expert
# episodes' seeds (--seed + i) and from `edgeact eval`'s (1 000 000 + i by default; the README's sets up to 4 000 049).
SCENE_SEED_OFFSET = 5_000_000


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train-reference", help="train the small reference ARM (MolmoAct architecture) on the simulated task's demos",
        description="Train a MolmoAct-architecture model of a few million parameters on the CPU (or a GPU: "
                    "--device cuda) to emit the full "
                    "answer (100 depth codes, the end-effector trace, an 8-action chunk) for the simulated "
                    "reference task, and save it as a MolmoAct checkpoint with the demos' action statistics "
                    "(norm_stats key 'edgeact_sim_reference'). With --generate-demos N the expert demonstrations "
                    "are recorded into --demos first (or reused when that directory already holds exactly that "
                    "recording), so one command is the whole recipe.",
    )
    p.add_argument("--demos", type=Path, required=True, nargs="+", metavar="DIR",
                   help="demonstration sets (edgeact sim-demos --out DIR), trained on together; the first's action "
                        "statistics are the model's (e.g. the expert's set, then a DAgger set of sim-demos --policy)")
    p.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    p.add_argument("--generate-demos", type=_positive_int, metavar="N",
                   help="record N expert episodes into --demos first (seeded by --seed)")
    p.add_argument("--generate-scenes", type=_positive_int, metavar="N",
                   help="record N episodes' first chunks (sim-demos --first-chunk: the frame, trace and chunk an "
                        "episode starts with, every scene kept) into the second --demos directory first, seeded "
                        f"from {SCENE_SEED_OFFSET} + --seed (or reuse that recording)")
    p.add_argument("--demo-workers", type=_positive_int, default=1, metavar="N",
                   help="with --generate-demos / --generate-scenes: simulator processes recording the episodes (the "
                        "same set as one; default 1)")
    p.add_argument("--steps", type=_positive_int, default=DEFAULT_STEPS, help=f"optimizer steps (default {DEFAULT_STEPS})")
    p.add_argument("--batch-size", type=_positive_int, default=DEFAULT_BATCH, help=f"default {DEFAULT_BATCH}")
    p.add_argument("--lr", type=float, default=DEFAULT_LR, help=f"peak learning rate (default {DEFAULT_LR})")
    p.add_argument("--seed", type=seed_value, default=0, help="weights, batch order and held-out split (default 0)")
    p.add_argument("--size", default=DEFAULT_SIZE, help=f"synthetic size of the architecture (default {DEFAULT_SIZE})")
    p.add_argument("--variant", default="D", choices=("D", "O"), help="MolmoAct-7B-D or -O architecture (default D)")
    p.add_argument("--depth-tokenizer", type=Path, metavar="DIR",
                   help="depth VQ-VAE (edgeact train-depth-tokenizer) for the depth codes; default: the pooled-depth "
                        "stand-in (see export/train_reference_data.py)")
    # Measured on a shared 2-core machine: two threads spin-wait against other processes and ran a step
    # 3-5x slower than one; on an idle machine --threads 2 gains at most 2x.
    p.add_argument("--threads", type=_positive_int, default=1,
                   help="torch CPU threads (default 1: robust on a busy machine; try 2 on an idle one)")
    p.add_argument("--compile", action="store_true",
                   help="compile the model with torch.compile for training: 2x faster steps after ~80 s of "
                        "compilation, but not bit-identical to the eager run that made the committed reference ARM")
    p.add_argument("--pointing-batch", type=int, default=DEFAULT_POINTING_BATCH, metavar="N",
                   help="pointing samples per step besides the batch ('point to the red block' -> its place in the "
                        f"image): a grounding pre-task (default {DEFAULT_POINTING_BATCH}; 0: none)")
    p.add_argument("--grounding-weight", type=float, default=DEFAULT_GROUNDING_WEIGHT, metavar="W",
                   help="weight of the dense grounding loss on the image tokens (which block each shows, and "
                        "where): on the pointing samples' images with --pointing-batch, else on the answer batch's "
                        f"(default {DEFAULT_GROUNDING_WEIGHT}; 0: off)")
    p.add_argument("--pointing-first", type=int, default=0, metavar="N",
                   help="train the first N steps on the pointing samples alone, then the full answer: a grounding "
                        "curriculum (needs --pointing-batch; default 0: off)")
    p.add_argument("--trace-batch", type=int, default=0, metavar="N",
                   help="trace-only samples per step besides the batch ('trajectory to {instruction}' -> the trace "
                        "alone), as in MolmoAct's training mix (default 0: none)")
    p.add_argument("--action-sigma", type=float, default=0.0, metavar="BINS",
                   help="soft targets for the action tokens: a Gaussian of this width in bins around the true bin "
                        "(default 0: the one bin)")
    p.add_argument("--connector-init", choices=("variance", "torch"), default="torch",
                   help="the connector's linear layers from PyTorch's default init (default), which starts the image "
                        "features ~10x below the token embeddings, or from N(0, 1/fan_in), which keeps their scale")
    p.add_argument("--feature-decay", type=float, default=0.0, metavar="W",
                   help="add W x the mean square of the image features to the loss: the decoder reads them through "
                        "RMSNorm, so unchecked they grow with every step (default 0: off; 0.01 holds them near the "
                        "token embeddings' scale)")
    p.add_argument("--depth-input-noise", type=float, default=0.0, metavar="P",
                   help="replace each depth code the model is fed in the answer by a random one with probability P "
                        "(the labels stay true), so the trace cannot be read off the depth codes alone (default 0)")
    p.add_argument("--trace-input-noise", type=float, default=0.0, metavar="P",
                   help="replace each trace digit the model is fed in the answer by a random digit with probability "
                        "P (the labels stay true), so later trace points cannot be drawn on from the earlier ones "
                        "alone (default 0)")
    p.add_argument("--colour-swap", type=float, default=0.0, metavar="P",
                   help="show each answer sample, with probability P, with its blocks' colours exchanged in the frame "
                        "and the instruction alike (the answer unchanged): every layout in every colour assignment "
                        "(default 0: off)")
    p.add_argument("--target-probe", type=float, default=0.0, metavar="W",
                   help="add W x a probe loss: at each trace and action position of the answer, a linear head (not "
                        "saved) reads where the named block is in the image from the decoder's hidden state "
                        "(default 0: off)")
    p.add_argument("--device", default="cpu", metavar="DEVICE",
                   help="where the steps run: cpu (default, the recipe) or cuda / cuda:N on a machine with an NVIDIA "
                        "GPU (batches encoded on the CPU by --loader-workers, bfloat16 matrix products)")
    p.add_argument("--loader-workers", type=int, default=0, metavar="N",
                   help="processes encoding the batches ahead of the steps (default 0: between steps, as the "
                        "recipe; a GPU needs several to stay busy); the same batches in the same order")
    p.add_argument("--init", type=Path, metavar="CKPT",
                   help="warm start from this checkpoint (same --size, --variant and first --demos set), e.g. the "
                        "policy whose states a DAgger set (sim-demos --policy) recorded")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it holds a checkpoint")
    p.set_defaults(handler=_train)


def _record(demos: Path, episodes: int, seed: int, console, workers: int = 1, first_chunk: bool = False) -> None:
    """Record the demos (first_chunk: each episode's first chunk only), or reuse a finished recording of the same
    episodes, seed and settings."""
    from dataclasses import asdict

    from rich.progress import Progress

    from edgeact.drivers.sim.demos import FORMAT, MANIFEST, DemoConfig, record_demos
    from edgeact.runtime.errors import ConfigError

    config = DemoConfig(stride_actions=DEMO_STRIDE, execution_noise=DEMO_EXECUTION_NOISE,
                        first_chunk_only=first_chunk)
    manifest_path = demos / MANIFEST
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        # A recording made before a DemoConfig field existed did what that field's default does.
        recorded = {**asdict(DemoConfig()), **(manifest.get("demo_config") or {})}
        if (manifest.get("episodes_attempted") == episodes and manifest.get("seed") == seed
                and recorded == asdict(config) and manifest.get("format") == FORMAT):
            console.print(f"reusing the {manifest['samples']} samples already recorded in {demos}")
            return
        raise ConfigError(f"{demos} holds another recording ({manifest.get('episodes_attempted')} episodes from seed "
                          f"{manifest.get('seed')}, {manifest.get('demo_config')}, format {manifest.get('format')}), "
                          f"not {episodes} from {seed} with {asdict(config)}, format {FORMAT}; give another --demos "
                          "or delete it")
    with Progress(transient=True, console=console) as bar:
        task = bar.add_task("first chunks" if first_chunk else "expert episodes", total=episodes)
        summary = record_demos(demos, episodes, seed, config,
                               progress=lambda done, total: bar.update(task, completed=done), workers=workers)
    kept = "episodes' first chunks" if first_chunk else "successful episodes"
    console.print(f"recorded {summary.samples} samples from {summary.episodes} {kept} of {episodes} "
                  f"in {summary.seconds:.0f} s -> {demos}")


def _train(args: argparse.Namespace) -> int:
    import torch
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    from rich.table import Table

    from edgeact.runtime.atomic_dir import occupied, refuse_replacing
    from edgeact.export.checkpoint import CONFIG_FILE
    from edgeact.export.train_reference import (TrainOptions, check_init_depth_codes, depth_codes_identity,
                                                distinct_demos_dirs, train_reference, training_device)
    from edgeact.export.train_reference_data import pooled_depth_codes, vqvae_depth_codes_fn
    from edgeact.runtime.errors import ConfigError

    console = Console(highlight=False)
    torch.set_num_threads(args.threads)
    options = TrainOptions(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed, size=args.size,
                           variant=args.variant, compile=args.compile, pointing_batch=args.pointing_batch,
                           grounding_weight=args.grounding_weight, pointing_first_steps=args.pointing_first,
                           trace_batch=args.trace_batch, action_sigma=args.action_sigma,
                           connector_init=args.connector_init, feature_decay=args.feature_decay,
                           depth_input_noise=args.depth_input_noise, target_probe_weight=args.target_probe,
                           trace_input_noise=args.trace_input_noise, colour_swap=args.colour_swap,
                           device=args.device,
                           loader_workers=args.loader_workers, init=str(args.init) if args.init else None)
    training_device(options)        # before any recording: a missing GPU or checkpoint is said at once
    out = Path(args.out)            # before any work: the checkpoint is written only after the last step
    if occupied(out) and not args.overwrite:
        raise ConfigError(f"--out {out}: already exists and is not empty; choose another --out, or pass --overwrite "
                          "to replace the checkpoint there")
    given = [d for d in args.demos if Path(d).resolve() == out.resolve()]
    if given:
        raise ConfigError(f"--out {out} is a --demos set this training reads; give the checkpoint another --out")
    if args.init is not None and Path(args.init).resolve() == out.resolve():
        raise ConfigError(f"--out {out} is the --init checkpoint this training starts from; give the new checkpoint "
                          "another --out")
    refuse_replacing(out, "a checkpoint", "--out")
    if options.init is not None and not (Path(options.init) / CONFIG_FILE).is_file():
        raise ConfigError(f"--init {options.init}: no checkpoint there ({CONFIG_FILE} missing); give a directory "
                          "that `edgeact train-reference --out` wrote")
    if args.generate_scenes and len(args.demos) != 2:
        raise ConfigError(f"--generate-scenes records into the second of two --demos directories (the expert's "
                          f"episodes first), got {len(args.demos)}")
    if args.generate_demos and len(args.demos) != 1 and not args.generate_scenes:
        raise ConfigError(f"--generate-demos records into one --demos directory, got {len(args.demos)}")
    distinct_demos_dirs(args.demos)
    # Before any recording (minutes): the depth tokenizer loads, the --init checkpoint was trained on its codes,
    # and the expert's set that --generate-scenes adds to is there.
    depth_fn = vqvae_depth_codes_fn(args.depth_tokenizer) if args.depth_tokenizer else pooled_depth_codes
    if options.init is not None:
        check_init_depth_codes(options.init, depth_codes_identity(depth_fn), warn=False)   # prepare() warns
    if args.generate_scenes and not args.generate_demos:
        from edgeact.drivers.sim.demos import load_demos

        load_demos(args.demos[0])
    if args.generate_demos:
        _record(args.demos[0], args.generate_demos, args.seed, console, args.demo_workers)
    if args.generate_scenes:
        _record(args.demos[1], args.generate_scenes, SCENE_SEED_OFFSET + args.seed, console, args.demo_workers,
                first_chunk=True)
    recent: list[float] = []

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=console, transient=True) as progress:
        task = progress.add_task("training", total=options.steps)

        def on_step(step: int, loss: float) -> None:
            recent.append(loss)
            shown = sum(recent[-20:]) / len(recent[-20:])
            progress.update(task, completed=step + 1, description=f"training (loss {shown:.3f})")

        def plot(folder: Path, report) -> None:       # into the checkpoint before it is published
            _plot_losses(report.losses, folder / LOSS_PLOT)

        report = train_reference(args.demos, args.out, options, depth_fn, overwrite=args.overwrite, on_step=on_step,
                                 extra_files=plot)
    table = Table(title=f"reference ARM -> {report.out_dir}")
    table.add_column("measure")
    table.add_column("value")
    losses = report.losses
    window = max(1, min(20, len(losses) // 5))
    rows = [("parameters", f"{report.n_parameters / 1e6:.2f} M"),
            ("train / held-out samples", f"{report.train_samples} / {report.held_out_samples}"
                                         + (f" ({report.held_out_scene_samples_dropped} samples of later --demos sets "
                                            "left out: their scenes are held out)"
                                            if report.held_out_scene_samples_dropped else "")),
            ("steps x batch", f"{options.steps} x {options.batch_size} ({report.seconds_per_step:.2f} s per step, "
                              f"{report.torch_threads} thread{'s' if report.torch_threads != 1 else ''}, "
                              f"bf16 {'on' if report.bf16_autocast else 'off'})"),
            ("loss first / last", f"{sum(losses[:window]) / window:.3f} / {sum(losses[-window:]) / window:.3f} "
                                  f"(mean of {window} steps)")]
    rows += [(f"held-out accuracy: {kind}", f"{acc * 100:.1f}% of answers point nearest the named block (greedy)"
              if kind == "point" else f"{acc * 100:.1f}% of tokens (teacher-forced)")
             for kind, acc in report.held_out_accuracy.items()]
    if report.held_out_accuracy:
        rows.append(("held-out action bin error", f"{report.action_bin_error:.1f} bins of 255 (mean abs)"))
    if report.trace_end:
        end = report.trace_end
        rows.append(("held-out trace end (greedy)", f"{end['model']:.1f} units off; a constant end point: "
                                                    f"{end['constant']:.1f} ({end['frames']} first frames)"))
    if report.image_use:
        use = report.image_use
        note = image_use_note(use["own"], use["other"])
        rows.append(("held-out trace + action loss", f"{use['own']:.3f} with the sample's frame, {use['other']:.3f} "
                                                     f"with another scene's ({note})"))
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)
    plot = report.out_dir / LOSS_PLOT
    console.print(f"loss curve: {plot}" if plot.is_file() else
                  "loss curve: not plotted (no matplotlib); see training_log.json")
    return 0


# Held-out loss the sample's own frame must save over another scene's before the table calls the image used: the
# recipe's CPU-trained models save 0.001-0.005 nats (they answer from the depth codes), GPU-trained ones ~1 (README).
IMAGE_USE_MARGIN_NATS = 0.05


def image_use_note(own: float, other: float) -> str:
    """The verdict beside the held-out loss with the sample's frame (own) and another scene's (other)."""
    saved = other - own
    if saved >= IMAGE_USE_MARGIN_NATS:
        return f"the image is used: its own frame saves {saved:.3f} nats"
    return f"within {IMAGE_USE_MARGIN_NATS} nats: the image is ignored"


def _plot_losses(losses: list[float], path: Path) -> Path | None:
    """The per-step loss and its running mean as a PNG; None where matplotlib is not installed."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    import numpy as np

    fig = Figure(figsize=(8, 4), layout="constrained")     # no pyplot: no global state
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    steps = np.arange(len(losses))
    ax.plot(steps, losses, lw=0.5, alpha=0.5, label="per step")
    window = max(1, min(50, len(losses) // 10))
    ax.plot(steps[window - 1:], np.convolve(losses, np.ones(window) / window, mode="valid"), label=f"mean of {window}")
    ax.set(xlabel="step", ylabel="cross-entropy on answer tokens", yscale="log", title="reference ARM training")
    ax.legend()
    fig.savefig(path, dpi=100)
    return path
