"""Simulation sub-commands: `edgeact sim-demos` records the reference task's expert demonstrations (MuJoCo)."""
from __future__ import annotations


def register(subparsers) -> None:
    demos = subparsers.add_parser("sim-demos", help="record expert demonstrations of the simulated reference task "
                                                    "(images, depth, instruction, trace, action chunks)")
    demos.add_argument("--episodes", type=int, default=200, help="episodes to run (default 200)")
    demos.add_argument("--seed", type=int, default=0, help="episode i uses seed + i (default 0)")
    demos.add_argument("--out", required=True, help="new directory for the npz shards and manifest.json")
    demos.add_argument("--width", type=int, default=160, help="image width in pixels (default 160)")
    demos.add_argument("--height", type=int, default=120, help="image height in pixels (default 120)")
    demos.add_argument("--stride", type=int, default=4, help="a sample every this many actions (default 4)")
    demos.add_argument("--execution-noise", type=float, default=0.0,
                       help="noise added to the executed steps, relative to the step (the recorded actions stay "
                            "the expert's: it shows how to come back to its path); default 0")
    demos.add_argument("--siblings", type=int, default=0,
                       help="also demonstrate each scene under up to this many other instructions naming another "
                            "block (default 0)")
    demos.add_argument("--trace-horizon", type=int, default=8, metavar="ACTIONS",
                       help="the trace covers this many actions ahead (default 8, the chunk; 0: to the end of the "
                            "episode)")
    demos.set_defaults(handler=_demos)


def _demos(args) -> int:
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from edgeact.drivers.sim.demos import DemoConfig, record_demos

    config = DemoConfig(width=args.width, height=args.height, stride_actions=args.stride,
                        execution_noise=args.execution_noise, siblings=args.siblings,
                        trace_horizon_actions=args.trace_horizon)
    with Progress(transient=True) as bar:
        task = bar.add_task("expert episodes", total=args.episodes)
        summary = record_demos(args.out, args.episodes, args.seed, config,
                               progress=lambda done, total: bar.update(task, completed=done))
    table = Table(title=f"demonstrations in {summary.out_dir}")
    for column in ("template", "successes", "episodes", "rate"):
        table.add_column(column)
    for template, (ok, n) in summary.successes.items():
        table.add_row(template, str(ok), str(n), f"{ok / n:.0%}" if n else "-")
    console = Console()
    console.print(table)
    console.print(f"{summary.samples} samples from {summary.episodes} successful episodes, {summary.bytes_written / 1e6:.1f} MB, "
                  f"{summary.seconds:.1f} s ({summary.seconds / args.episodes:.2f} s per episode)")
    return 0
