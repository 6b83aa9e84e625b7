"""Loop sub-commands: `edgeact run CONFIG`, `edgeact check CONFIG`, `edgeact bench [CONFIG] --seconds N`, `edgeact demo`
(simulated robot)."""
from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import sys
import threading
from pathlib import Path
from typing import Iterator
from edgeact.runtime.cli_args import (console as _console, positive_float, positive_int, write_config_file,
                                      write_json_file)
from edgeact.runtime.errors import interrupt_status

DEMO_SECONDS = 10.0
DEMO_POLICIES = ("scripted", "bundle")   # demo.DEMO_POLICIES, kept here so --help stays light
DEMO_ROBOTS = ("simple", "mujoco")       # demo.DEMO_ROBOTS
DEMO_TEMPLATES = ("move_to", "push_left", "push_right")     # drivers.sim.task.TEMPLATES (no mujoco import for --help)
EXIT_ESTOP = 3
CHECK_HINT = "`edgeact check {config}` lists everything that stops a run at once, without moving anything"


def register(subparsers) -> None:
    p = subparsers.add_parser("run", help="run the perception -> plan -> act loop on the robot a config describes")
    p.add_argument("config", metavar="CONFIG", help="robot config (.json or .toml); `edgeact demo --write-config` "
                                                    "writes a sample")
    p.add_argument("--seconds", type=positive_float, help="stop after this long (default: run until Ctrl-C or e-stop)")
    p.add_argument("--record", metavar="PATH", help="write every command, plan and trip as JSON lines here (beyond "
                                                    "256 MiB in numbered parts, run.jsonl then run.1.jsonl, "
                                                    "run.2.jsonl, ...; the 8 newest kept); an older recording at PATH "
                                                    "and its parts are replaced (with a warning)")
    p.add_argument("--json", metavar="PATH", help="write the timing summary as JSON here at the end")
    p.add_argument("--shadow", action="store_true",
                   help="a rehearsal: everything runs (camera, policy, plans, control at its rate, safety checks, "
                        "--record) but nothing is written to the motors (no goal, no torque change); each plan "
                        "starts from the measured pose, so the arm can be moved by hand to see what it would do")
    p.set_defaults(handler=_run)

    p = subparsers.add_parser("check", help="check what `edgeact run CONFIG` needs without moving anything: e-stop, "
                                            "device clocks, motors, start positions, kinematics, camera, policy")
    p.add_argument("config", metavar="CONFIG", help="robot config (.json or .toml)")
    p.add_argument("--frames", type=positive_int, default=5, help="camera frames to take (default 5)")
    p.add_argument("--no-policy", action="store_true", help="do not load the policy nor answer a frame with it")
    p.add_argument("--json", metavar="PATH", help="also write the checks as JSON here")
    p.set_defaults(handler=_check)

    p = subparsers.add_parser("bench", help="measure the loop: control frequency, overruns, stage latencies")
    p.add_argument("config", metavar="CONFIG", nargs="?", help="robot config (default: the built-in simulated robot)")
    p.add_argument("--seconds", type=positive_float, default=10.0, help="how long to run (default 10)")
    p.add_argument("--out", metavar="DIR", default="out/bench",
                   help="where bench.json and bench.png go (default out/bench)")
    p.add_argument("--record", metavar="PATH", help="also write every command as JSON lines here (in parts of "
                                                    "256 MiB, the 8 newest kept)")
    p.set_defaults(handler=_bench_command)

    p = subparsers.add_parser("demo", help="run the loop on the built-in simulated arm (Feetech bus on a pty, "
                                           "synthetic camera) and report the control frequency")
    p.add_argument("--seconds", type=positive_float,
                   help=f"how long (default: {DEMO_SECONDS:g} s on the simple robot, the episode's limit on mujoco)")
    p.add_argument("--robot", choices=DEMO_ROBOTS, default="simple",
                   help="simple: Feetech arm, simple physics, synthetic camera (default); mujoco: the mobile "
                        "manipulator on the reference task, one episode, with its result")
    p.add_argument("--seed", type=int, help="mujoco: the episode's seed (default: the demo's evaluation episode)")
    p.add_argument("--template", choices=DEMO_TEMPLATES, help="mujoco: the task template (default: the demo's)")
    p.add_argument("--policy", choices=DEMO_POLICIES, default="scripted",
                   help="scripted: a deterministic stand-in (default); bundle: the model in --bundle")
    p.add_argument("--bundle", metavar="PATH", help="bundle directory for --policy bundle")
    p.add_argument("--out", metavar="DIR", default="out/demo",
                   help="where demo.json and demo.png go (default out/demo)")
    p.add_argument("--write-config", metavar="PATH", help="only write the demo's robot config here (a .json file) "
                                                          "and exit")
    p.add_argument("--overwrite", action="store_true", help="with --write-config: replace PATH if it exists")
    p.set_defaults(handler=_demo)


