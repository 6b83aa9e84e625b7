"""`edgeact bench-compare BUNDLE [BUNDLE ...]`: bundles measured side by side, interleaved (runtime/bench_compare.py)."""
from __future__ import annotations

from edgeact.runtime.cli_args import console as _console, positive_int as _positive_int, results_dir, seed_value

DEFAULT_OUT = "out/bench-compare"


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench-compare",
        help="bundles side by side in one process, round by round: decode rate and policy steps, vs the first")
    p.add_argument("bundles", nargs="+", metavar="BUNDLE", help="bundle directories; ratios are to the first")
    p.add_argument("--device", choices=("cpu", "cuda", "tensorrt"), default="cpu",
                   help="onnxruntime provider (default cpu; cuda / tensorrt need onnxruntime-gpu and portable bundles)")
    p.add_argument("--threads", type=_positive_int, help="onnxruntime intra-op threads (default: every core)")
    p.add_argument("--rounds", type=_positive_int, default=6,
                   help="decode-rate rounds (default 6); policy steps run half as many rounds")
    p.add_argument("--decode-steps", type=_positive_int, default=60, help="timed single-token steps per round (default 60)")
    p.add_argument("--past", type=int, help="context of the decode rate (default: the first frame's prompt + 100)")
    p.add_argument("--frames", type=_positive_int, default=2, help="timed frames per policy round (default 2)")
    p.add_argument("--seed", type=seed_value, default=0)
    p.add_argument("--out", default=DEFAULT_OUT, help=f"where bench-compare.json goes (default {DEFAULT_OUT})")
    p.set_defaults(handler=_compare)


def _compare(args) -> int:
    from rich.progress import Progress

    from edgeact.runtime.bench_compare import CompareOptions, compare_bundles, write_report

    options = CompareOptions(device=args.device, threads=args.threads, rounds=args.rounds,
                             decode_steps=args.decode_steps, past=args.past, frames=args.frames, seed=args.seed)
    results_dir(args.out)     # before the rounds: a bad --out would lose every figure at the end
    console = _console()
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("bench-compare", total=2 + options.rounds + options.policy_rounds)
        report = compare_bundles(args.bundles, options,
                                 on_step=lambda name: progress.update(task, advance=1, description=name))
    console.print(comparison_table(report))
    console.print(f"JSON: {write_report(report, args.out)}")
    return 0


def comparison_table(report: dict):
    from rich.table import Table

    o = report["options"]
    table = Table(title=f"bundles side by side ({o['device']}, {o['rounds']} decode rounds at "
                        f"{report['decode_context_tokens']} positions, {o['frames']} frames x "
                        f"{o['policy_rounds']} policy rounds; medians, ratio > 1 = faster than the first)")
    for column in ("bundle", "decode steps/s", "vs first", "policy step ms", "vs first", "decode steps",
                   "forced depth ms", "vs first"):
        table.add_column(column, justify="left" if column == "bundle" else "right")
    for row in report["bundles"]:
        table.add_row(row["bundle"], f"{row['decode_steps_per_s']:.1f}", f"{row['decode_vs_first']:.2f}x",
                      f"{row['policy_step_s'] * 1e3:.0f}", f"{row['policy_vs_first']:.2f}x", f"{row['decode_steps']:g}",
                      f"{row['forced_depth_step_s'] * 1e3:.0f}", f"{row['forced_vs_first']:.2f}x")
    return table
