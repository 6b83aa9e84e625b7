"""`edgeact eval CONFIG --episodes N`: closed-loop success of bundles on the simulated reference task (runtime/sim_eval.py)."""
from __future__ import annotations

from pathlib import Path

from edgeact.runtime.cli_args import console as _console, positive_int, write_config_file

DEFAULT_OUT = "out/eval"


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="closed-loop evaluation on the simulated reference task: success rate, episode time, "
                     "control frequency and policy rate per bundle and depth source",
        description="Run seeded episodes of the reference task (MuJoCo robot) for each bundle, with the model's own "
                    "depth codes and/or the depth forced from the camera through the bundle's depth tokenizer; "
                    "print one table, write eval.json and a PNG sheet for the first --sheets episodes of each.")
    p.add_argument("config", metavar="CONFIG", nargs="?",
                   help="robot config of the MuJoCo robot (default: the built-in one; `--write-config` writes it)")
    p.add_argument("--episodes", type=positive_int, default=50, help="episodes per system (default 50)")
    p.add_argument("--bundle", action="append", default=[], metavar="NAME=PATH",
                   help="a bundle to evaluate, e.g. fp32=out/b32 (repeat to compare); default: the config's policy")
    p.add_argument("--depth", nargs="+", default=["generated", "forced"], metavar="SOURCE",
                   help="generated and/or forced (default both)")
    p.add_argument("--timing", choices=("realtime", "lockstep"), default="realtime",
                   help="realtime: the pipelined loop as on a robot (default); lockstep: the simulator waits for the "
                        "policy (the model alone; for precisions this computer cannot run in time)")
    p.add_argument("--replan-every", type=positive_int, default=2,
                   help="lockstep: actions executed per plan (default 2)")
    # Literal copies of decode_program.ACTION_DECODINGS and sim_eval.REFERENCE_ACTION_DECODING: importing them here
    # would cost `edgeact --help` time; eval_systems checks the value again.
    p.add_argument("--action-decoding", choices=("median", "greedy"), default="median",
                   help="how action bins are picked: median of each bin distribution (default: the reference ARM "
                        "succeeds more often with it) or greedy, MolmoAct's argmax")
    p.add_argument("--trace", choices=("model", "expert"), default="model",
                   help="whose trace each plan carries: the model's (default), or the scripted expert's from the "
                        "arm's current pose, forced through trace steering (with --timing lockstep): then only the "
                        "actions are the model's; the built-in robot follows a given trace (plan.follow_trace "
                        "steered): add --follow-trace never to measure how well the actions alone follow it")
    p.add_argument("--ensemble", choices=("on", "off"),
                   help="temporal ensembling (plan.ensemble): follow each action slot's mean over the plans that "
                        "predicted it, or only the newest plan's action (default: the config's; the built-in robot's "
                        "is on)")
    p.add_argument("--follow-trace", choices=("never", "steered", "always"),
                   help="move each plan's translations onto its trace lifted through the camera (plan.follow_trace): "
                        "never, steered (a given trace, e.g. --trace expert) or always (the model's own trace too); "
                        "default: the config's, the built-in robot's is steered")
    p.add_argument("--draft-tokens", type=int, metavar="N",
                   help="drafted tokens per decoder call for every system (policy.draft_tokens); 0: one decoder call "
                        "per choice, which is what decode steps per plan measured before drafting and what the "
                        "forced-vs-generated depth comparison of decode steps needs (default: the config's; the "
                        "built-in robot's is 16)")
    p.add_argument("--allow-unverified", action="store_true",
                   help="also run bundles whose verification failed (refused otherwise), to measure what it costs")
    p.add_argument("--seed", type=int, help="seed of the first episode (default: the evaluation seeds, far from "
                                            "any training recording's)")
    p.add_argument("--sheets", type=int, default=3, help="episodes per system with a PNG sheet (default 3)")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"where eval.json and sheets/ go (default {DEFAULT_OUT})")
    p.add_argument("--write-config", metavar="PATH", help="only write the built-in MuJoCo robot's config here (a .json "
                                                          "file) and exit")
    p.add_argument("--overwrite", action="store_true", help="with --write-config: replace PATH if it exists")
    p.set_defaults(handler=_eval)