# -- handlers -----------------------------------------------------------------------------------

def _run(args) -> int:
    from edgeact.runtime.demo import check_policy_bundle, policy_bundle
    from edgeact.runtime.device_info import read_device_info
    from edgeact.runtime.errors import EdgeactError
    from edgeact.runtime.loop import run_robot
    from edgeact.runtime.robot_config import load_robot_config
    from edgeact.runtime.recorder import CommandRecorder
    from edgeact.runtime.telemetry import (LogSubscriber, TimingStats, distinct_outputs, is_recording, is_timing_json,
                                           not_another_file, output_file, outputs_not_inputs)

    _log_to_stderr(logging.INFO)
    config = load_robot_config(args.config)
    config = check_policy_bundle(config)    # before --json's older file is replaced: a bad input leaves it as it was
    # The outputs are checked before the run: found unwritable after it, every number of the run would be lost.
    outputs = {option: output_file(path, option) for option, path in (("--record", args.record), ("--json", args.json))
               if path}
    distinct_outputs(outputs)
    outputs_not_inputs(outputs, config.input_files)
    if "--record" in outputs:       # an older run's output of the same kind is replaced; nothing else is
        not_another_file(outputs["--record"], "--record", is_recording, "an edgeact recording")
    if "--json" in outputs:
        not_another_file(outputs["--json"], "--json", is_timing_json, "an edgeact timing summary")
    stats = TimingStats(config.rates.control_hz)
    estop = threading.Event()
    if args.shadow:
        logging.getLogger(__name__).warning("shadow run: the motors are read and never written (no goal, no torque "
                                            "change); the safe states and the exit below are the run's, withheld")
    warn_without_estop(config)
    with sigterm_as_interrupt(), KeyEstop(config.estop.key_char, estop, required=estop_key_required(config)):
        if args.json:
            stats.start_json(args.json, "--json")       # an older run's JSON never stands for this one
        subscribers = [stats, LogSubscriber()] + ([CommandRecorder(args.record)] if args.record else [])
        device = read_device_info()
        bundle = policy_bundle(config)      # which bundle, read before it runs: it may be switched or removed after
        try:
            result = run_robot(config, args.seconds, subscribers, estop=estop, shadow=args.shadow)
        except EdgeactError:        # the robot never started (a motor, the camera, the bundle): there may be more
            print(CHECK_HINT.format(config=args.config), file=sys.stderr)
            raise
    console = _console(120)
    extra = stats.finish(result, bundle, device)
    if result.shadow_withheld is not None:
        extra["shadow"] = {"writes_withheld": result.shadow_withheld}
    console.print(_summary_tables({**stats.summary(), **extra}))
    json_note = ""
    if args.json:
        written, json_note = stats.write_final_json(args.json, extra)
        console.print(f"timing summary: {written}" if written else f"timing summary NOT written: {json_note}",
                      style=None if written else "bold red", markup=False)
    if result.ticks == 0 and result.error is not None:      # refused at the start (e.g. a joint outside its limits)
        print(CHECK_HINT.format(config=args.config), file=sys.stderr)
    return _unless_output_lost(_finish(result, console), json_note, "--json")


