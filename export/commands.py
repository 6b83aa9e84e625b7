"""Export-side sub-commands; torch is imported inside handlers only."""
from __future__ import annotations

import argparse
from pathlib import Path
from edgeact.runtime.cli_args import positive_int as _positive_int, seed_value

# Choices are literals here (not imported from synthetic.py) so `edgeact --help` never loads torch.
VARIANT_CHOICES = ("D", "O")
SIZE_CHOICES = ("tiny", "small", "bench", "reference")
DTYPE_CHOICES = ("float32", "bfloat16", "float16")


def register(subparsers) -> None:
    _register_make_checkpoint(subparsers)
    _register_generate(subparsers)


# --------------------------------------------------------------------------- make-checkpoint


def _register_make_checkpoint(subparsers) -> None:
    p = subparsers.add_parser(
        "make-checkpoint",
        help="write a synthetic MolmoAct checkpoint (real format and architecture, small sizes, seeded weights)",
        description="Write a synthetic MolmoAct-7B-D or -O style checkpoint in the published Hugging Face "
                    "layout: config.json, safetensors weights, tokenizer.json, preprocessor_config.json.",
    )
    p.add_argument("--variant", choices=VARIANT_CHOICES, default="D",
                   help="D: SigLIP2-like ViT + Qwen2-like decoder; O: CLIP-like ViT + OLMo2-like decoder (default D)")
    p.add_argument("--size", choices=SIZE_CHOICES, default="tiny",
                   help="tiny: unit tests; small: a few M parameters; bench: 100-300 M parameters; "
                        "reference: the size trained on the simulated task (default tiny)")
    p.add_argument("--seed", type=seed_value, default=0, help="weights seed; the same seed gives identical files (default 0)")
    p.add_argument("--out", type=Path, required=True, help="checkpoint directory to create")
    p.add_argument("--shards", type=_positive_int, default=1, help="number of safetensors shards (default 1: model.safetensors)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="float32", help="weight dtype in the files (default float32)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists and is not empty")
    p.set_defaults(handler=_make_checkpoint)


def _make_checkpoint(args: argparse.Namespace) -> int:
    from edgeact.runtime.atomic_dir import occupied
    from edgeact.runtime.cli import CommandError

    out: Path = args.out
    if occupied(out) and not args.force:
        raise CommandError(f"{out} already exists and is not empty; pass --force to replace it or choose another --out")

    import torch
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from edgeact.export.synthetic import count_parameters, make_checkpoint, synthetic_config
    from edgeact.export.tensor_names import expected_tensor_shapes

    console = Console()
    cfg = synthetic_config(args.variant, args.size)
    n_tensors = len(expected_tensor_shapes(cfg))
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        weights = progress.add_task("drawing weights", total=n_tensors)
        # Each shard plus config, tokenizer, preprocessor config, and the index when sharded.
        files = progress.add_task("writing files", total=args.shards + 3 + (1 if args.shards > 1 else 0))
        path = make_checkpoint(
            args.variant, args.size, args.seed, out, shards=args.shards, dtype=getattr(torch, args.dtype),
            overwrite=args.force,
            on_tensor=lambda name: progress.advance(weights),
            on_file=lambda name: progress.advance(files),
        )
    _print_summary(console, path, args, count_parameters(cfg))
    return 0


def _print_summary(console, path: Path, args: argparse.Namespace, n_params: int) -> None:
    from rich.table import Table

    files = sorted(p for p in path.iterdir() if p.is_file())
    table = Table(title=f"synthetic checkpoint {path}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    table.add_row("variant", f"MolmoAct-{args.variant} layout")
    table.add_row("size", args.size)
    table.add_row("seed", str(args.seed))
    table.add_row("parameters", f"{n_params:,}")
    table.add_row("dtype", args.dtype)
    table.add_row("files", ", ".join(p.name for p in files))
    table.add_row("bytes", f"{sum(p.stat().st_size for p in files):,}")
    console.print(table)


# --------------------------------------------------------------------------- generate


def _register_generate(subparsers) -> None:
    p = subparsers.add_parser(
        "generate",
        help="reference generation: the full answer from a checkpoint, one decode step per token (PyTorch)",
        description="Run the PyTorch reference on one camera image: preprocess, prefill the prompt, then "
                    "greedy decoding with a KV cache, one step per token, the MolmoAct way. By default every "
                    "step is masked to the answer grammar (the reference the decode program is checked "
                    "against); --free decodes without constraints, as a published checkpoint is run.",
    )
    p.add_argument("checkpoint", type=Path, help="MolmoAct checkpoint directory")
    p.add_argument("--instruction", default="move to the red block", help="what the robot should do")
    p.add_argument("--image", type=Path, help="RGB image file (PNG/JPEG); default: a frame of the synthetic camera")
    p.add_argument("--free", action="store_true", help="decode without the grammar mask")
    p.add_argument("--chunk", type=_positive_int, default=1, help="actions per answer (fine-tuned checkpoints: 8)")
    p.add_argument("--unnorm-key", help="norm_stats key for un-normalizing actions (default: the only one)")
    p.add_argument("--max-new-tokens", type=_positive_int,
                   help="most answer tokens (default: the longest answer the grammar allows; with --free, 512)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="float32")
    p.add_argument("--threads", type=_positive_int, help="torch CPU threads (default: torch's choice)")
    p.set_defaults(handler=_generate)


def _generate(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    from rich.console import Console
    from rich.table import Table

    from edgeact.export.checkpoint import load_model
    from edgeact.export.generate import generate_greedy
    from edgeact.runtime.action_bins import ActionStats, action_ids_to_values, unnormalize_actions
    from edgeact.runtime.answer import trace_to_pixels
    from edgeact.runtime.errors import GrammarError
    from edgeact.runtime.grammar import AnswerGrammar
    from edgeact.runtime.grammar_walk import MaskedGreedyConstraint, longest_answer
    from edgeact.runtime.preprocess import ImagePreprocessor
    from edgeact.runtime.prompt import build_prompt_ids
    from edgeact.runtime.token_layout import TokenLayout, load_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    console = Console()
    model, ckpt = load_model(args.checkpoint, dtype=getattr(torch, args.dtype))
    # Before generating: a wrong --unnorm-key is refused at once, naming the checkpoint's keys.
    stats = ActionStats.from_norm_stats(ckpt.norm_stats, args.unnorm_key)
    tokenizer = load_tokenizer(ckpt.tokenizer_path)
    layout = TokenLayout.from_tokenizer(tokenizer, str(ckpt.tokenizer_path))
    rgb = _load_rgb(args.image)
    inputs = ImagePreprocessor(ckpt.config, ckpt.preprocess_config)(rgb)
    prompt = build_prompt_ids(tokenizer, layout, args.instruction, inputs)
    grammar = AnswerGrammar(tokenizer, layout, n_actions=args.chunk)
    limit = args.max_new_tokens or (512 if args.free else longest_answer(grammar))
    as_tensor = lambda a: torch.from_numpy(np.array(a))  # noqa: E731 -- copies: preprocess buffers are reused
    result = generate_greedy(
        model, as_tensor(prompt)[None], as_tensor(inputs.images).to(model.dtype), as_tensor(inputs.image_masks),
        as_tensor(inputs.pooled_patches_idx), max_new_tokens=limit, eos_token_id=layout.bos_id,
        allowed_token_fn=None if args.free else MaskedGreedyConstraint(grammar),
    )
    text = tokenizer.decode(result.token_ids, skip_special_tokens=False)
    console.print(f"[bold]answer[/bold] ({len(result.token_ids)} tokens): {text}")
    table = Table(title="reference generation", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    table.add_row("prompt tokens", f"{len(prompt)} ({inputs.n_image_tokens} image features)")
    table.add_row("prefill (incl. vision)", f"{result.seconds_prefill * 1e3:.1f} ms")
    steps = max(result.n_decode_steps, 1)
    table.add_row("decode", f"{result.n_decode_steps} steps, {result.seconds_decode:.2f} s, "
                            f"{steps / max(result.seconds_decode, 1e-9):.1f} tokens/s")
    try:
        answer = grammar.parse_ids(result.token_ids)
    except GrammarError as exc:
        cut = (f" (generation stopped at --max-new-tokens {limit} before the end-of-text; raise it)"
               if len(result.token_ids) >= limit and layout.bos_id not in result.token_ids else "")
        table.add_row("parse", f"[red]not a valid answer[/red]: {exc}{cut}")
        console.print(table)
        return 1
    height, width = rgb.shape[:2]
    values = action_ids_to_values(answer.action_ids, layout.base_vocab_size)
    table.add_row("depth codes", f"{len(answer.depth_codes)}: {answer.depth_codes[:10].tolist()} ...")
    table.add_row("trace (0-255)", str(answer.trace.tolist()))
    table.add_row(f"trace (px of {width}x{height})", str(np.round(trace_to_pixels(answer.trace, width, height), 1).tolist()))
    table.add_row("actions (normalized)", str(np.round(values, 3).tolist()))
    table.add_row("actions (un-normalized)", str(np.round(unnormalize_actions(values, stats), 4).tolist()))
    console.print(table)
    return 0


def _load_rgb(path: Path | None):
    import numpy as np

    if path is None:
        from edgeact.drivers.cameras.synthetic import SyntheticCamera, SyntheticConfig

        return SyntheticCamera(SyntheticConfig(width=320, height=240)).render(0).color
    from PIL import Image

    from edgeact.runtime.cli import CommandError

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (FileNotFoundError, OSError) as exc:
        raise CommandError(f"{path}: cannot read the image ({exc}); give a PNG or JPEG file") from None
