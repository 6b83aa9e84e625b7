"""Simulation sub-commands: `edgeact sim-demos` records the reference task's expert demonstrations (MuJoCo), or
with --policy a bundle's own states labelled by the expert (DAgger)."""
from __future__ import annotations

from edgeact.runtime.cli_args import positive_int


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
    demos.add_argument("--rotation-noise", type=float, default=0.0, metavar="RAD",
                       help="noise (std, rad per axis) added to the executed hand rotation of each action: states "
                            "with the hand turned off the expert's orientation, labelled with its correction; "
                            "default 0")
    demos.add_argument("--siblings", type=int, default=0,
                       help="also demonstrate each scene under up to this many other instructions naming another "
                            "block (default 0)")
    demos.add_argument("--trace-horizon", type=int, default=8, metavar="ACTIONS",
                       help="the trace covers this many actions ahead (default 8, the chunk; 0: to the end of the "
                            "episode)")
    demos.add_argument("--first-chunk", action="store_true",
                       help="record only each episode's first sample (the expert runs its first chunk, every "
                            "episode kept): many scenes at a fraction of whole episodes' cost")
    demos.add_argument("--policy", metavar="BUNDLE",
                       help="DAgger: this bundle drives the arm (lockstep, forced depth where it has the depth stage) "
                            "and every state it visits is labelled with the expert's plan from there; all episodes "
                            "are kept. --execution-noise, --rotation-noise and --siblings do not apply")
    demos.add_argument("--replan-every", type=int, default=2, metavar="ACTIONS",
                       help="with --policy: actions executed per plan, at most the plan's own (default 2, as edgeact "
                            "eval)")
    demos.add_argument("--expert-mix", type=float, default=0.0, metavar="P",
                       help="with --policy: probability per plan that the expert's chunk is executed instead "
                            "(default 0)")
    demos.add_argument("--threads", type=int, default=None, help="with --policy: onnxruntime threads")
    demos.add_argument("--allow-unverified", action="store_true",
                       help="with --policy: drive with a bundle whose verification failed (e.g. a quantized one whose "
                            "free-running tokens drift from fp32's), as edgeact eval --allow-unverified")
    demos.add_argument("--workers", type=positive_int, default=1,
                       help="expert recording: simulator processes, one shard of episodes each at a time "
                            "(the same set as one process writes; default 1)")
    demos.set_defaults(handler=_demos)


def _demos(args) -> int:
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from edgeact.drivers.sim.demos import DemoConfig, record_demos, record_policy_demos
    from edgeact.runtime.errors import ConfigError

    if args.seed < 0:       # numpy's generators take no negative seed: refused here, before --out is made
        raise ConfigError(f"--seed must be an integer >= 0, got {args.seed}; episode i uses seed + i, so start "
                          "from 0 (the default) or above")
    if args.allow_unverified and not args.policy:
        raise ConfigError("--allow-unverified is for the bundle of --policy (the expert needs no bundle); drop it")
    if args.policy and args.workers != 1:
        raise ConfigError("sim-demos --policy records in one process (the policy's); drop --workers")
    if args.policy and (args.execution_noise or args.rotation_noise or args.siblings or args.first_chunk):
        raise ConfigError("sim-demos --policy: the policy's own states are recorded; drop --execution-noise, "
                          "--rotation-noise, --siblings and --first-chunk (they apply to the expert's recording)")
    config = DemoConfig(width=args.width, height=args.height, stride_actions=args.stride,
                        execution_noise=args.execution_noise, rotation_noise_rad=args.rotation_noise,
                        siblings=args.siblings, trace_horizon_actions=args.trace_horizon,
                        first_chunk_only=args.first_chunk)
    with Progress(transient=True) as bar:
        task = bar.add_task("policy episodes" if args.policy else "expert episodes", total=args.episodes)
        progress = lambda done, total: bar.update(task, completed=done)     # noqa: E731
        if args.policy:
            policy = _policy(args.policy, args.threads, args.allow_unverified)
            try:
                summary = record_policy_demos(args.out, policy, args.episodes, args.seed, config,
                                              replan_every=args.replan_every, expert_mix=args.expert_mix,
                                              source=str(args.policy), progress=progress)
            finally:
                policy.close()
        else:
            summary = record_demos(args.out, args.episodes, args.seed, config, progress=progress, workers=args.workers)
    console = Console()
    if not args.first_chunk:        # one chunk of an episode finishes no task: no success rate to show
        table = Table(title=f"demonstrations in {summary.out_dir}")
        for column in ("template", "successes", "episodes", "rate"):
            table.add_column(column)
        for template, (ok, n) in summary.successes.items():
            table.add_row(template, str(ok), str(n), f"{ok / n:.0%}" if n else "-")
        console.print(table)
    kept = "episodes of the policy, labelled by the expert" if args.policy else \
        "episodes' first chunks" if args.first_chunk else "successful episodes"
    console.print(f"{summary.samples} samples from {summary.episodes} {kept}, {summary.bytes_written / 1e6:.1f} MB, "
                  f"{summary.seconds:.1f} s ({summary.seconds / args.episodes:.2f} s per episode)")
    return 0


def _policy(bundle: str, threads: int | None, allow_unverified: bool = False):
    """The bundle as `edgeact eval` runs it on the reference task: forced depth where it can, its action decoding."""
    from edgeact.runtime.bundle_policy import BundlePolicy
    from edgeact.runtime.sim_eval import REFERENCE_ACTION_DECODING, has_depth_stage

    return BundlePolicy(bundle, forced_depth="sensor" if has_depth_stage(bundle) else None, threads=threads,
                        action_decoding=REFERENCE_ACTION_DECODING, allow_unverified=allow_unverified,
                        unverified_fix="to drive with it anyway: pass --allow-unverified to sim-demos")