def _check(args) -> int:
    """Every check in a table as it is made; status 1 when one failed (the run would not start, or not run well)."""
    from rich.table import Table
    from rich.text import Text

    from edgeact.runtime.preflight import FAIL, OK, SKIPPED, WARN, failed, preflight, report
    from edgeact.runtime.robot_config import load_robot_config
    from edgeact.runtime.telemetry import is_check_report, not_another_file, output_file, outputs_not_inputs

    _log_to_stderr(logging.WARNING)
    config = load_robot_config(args.config)         # a bad field: named here, before anything connects
    json_path = output_file(args.json, "--json") if args.json else None
    if json_path is not None:
        outputs_not_inputs({"--json": json_path}, config.input_files)
        not_another_file(json_path, "--json", is_check_report, "an edgeact check report")
    console = _console(120)
    styles = {OK: "green", WARN: "yellow", FAIL: "bold red", SKIPPED: "dim"}
    console.print(f"check: {config.source} (nothing is moved; torque is left as it is)")
    with sigterm_as_interrupt():
        checks = preflight(config, args.frames, not args.no_policy,
                           on_check=lambda c: console.print(Text(f"  {c.name}: {c.status}", style=styles[c.status])))
    table = Table(title="edgeact check", show_lines=True)
    for column in ("check", "status", "detail"):
        table.add_column(column)
    for c in checks:
        table.add_row(c.name, Text(c.status, style=styles[c.status]), Text(c.detail))
    console.print(table)
    if json_path is not None:
        write_json_file(json_path, report(checks))
        console.print(f"checks: {json_path}")
    bad = [c.name for c in checks if c.status == FAIL]
    console.print(f"would not run as it is: fix {', '.join(dict.fromkeys(bad))} (above)" if failed(checks)
                  else "ready: `edgeact run` would start")
    return 1 if failed(checks) else 0


def _bench_command(args) -> int:
    from edgeact.runtime.robot_config import load_robot_config, robot_config_from_dict
    from edgeact.runtime.sim_robot import sim_robot_config_dict

    config = (load_robot_config(args.config) if args.config
              else robot_config_from_dict(sim_robot_config_dict(), source="<built-in simulated robot>"))
    return _measure_and_report(config, args.seconds, Path(args.out), "bench", args.record)


def _demo(args) -> int:
    from edgeact.runtime.demo import DEMO_EPISODE, demo_config, demo_config_dict

    if args.robot == "simple" and (args.seed is not None or args.template):
        from edgeact.runtime.errors import ConfigError

        raise ConfigError("--seed and --template choose a task episode: add --robot mujoco")
    episode = (DEMO_EPISODE[0] if args.seed is None else args.seed, args.template or DEMO_EPISODE[1])
    if args.write_config:
        from edgeact.runtime.robot_config import robot_config_from_dict

        data = demo_config_dict(args.policy, args.bundle, args.robot, episode)
        robot_config_from_dict(data, source=str(args.write_config))     # never write a config that cannot load
        write_config_file(args.write_config, data, args.overwrite)
        path = args.write_config
        print(f"wrote the simulated robot's config to {path}; run it with `edgeact run {path}`")
        return 0
    config = demo_config(args.policy, args.bundle, args.robot, episode)
    seconds = args.seconds
    if seconds is None:
        seconds = DEMO_SECONDS if args.robot == "simple" else _episode_limit_s(episode)
    return _measure_and_report(config, seconds, Path(args.out), "demo")


def _episode_limit_s(episode: tuple[int, str]) -> float:
    from edgeact.drivers.sim.task import sample_episode

    return sample_episode(*episode).time_limit_s