def _eval(args) -> int:
    from rich.table import Table

    from edgeact.runtime.errors import ConfigError
    from edgeact.runtime.robot_config import read_config_dict
    from edgeact.runtime.sim_eval import EVAL_SEED, REPORT_FILE, EvalInterrupted, EvalOptions, eval_systems, evaluate
    from edgeact.runtime.sim_robot import mujoco_robot_config_dict

    console = _console()
    if args.write_config:
        console.print(f"wrote {write_config_file(args.write_config, mujoco_robot_config_dict(), args.overwrite)}")
        return 0
    base = read_config_dict(args.config) if args.config else mujoco_robot_config_dict()
    source = str(args.config) if args.config else "<eval: built-in MuJoCo robot>"
    bundles = {}
    for item in args.bundle:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--bundle {item!r}: write NAME=PATH, e.g. int8=out/bundle-int8")
        if name in bundles:
            raise ConfigError(f"--bundle {name}= is given twice ({bundles[name]} and {path}); give each bundle its own "
                              f"NAME, e.g. --bundle {name}-2={path}")
        bundles[name] = path
    if not bundles:
        policy = base.get("policy") or {}
        if policy.get("type") == "bundle" and policy.get("path"):
            path = Path(policy["path"])
            if not path.is_absolute() and args.config:
                path = Path(args.config).resolve().parent / path
            bundles["config"] = str(path)
    options = EvalOptions(args.episodes, Path(args.out), args.seed if args.seed is not None else EVAL_SEED,
                          args.timing, args.replan_every, args.sheets, args.trace,
                          None if args.ensemble is None else args.ensemble == "on", args.draft_tokens,
                          args.follow_trace)
    systems = eval_systems(bundles, args.depth, args.allow_unverified, args.action_decoding)
    written = []        # the episodes in eval.json so far (evaluate writes each before calling progress)

    def progress(system: str, index: int, result) -> None:
        written.append(result)
        mark = "[green]ok[/]" if result.success else "[red]fail[/]"
        console.print(f"{system}: episode {index + 1}/{options.episodes} {result.instruction!r} {mark} "
                      f"({result.episode_s:.1f} s)")

    json_path = options.out_dir / REPORT_FILE
    from edgeact.runtime.commands_loop import sigterm_as_interrupt

    try:
        with sigterm_as_interrupt():        # `kill`, a scheduler's timeout: marked "interrupted" as Ctrl-C is
            report = evaluate(base, systems, options, progress, source)
    except EvalInterrupted as stop:
        done = len(stop.report.episodes)
        finished = (f"{done} episode{'s' if done > 1 else ''} finished; they are in {json_path} (marked "
                    f"\"interrupted\": true)" if done else
                    f"no episode finished; {json_path} says so (\"interrupted\": true, no episodes)")
        why = f" ({stop})" if str(stop) else ""
        console.print(f"interrupted{why}: {finished}")
        from edgeact.runtime.errors import Terminated, interrupt_status

        cause = stop.__cause__
        return interrupt_status(isinstance(cause, Terminated) or getattr(cause, "terminated", False))
    except Exception:   # evaluate marked the report ("interrupted": true, "error"); the CLI reports the error itself
        if written:
            done = len(written)
            console.print(f"stopped by an error: {done} episode{'s' if done > 1 else ''} finished; they are in "
                          f"{json_path} (marked \"interrupted\": true, with the error)")
        raise
    steered = ", the expert's trace" if options.trace == "expert" else ""
    if report.follow_trace == "always" or (report.follow_trace == "steered" and options.trace == "expert"):
        steered += ", trace followed"
    table = Table(title=f"reference task, {options.episodes} episodes per system ({options.timing}{steered})")
    for column in ("system", "success", "per template", "episode s", "control Hz", "p99 period err ms",
                   "policy plans/s", "decode calls/plan"):
        table.add_column(column)
    for row in report.rows():
        per = " ".join(f"{t} {ok}/{n}" for t, (ok, n) in row["per_template"].items())
        table.add_row(row["system"], f"{row['success_rate']:.0%} ({row['successes']}/{row['episodes']})", per,
                      _fmt(row["episode_s_mean"], 1), _fmt(row["control_hz_mean"], 1),
                      _fmt(row["period_error_p99_ms_max"], 2), _fmt(row["policy_hz_mean"], 2),
                      _fmt(row["decode_steps_mean"], 1))
    console.print(table)
    failed = [row for row in report.rows() if row["failures"]]
    if failed:
        why = Table(title="why the failed episodes failed (their end state; eval.json has each one's measures)")
        why.add_column("system")
        why.add_column("failures")
        for row in failed:
            why.add_row(row["system"], ", ".join(f"{reason} {n}" for reason, n in row["failures"].items()))
        console.print(why)
    sheets = f"; sheets: {options.out_dir / 'sheets'}" if options.sheets else ""      # --sheets 0 writes none
    console.print(f"results: {json_path}{sheets}")
    return 0


def _fmt(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