def _measure_and_report(config, seconds: float, out_dir: Path, name: str, record: str | None = None) -> int:
    """Run behind a progress bar, print the tables and where the JSON and PNG went."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from edgeact.runtime.demo import measure
    from edgeact.runtime.sim_eval import FirstPlan

    _log_to_stderr(logging.WARNING)
    console = _console(120)
    console.print(f"{name}: {config.source}, policy {config.policy.type_name!r}, "
                  f"control {config.rates.control_hz:g} Hz, actions {config.rates.action_rate_hz:g} Hz, {seconds:g} s")
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed:.1f} s"),
                        TimeRemainingColumn(), console=console, transient=True)
    estop = threading.Event()
    first_plan = FirstPlan()
    warn_without_estop(config)
    with progress, sigterm_as_interrupt(), KeyEstop(config.estop.key_char, estop,
                                                     required=estop_key_required(config)):
        task = progress.add_task("running the loop", total=seconds)
        run = measure(config, seconds, out_dir, name, record, estop=estop, subscribers=(first_plan,),
                      progress=lambda elapsed: progress.update(task, completed=min(elapsed, seconds)))
    # The robot is safe and the numbers are written: a Ctrl-C or SIGTERM now waits for the report's end (the
    # episode sheet renders the scene for a second or two), rather than leaving it half-printed and unsaid.
    from edgeact.runtime.loop import interrupts_deferred

    late: list[int] = []
    with interrupts_deferred(late):
        console.print(_summary_tables(run.summary))
        console.print(f"timing JSON: {run.json_path or 'NOT written: ' + run.json_note}\n"
                      f"timing plot: {run.plot_path or 'not written: ' + run.plot_note}", markup=False)
        if run.result.task is not None:
            _report_task(console, run, first_plan, out_dir / f"{name}-episode.png")
        status = _unless_output_lost(_finish(run.result, console), run.json_note, "--out")
    if late:
        console.print(f"{signal.Signals(late[-1]).name} during the report: it was finished first")
        return interrupt_status(late[-1] == signal.SIGTERM)
    return status


def _report_task(console, run, first_plan, sheet_path: Path) -> None:
    """The task's outcome, and the episode's sheet (frame with the first plan's trace, its actions, timing)."""
    from rich.table import Table

    from edgeact.runtime.errors import EdgeactError
    from edgeact.runtime.sim_eval import episode_sheet_from_run

    task = run.result.task
    table = Table(title=f"task: \"{task['episode']['instruction']}\" (seed {task['episode']['seed']})",
                  show_header=False)
    table.add_column("measure")
    table.add_column("value", justify="right")
    for row in task_rows(task):
        table.add_row(*row)
    console.print(table)
    if first_plan.plan is not None:
        try:
            path = episode_sheet_from_run(sheet_path, task, first_plan.plan, run.stats)
            console.print(f"episode sheet: {path}")
        except EdgeactError as exc:
            console.print(f"episode sheet: not written: {exc}")


def task_rows(task: dict) -> list[tuple[str, str]]:
    """The episode's outcome as table rows (`TaskTracker.report`): when it first succeeded, and where things are
    at the end of the run, which goes on after a success: a success undone since (a block pushed off the table)
    is said so."""
    when, episode = task["first_success_s"], task["episode"]
    if when is None:     # the run may have stopped before the episode's time limit (--seconds)
        verdict = f"[red]not done[/] within {min(episode['time_limit_s'], task['sim_time_s']):.1f} s"
    elif task["success"]:
        verdict = f"[green]SUCCESS[/] after {when:.1f} s"
    else:
        verdict = f"[green]SUCCESS[/] after {when:.1f} s, [yellow]undone[/] by the end ({task['sim_time_s']:.1f} s)"
    def centimetres(metres) -> str:
        return " ".join(f"{x * 100:+.1f}" for x in metres) + " cm"

    end = task["outcome"]
    lagged = [("simulator", f"[yellow]fell behind real time {task['sim_lag_skips']} times[/] (a loaded machine): "
                            "its clock ran slower than the wall clock, and the policy had more simulated time")] \
        if task.get("sim_lag_skips") else []
    return lagged + [("result", verdict),
            ("named block moved (x, y, z), at the end", centimetres(end["target_displacement_m"])),
            ("end effector to the block's top (x, y, z), at the end", centimetres(end["ee_to_target_m"])),
            ("other blocks moved at most, at the end", f"{end['max_other_displacement_m'] * 100:.1f} cm")]


def _unless_output_lost(status: int, note: str, option: str) -> int:
    """The run's own status, unless it ended cleanly and its summary could not be written: then that error."""
    if note and status == 0:
        from edgeact.runtime.cli import CommandError

        raise CommandError(f"{option} {note}: the timing summary was not written (the run itself ended cleanly); "
                           "free space or give another path")
    return status


def _finish(result, console) -> int:
    """The run's end as an exit status; an error is re-raised (after the robot is safe) for the CLI to report, and
    so is a failed teardown (after the tables: the run's numbers stand)."""
    from edgeact.runtime.errors import OutputLostError

    console.print(f"stopped: {result.reason} ({result.detail})")
    if result.plans == 0 and result.stale_frames:
        console.print(f"no plan was made: all {result.stale_frames} frames taken were older than "
                      "plan.max_frame_age_s (the warnings above say how old); lower the camera's resolution or rate, "
                      "or raise plan.max_frame_age_s", style="bold yellow", markup=False)
    if getattr(result, "shadow_withheld", None) is not None:
        console.print(f"shadow run: {result.shadow_withheld} writes withheld; nothing reached the motors")
    teardown_error = getattr(result, "teardown_error", None)
    motors_known = teardown_error is None or isinstance(teardown_error, OutputLostError)   # a file, not the motors
    if motors_known and getattr(result, "motors_at_exit", ""):     # a failed teardown says what it missed
        console.print(f"motors now: {result.motors_at_exit}", markup=False)
    if teardown_error is not None:
        console.print(f"the teardown after the run failed: {teardown_error}", style="bold red", markup=False)
    if result.reason == "interrupt" or getattr(result, "interrupted_late", False):   # Ctrl-C, maybe in the teardown
        from edgeact.runtime.loop import terminated

        return interrupt_status(terminated(result))
    if result.reason == "estop":
        return EXIT_ESTOP
    if result.error is not None:
        raise result.error
    if teardown_error is not None:
        raise teardown_error
    if not result.clean:
        from edgeact.runtime.cli import CommandError

        raise CommandError(f"the loop stopped: {result.reason}: {result.detail}; the robot was put in its safe state")
    return 0


# -- output --------------------------------------------------------------------------------------


def _summary_tables(summary: dict):
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    c, p = summary["control"], summary["policy"]
    loop = Table(title=f"control loop (target {c['target_hz']:g} Hz)", show_header=False)
    loop.add_column("metric")
    loop.add_column("value", justify="right")
    period, error = c["period_ms"], c["period_error_ms"]
    modes = ", ".join(f"{k} {v}" for k, v in sorted(c["modes"].items()))
    for key, value in (
        ("achieved frequency", f"{_fmt(c['achieved_hz'])} Hz"),
        ("period p50 / p99 / max", f"{_fmt(period['p50'])} / {_fmt(period['p99'])} / {_fmt(period['max'])} ms"),
        ("period error vs target p99", f"{_fmt(error['p99'])} ms"),
        ("command period error p99 (sends)", f"{_fmt((c.get('command_period_error_ms') or {}).get('p99'))} ms"),
        ("overruns", f"{c['overruns']} of {c['ticks']} ticks ({_fmt((c['overrun_fraction'] or 0) * 100)} %)"),
        ("tick modes", modes or "-"),
        ("policy steps per second", _fmt(p["plans_per_s"])),
        ("plans", str(p["plans"])),
        ("decoder calls per plan", _calls_per_plan(p)),
        ("stale actions skipped per plan", _fmt(p["skipped_actions_mean"])),
        ("plans stale on arrival (held)", str(p.get("stale_plans", 0))),
        ("camera frames per second", _fmt(summary["camera"]["fps"])),
        ("safety trips (besides the exit)", str(sum(t["reason"] != "exit" for t in summary["trips"]))),
    ):
        loop.add_row(key, value)
    if summary.get("frames_too_old"):
        loop.add_row("[yellow]frames too old to plan on (plan.max_frame_age_s)[/]", str(summary["frames_too_old"]))
    if p.get("trace_followed"):
        loop.add_row("plans moved onto their trace (plan.follow_trace)", str(p["trace_followed"]))
    if summary.get("incomplete"):
        loop.add_row("[yellow]events the statistics missed (incomplete)[/]", str(summary["undelivered_events"]))
    if "control_thread" in summary:
        loop.add_row("control thread", summary["control_thread"]["scheduling"])
    if summary.get("memory", {}).get("peak_rss_mb"):
        loop.add_row("peak RSS (VmHWM)", _memory_row(summary["memory"]))
    if "device" in summary:
        loop.add_row("device", Text(summary["device"]["summary"]))       # Text: no markup read in a model name
        for note in summary["device"]["notes"]:
            loop.add_row("[yellow]device note[/]", Text(note, style="yellow"))
    latency = Table(title="latency (ms)")
    for col in ("stage", "n", "p50", "p99", "max"):
        latency.add_column(col, justify="left" if col == "stage" else "right")
    rows = {**summary["stages_ms"], "plan (frame -> plan ready)": p["latency_ms"],
            "frame -> command": summary["frame_to_command_ms"]}
    for stage, s in rows.items():
        latency.add_row(stage, str(s["n"]), _fmt(s["p50"]), _fmt(s["p99"]), _fmt(s["max"]))
    return Group(loop, latency)


def _calls_per_plan(policy: dict) -> str:
    """Decoder calls per plan beside the closed choices the answers had: drafting settles several per call."""
    choices = policy.get("choices_mean")
    if not choices or policy.get("decode_steps_mean") is None:      # no plan, or a policy without a decoder
        return _fmt(None)
    return f"{_fmt(policy['decode_steps_mean'])} for {_fmt(choices)} choices"


def _memory_row(memory: dict) -> str:
    from edgeact.runtime.telemetry import RUNTIME_ROLES

    rss = memory["peak_rss_mb"]
    text = " + ".join(f"{role} {mb:.0f}" for role, mb in rss.items() if role in RUNTIME_ROLES)
    text += f" = {memory['runtime_peak_rss_mb']:.0f} MB"
    if memory["budget_mb"] is not None:
        verdict = "within" if memory["within_budget"] else "OVER"
        text += f" ({verdict} {memory['budget_mb']:.0f} MB = 1.3 x {memory['bundle_mb']:.1f} MB bundle + 300 MB)"
    simulator = [f"{role} {mb:.0f} MB" for role, mb in rss.items() if role not in RUNTIME_ROLES]
    return text + (f"; simulator (not counted): {', '.join(simulator)}" if simulator else "")


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if abs(value) < 1 else f"{value:.2f}" if abs(value) < 100 else f"{value:.1f}"


def _log_to_stderr(level: int) -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


# -- operator inputs -----------------------------------------------------------------------------

@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """`kill PID` stops the robot like Ctrl-C does (into the safe state), not by dying mid-command."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        from edgeact.runtime.errors import Terminated

        raise Terminated

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def estop_missing(config) -> bool:
    """A real robot with no e-stop input configured (it starts, but only Ctrl-C or `kill` stop it)."""
    return config.robot.bus != "sim" and config.estop.file is None and config.estop.key is None


def warn_without_estop(config) -> None:
    """A real robot with no e-stop input configured starts, but not without a word: Ctrl-C is all that stops it."""
    if estop_missing(config):
        logging.getLogger(__name__).warning(
            "no e-stop is configured for this real robot (%s bus): only Ctrl-C or `kill` stop it. Set estop.file (the "
            "robot stops while that file exists: `touch` it from another terminal) and/or "
            "estop.key (a key to press in this terminal, e.g. \"space\") in %s", config.robot.bus, config.source)


def estop_key_required(config) -> bool:
    """A real robot whose only e-stop is the key: without a terminal to press it in, it must not start."""
    return config.estop.key is not None and config.robot.bus != "sim" and config.estop.file is None


class KeyEstop:
    """Sets `event` when `key` is pressed on the terminal at `fd` (stdin); a no-op without a key.

    Without a terminal the key cannot be pressed: `required` (a real robot with no other e-stop)
    refuses to start, else it is only logged. The terminal goes to cbreak mode (keys arrive without
    Enter, Ctrl-C still interrupts) and is restored on exit.
    """

    def __init__(self, key: str | None, event: threading.Event, fd: int | None = None, required: bool = False):
        self.key, self.event, self.required = key, event, required
        self.fd = sys.stdin.fileno() if fd is None and key is not None and _has_stdin() else fd
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._saved = None

    def __enter__(self) -> "KeyEstop":
        if self.key is None:
            return self
        if self.fd is None or not os.isatty(self.fd):
            if self.required:
                from edgeact.runtime.errors import ConfigError

                raise ConfigError(f"the e-stop key {self.key!r} needs a terminal on stdin and there is none (nohup, "
                                  "systemd, ssh without -t): the robot would run with no e-stop. Run it in a terminal "
                                  "(over ssh: `ssh -t`), or set estop.file in the config (`touch` that file to stop)")
            logging.getLogger(__name__).warning("e-stop key %r needs a terminal on stdin; it is OFF for this run "
                                                "(use the e-stop file instead)", self.key)
            return self
        import termios
        import tty

        self._saved = termios.tcgetattr(self.fd)
        tty.setcbreak(self.fd)
        self._thread = threading.Thread(target=self._watch, name="estop-key", daemon=True)
        self._thread.start()
        print(f"e-stop: press {self.key!r}", file=sys.stderr)
        return self

    def _watch(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self.fd], [], [], 0.05)
            if ready:
                data = os.read(self.fd, 64).decode(errors="replace")
                if self.key in data:
                    self.event.set()

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(1.0)
        if self._saved is not None:
            import termios

            termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)


def _has_stdin() -> bool:
    try:
        sys.stdin.fileno()
    except (AttributeError, ValueError, OSError):
        return False
    return True
