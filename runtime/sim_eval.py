"""Closed-loop evaluation on the simulated reference task: seeded episodes per system, success with loop timing.

    systems = eval_systems({"fp32": "out/b32", "int8": "out/b8"}, depths=("generated", "forced"))
    report = evaluate(read_config_dict("robot.json"), systems, EvalOptions(episodes=50, out_dir="out/eval"))

A system is a bundle with a depth source: "generated" (the model decodes the 100 depth codes) or
"forced" (the bundle's depth_tokenizer stage turns the camera's depth into them). Episode i of
every system is the same scene: seed `options.seed + i`, the task's templates in turn.

Two timings:
  realtime  the pipelined loop of `edgeact run` (runtime.loop.run_robot) on the MuJoCo robot in its
            own process, for the episode's time limit: what a robot would do with this computer,
            inference latency and control jitter included. Success is the task's predicate holding
            at some moment of the episode (checked ~10 times per simulated second by the simulator).
  lockstep  the simulator waits while the policy thinks: every `replan_every` actions a new plan from
            the current frame, its first actions executed as the control step interpolates them (the
            mapper's IK per tick), but without the safety layer's per-tick step and velocity limits:
            each tick's joint goals go to the simulated servos, whose own speed profile bounds them. It
            measures the model alone, for precisions this computer cannot run in time (fp8 without
            fp8 kernels) and for quick checks; its control rate is not a robot's, and its "policy
            plans/s" is the policy's own rate on this computer (plans per second of inference), not
            plans per second of episode time as in realtime.
"""
from __future__ import annotations

import copy
import json
import math
import os
import signal
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgeact.runtime.device_info import read_device_info
from edgeact.runtime.errors import ConfigError, EdgeactError
from edgeact.runtime.loop_events import Subscriber

# How the reference task's policies pick action bins (decode_program.ACTION_DECODINGS): the committed reference ARM
# succeeds more often with the median of each bin distribution than with greedy's argmax (README).
REFERENCE_ACTION_DECODING = "median"
EVAL_SEED = 1_000_000          # episode seeds far from the training recordings' (sim-demos counts from its --seed)
TIMINGS = ("realtime", "lockstep")
DEPTH_SOURCES = ("generated", "forced")
# Whose trace each plan carries: the model's own, or the scripted expert's from the arm's current pose
# (forced through trace steering; lockstep only), which leaves only the actions to the model.
TRACE_SOURCES = ("model", "expert")
DEPTH_STAGE = "depth_tokenizer"
# The camera the reference ARM was trained on (drivers.sim.demos.DemoConfig): same size, same rendering.
EVAL_CAMERA_PX = (160, 120)
REPORT_FILE = "eval.json"


@dataclass(frozen=True)
class EvalSystem:
    name: str                   # "int8 / forced depth"
    bundle: Path
    precision: str              # the bundle manifest's
    depth: str                  # one of DEPTH_SOURCES
    allow_unverified: bool = False  # run it although its verification failed (to measure what that costs)
    action_decoding: str = REFERENCE_ACTION_DECODING   # how the policy picks action bins


@dataclass(frozen=True)
class EvalOptions:
    episodes: int
    out_dir: Path
    seed: int = EVAL_SEED
    timing: str = "realtime"
    replan_every: int = 2       # lockstep: actions executed per plan (at most the plan's own: a 1-action bundle's 1)
    sheets: int = 3             # episodes per system that get a PNG sheet (the first ones)
    trace: str = "model"        # one of TRACE_SOURCES
    ensemble: bool | None = None    # plan.ensemble for every system (temporal ensembling); None: the config's
    draft_tokens: int | None = None     # policy.draft_tokens for every system (0: no drafting); None: the config's
    follow_trace: str | None = None     # plan.follow_trace for every system (trace_follow.py); None: the config's

    def __post_init__(self) -> None:
        from edgeact.runtime.trace_follow import FOLLOW_TRACE

        if self.episodes < 1:
            raise ConfigError(f"--episodes: evaluate at least 1 episode, got {self.episodes}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"--seed must be an integer >= 0, got {self.seed!r} (numpy's generators take no "
                              f"negative seed); leave it out for the evaluation seeds ({EVAL_SEED} on)")
        if self.timing not in TIMINGS:
            raise ConfigError(f"--timing {self.timing!r} unknown; use one of {', '.join(TIMINGS)}")
        if self.trace not in TRACE_SOURCES:
            raise ConfigError(f"--trace {self.trace!r} unknown; use one of {', '.join(TRACE_SOURCES)}")
        if self.ensemble is not None and not isinstance(self.ensemble, bool):
            raise ConfigError(f"ensemble: true, false or null (the config's), got {self.ensemble!r}")
        if self.follow_trace is not None and self.follow_trace not in FOLLOW_TRACE:
            raise ConfigError(f"--follow-trace {self.follow_trace!r} unknown; use one of {', '.join(FOLLOW_TRACE)}")
        if self.draft_tokens is not None and (isinstance(self.draft_tokens, bool)
                                              or not isinstance(self.draft_tokens, int) or self.draft_tokens < 0):
            raise ConfigError(f"--draft-tokens: an integer >= 0 (0 turns drafting off: a decoder call per choice), "
                              f"got {self.draft_tokens!r}")
        if self.trace == "expert" and self.timing != "lockstep":
            raise ConfigError("--trace expert steers each plan from the simulator's state, which only the lockstep "
                              "evaluation reads between plans; add --timing lockstep")
        if not 1 <= self.replan_every <= 64 or self.sheets < 0:
            raise ConfigError(f"--replan-every must be in [1, 64] and --sheets >= 0; got {self.replan_every}, "
                              f"{self.sheets}")


LATE = "succeeded after the time limit"      # a realtime episode's failure that is no end-state failure
STALL = "control loop stalled: the watchdog put the robot safe"     # likewise: the machine, not the policy


@dataclass
class EpisodeResult:
    system: str
    index: int
    seed: int
    template: str
    instruction: str
    success: bool
    episode_s: float                        # time to the first success, else the episode's limit
    time_limit_s: float
    plans: int
    policy_hz: float | None                 # realtime: plans per second of episode time; lockstep: per second of
                                            # inference (the policy's own rate here; the episode waits for it)
    decode_steps_mean: float | None
    control_hz: float | None                # realtime only
    period_error_p99_ms: float | None       # realtime only
    trips: int = 0                          # safety trips besides the safe state at the end
    stop: str = ""
    sheet: str | None = None
    # The end state (the named block's displacement, the end effector to its top face, the most another block
    # moved) and, for a failed episode, why: drivers/sim/task.py Outcome.to_dict.
    outcome: dict[str, Any] | None = None
    sim_lag_skips: int = 0                  # realtime only: the physics skipped ahead (fell behind the wall clock)

    @property
    def failure(self) -> str | None:
        return None if self.success or self.outcome is None else self.outcome["failure"]


@dataclass
class EvalReport:
    systems: list[EvalSystem]
    options: EvalOptions
    episodes: list[EpisodeResult] = field(default_factory=list)
    complete: bool = False          # every system ran every episode
    interrupted: bool = False       # stopped (Ctrl-C, the robot's e-stop, an error): `episodes` are the finished ones
    error: str | None = None        # what stopped it, where an error did: "TypeName: message"
    draft_tokens: dict[str, int] = field(default_factory=dict)     # each system's policy.draft_tokens (evaluate's)
    follow_trace: str = "never"     # plan.follow_trace of every system (evaluate's: the config's or the option's)
    device: dict[str, Any] = field(default_factory=dict)   # device_info.DeviceInfo.to_dict() of the machine it ran on

    def __post_init__(self) -> None:
        # rows() and the episodes find their system by name
        twice = sorted(name for name, n in Counter(s.name for s in self.systems).items() if n > 1)
        if twice:
            raise ConfigError(f"system {twice[0]!r} appears twice in the evaluation; each system needs its own name "
                              "(one --bundle NAME per bundle, each --depth source once)")
        by_slug: dict[str, list[str]] = {}
        for s in self.systems:      # the sheets' file names: one system's would replace another's
            by_slug.setdefault(_slug(s.name), []).append(s.name)
        alike = next((names for names in by_slug.values() if len(names) > 1), None)
        if alike:
            raise ConfigError(f"systems {' and '.join(map(repr, alike))} differ only in punctuation, and their episode "
                              f"sheets would share file names ({_slug(alike[0])}_NNN.png); give the bundles names "
                              "that differ in letters or digits")

    def rows(self) -> list[dict[str, Any]]:
        """One summary row per system: success rate (overall and per template) and the timing means; decode steps
        are a mean per plan over all the system's plans (an episode's mean weighs as many plans as it made)."""
        rows = []
        for system in self.systems:
            eps = [e for e in self.episodes if e.system == system.name]
            if not eps:
                continue
            wins = [e for e in eps if e.success]
            per_template: dict[str, list[int]] = {}
            for e in eps:
                per_template.setdefault(e.template, [0, 0])
                per_template[e.template][0] += e.success
                per_template[e.template][1] += 1
            rows.append({
                "system": system.name, "precision": system.precision, "depth": system.depth,
                "action_decoding": system.action_decoding, "trace": self.options.trace,
                "follow_trace": self.follow_trace,
                "draft_tokens": self.draft_tokens.get(system.name),
                "bundle": str(system.bundle), "episodes": len(eps), "successes": len(wins),
                "success_rate": len(wins) / len(eps), "per_template": per_template,
                "episode_s_mean": _mean([e.episode_s for e in wins]),
                "control_hz_mean": _mean([e.control_hz for e in eps]),
                "period_error_p99_ms_max": _max([e.period_error_p99_ms for e in eps]),
                "policy_hz_mean": _mean([e.policy_hz for e in eps]),
                "decode_steps_mean": _per_plan([(e.decode_steps_mean, e.plans) for e in eps]),
                "trips": sum(e.trips for e in eps),
                "failures": dict(Counter(e.failure for e in eps if e.failure is not None).most_common()),
            })
        return rows

    def to_dict(self) -> dict[str, Any]:
        return {"schema": "edgeact.eval/1", "complete": self.complete, "interrupted": self.interrupted,
                "error": self.error, "options": {**asdict(self.options), "out_dir": str(self.options.out_dir)},
                "device": self.device, "systems": self.rows(), "episodes": [asdict(e) for e in self.episodes]}

    def write_json(self, path: Path) -> Path:
        """Write via a hidden temporary + os.replace: an interrupt never leaves a truncated report."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.partial")
        tmp.write_text(json.dumps(self.to_dict(), indent=1, allow_nan=False) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        return path


class EvalInterrupted(KeyboardInterrupt):
    """An evaluation stopped by Ctrl-C (or the robot's e-stop); `report` holds the episodes that finished and is
    written with "interrupted": true."""

    def __init__(self, message: str, report: EvalReport):
        super().__init__(message)
        self.report = report


class InterruptedAfterEpisode(KeyboardInterrupt):
    """Ctrl-C came while a finished episode's robot stack was taken down: `result` is complete (the task was read
    before the teardown), so it counts; then the evaluation stops."""

    def __init__(self, message: str, result: EpisodeResult, terminated: bool = False):
        super().__init__(message)
        self.result = result
        self.terminated = terminated        # SIGTERM (a service manager's stop, `kill`), not Ctrl-C


def episode_plan(episodes: int, seed: int) -> list[tuple[int, str]]:
    """(seed, template) of each episode: seed + i, the task's templates in turn."""
    from edgeact.drivers.sim.task import TEMPLATES

    names = list(TEMPLATES)
    return [(seed + i, names[i % len(names)]) for i in range(episodes)]


def eval_systems(bundles: dict[str, str | Path], depths: tuple[str, ...] | list[str],
                 allow_unverified: bool = False,
                 action_decoding: str = REFERENCE_ACTION_DECODING) -> list[EvalSystem]:
    """The systems to compare: each named bundle with each depth source (checked: exists, verified unless
    `allow_unverified`, has the depth stage for "forced"), all decoding actions the same way."""
    from edgeact.runtime.bundle import load_bundle
    from edgeact.runtime.decode_program import ACTION_DECODINGS

    if action_decoding not in ACTION_DECODINGS:
        raise ConfigError(f"--action-decoding {action_decoding!r} unknown; use one of {', '.join(ACTION_DECODINGS)}")

    if not bundles:
        raise ConfigError("no bundle to evaluate: give --bundle NAME=PATH (or a config whose policy is a bundle)")
    unknown = sorted(set(depths) - set(DEPTH_SOURCES))
    if unknown or not depths:
        raise ConfigError(f"--depth {unknown or '(none)'}: use {' and/or '.join(DEPTH_SOURCES)}")
    twice = sorted(depth for depth, n in Counter(depths).items() if n > 1)
    if twice:
        raise ConfigError(f"--depth {twice[0]} is given twice ({' '.join(depths)}); name each depth source once, "
                          f"e.g. --depth {' '.join(dict.fromkeys(depths))}")
    systems = []
    for name, path in bundles.items():
        try:    # every file hashed now: a corrupt bundle is refused before any system runs, not after the others
            bundle = load_bundle(path, verify_checksums=True, allow_failed_verification=allow_unverified)
        except EdgeactError as exc:
            raise _in_context(exc, f"--bundle {name}={path}") from None
        for depth in depths:
            if depth == "forced" and not has_depth_stage(bundle):
                raise ConfigError(f"bundle {path} has no {DEPTH_STAGE} stage, so its depth cannot be forced; add one "
                                  "with `edgeact add-depth-tokenizer` or evaluate --depth generated")
            systems.append(EvalSystem(f"{name} / {depth} depth", Path(path).resolve(),
                                      bundle_precision(bundle.manifest), depth, allow_unverified, action_decoding))
    return systems


def has_depth_stage(bundle) -> bool:
    """Whether a bundle (a loaded Bundle or its directory) can force depth from the camera."""
    from edgeact.runtime.bundle import read_manifest

    # The manifest alone: whether the bundle may load (its verification, its files) is the policy's to say.
    manifest = read_manifest(bundle) if isinstance(bundle, (str, Path)) else bundle.manifest
    return DEPTH_STAGE in manifest.stages


def bundle_precision(manifest) -> str:
    """The decoder stage's precision (what the quantizer made of the bundle), e.g. "fp32", "int8"."""
    decoder = manifest.stages.get("decoder")
    return decoder.precision if decoder is not None else "?"


def _clear_sheets(folder: Path) -> None:
    """Remove the episode sheets an earlier eval into the same --out wrote (SYSTEM_NNN.png); nothing else."""
    if folder.is_dir():
        for sheet in folder.glob("*_[0-9][0-9][0-9].png"):
            sheet.unlink(missing_ok=True)


def evaluate(base_config: dict[str, Any], systems: list[EvalSystem], options: EvalOptions,
             progress: Callable[[str, int, EpisodeResult], None] | None = None, source: str = "<eval>") -> EvalReport:
    """Every system on the same seeded episodes; `progress(system, index, result)` after each episode.

    The report (options.out_dir / REPORT_FILE) is written at once, replacing an older run's, with "complete": false
    and no episodes; then after every episode; at the end with "complete": true. An interrupt writes it once more
    with "interrupted": true and raises EvalInterrupted, which carries it. Any other error writes it with
    "interrupted": true and "error" (else it would read as a run still going), and is raised again.
    """
    from edgeact.runtime.decode_program import DEFAULT_DRAFT_TOKENS

    report = EvalReport(systems, options, device=read_device_info().to_dict())   # real-time figures are the machine's
    path = options.out_dir / REPORT_FILE
    plan = episode_plan(options.episodes, options.seed)
    if options.ensemble is not None:
        base_config = {**base_config, "plan": {**(base_config.get("plan") or {}), "ensemble": options.ensemble}}
    if options.follow_trace is not None:
        base_config = {**base_config, "plan": {**(base_config.get("plan") or {}), "follow_trace": options.follow_trace}}
    report.follow_trace = (base_config.get("plan") or {}).get("follow_trace", "never")
    if options.draft_tokens is not None:    # another type's policy section gives way to the systems' bundle policy
        policy = base_config.get("policy") or {}
        policy = policy if policy.get("type") in (None, "bundle") else {}
        base_config = {**base_config, "policy": {**policy, "draft_tokens": options.draft_tokens}}
    report.draft_tokens = {s.name: system_config_dict(base_config, s)["policy"].get("draft_tokens",
                                                                                   DEFAULT_DRAFT_TOKENS)
                           for s in systems}
    where = ""      # the system (and episode) running: named in an error
    try:
        report.write_json(path)
        _clear_sheets(options.out_dir / "sheets")     # an older run's sheets would pass for this one's
        for system in systems:
            where = f"system {system.name!r} (bundle {system.bundle})"
            runner = (RealtimeRunner(base_config, system, source) if options.timing == "realtime"
                      else LockstepRunner(base_config, system, options.replan_every, source, trace=options.trace))
            try:
                for index, (seed, template) in enumerate(plan):
                    where = f"system {system.name!r} (bundle {system.bundle}), episode {index} (seed {seed})"
                    sheet = options.out_dir / "sheets" / f"{_slug(system.name)}_{index:03d}.png" \
                        if index < options.sheets else None
                    try:
                        result = runner.episode(index, seed, template, sheet)
                    except InterruptedAfterEpisode as late:
                        report.episodes.append(late.result)     # written as interrupted, below
                        raise
                    report.episodes.append(result)
                    report.write_json(path)    # after every episode: an interrupt keeps them
                    if progress is not None:
                        progress(system.name, index, result)
            finally:
                runner.close()
    except KeyboardInterrupt as exc:
        report.interrupted = True
        report.write_json(path)
        raise EvalInterrupted(str(exc), report) from exc
    except Exception as exc:    # the policy's process died, a teardown failed, the simulator refused: stopped too
        report.interrupted, report.error = True, f"{where + ': ' if where else ''}{type(exc).__name__}: {exc}"
        report.write_json(path)
        if where and isinstance(exc, EdgeactError):
            raise _in_context(exc, where) from exc
        raise
    report.complete = True
    report.write_json(path)
    return report


def _in_context(exc: EdgeactError, where: str) -> EdgeactError:
    """The same kind of error, its message led by where it happened (which bundle, system, episode)."""
    try:
        return type(exc)(f"{where}: {exc}")
    except Exception:       # a subclass built otherwise: the plain kind
        return EdgeactError(f"{where}: {exc}")


def system_config_dict(base: dict[str, Any], system: EvalSystem) -> dict[str, Any]:
    """The robot config with this system's bundle and depth source, and the camera at the trained size."""
    data = copy.deepcopy(base)
    policy = dict(data.get("policy") or {})
    if policy.get("type") not in (None, "bundle"):
        policy = {}
    policy.update({"type": "bundle", "path": str(system.bundle),
                   "forced_depth": "sensor" if system.depth == "forced" else None,
                   "allow_unverified": system.allow_unverified, "action_decoding": system.action_decoding})
    data["policy"] = policy
    # Each episode answers its own instruction (lockstep passes it; realtime sets it per episode): a config without
    # one is still a config to evaluate, and a bundle policy's config must name one to load.
    data["instruction"] = data.get("instruction") or "the episode's own"
    camera = dict(data.get("camera") or {})
    if camera.get("type") != "mujoco":
        raise ConfigError(f"camera.type is {camera.get('type')!r}: the evaluation needs the MuJoCo robot's camera "
                          "(type 'mujoco'); start from `edgeact eval --write-config PATH`")
    camera["width"], camera["height"] = EVAL_CAMERA_PX
    data["camera"] = camera
    return data


class RealtimeRunner:
    """Episodes through `run_robot`: the whole robot stack (simulator, camera and policy processes) per episode."""

    def __init__(self, base: dict[str, Any], system: EvalSystem, source: str):
        if (base.get("robot") or {}).get("physics") != "mujoco":
            raise ConfigError("robot.physics must be 'mujoco' for the evaluation (the task lives in the MuJoCo "
                              "world); start from `edgeact eval --write-config PATH`")
        if (base.get("robot") or {}).get("sim_process") is False:
            raise ConfigError("robot.sim_process is false: real-time evaluation reads each episode's task from the "
                              "simulator's own process; remove robot.sim_process, or evaluate with --timing lockstep")
        self.base, self.system, self.source = system_config_dict(base, system), system, source

    def episode(self, index: int, seed: int, template: str, sheet: Path | None) -> EpisodeResult:
        from edgeact.drivers.sim.task import sample_episode
        from edgeact.runtime.loop import run_robot
        from edgeact.runtime.robot_config import robot_config_from_dict
        from edgeact.runtime.sim_robot import episode_config_dict
        from edgeact.runtime.telemetry import TimingStats

        episode = sample_episode(seed, template)
        config = robot_config_from_dict(episode_config_dict(self.base, seed, template), source=self.source)
        stats, first = TimingStats(config.rates.control_hz), FirstPlan()
        result = run_robot(config, episode.time_limit_s, [stats, first])
        stopped = result.reason in ("interrupt", "estop")
        failed = result.error is not None or result.teardown_error is not None
        if stopped or (result.interrupted_late and failed):     # the operator stopped it: so do we
            from edgeact.runtime.errors import Terminated
            from edgeact.runtime.loop import terminated

            late = signal.Signals(result.late_signal).name if result.late_signal else ""
            raise (Terminated if terminated(result) else KeyboardInterrupt)(
                f"episode {index} stopped: {result.reason} ({result.detail})"
                + (f"; {late} during its teardown" if result.interrupted_late else ""))
        if result.error is not None:
            raise result.error
        if result.teardown_error is not None:   # the simulated robot did not come down cleanly: no episode to trust
            raise result.teardown_error
        out = realtime_result(self.system.name, index, result.task, stats, result.reason)
        if sheet is not None and first.plan is not None:
            _draw_sheet(out, lambda: episode_sheet_from_run(sheet, result.task, first.plan, stats, out))
        if result.interrupted_late:     # Ctrl-C only during the teardown: the episode finished (its task was read)
            from edgeact.runtime.loop import terminated

            raise InterruptedAfterEpisode(f"episode {index} finished; {signal.Signals(result.late_signal).name} during "
                                          "its teardown", out, terminated(result))
        return out

    def close(self) -> None:
        pass


def realtime_result(system: str, index: int, task: dict[str, Any] | None, stats, stop: str) -> EpisodeResult:
    """An episode run by the loop, from the simulator's task report and the loop's TimingStats."""
    if not task:
        raise ConfigError("the run has no task report: the robot config needs robot.task (an episode) and "
                          "the MuJoCo robot (robot.physics 'mujoco')")
    episode = task["episode"]
    limit_s = float(episode["time_limit_s"])
    first_success = task.get("first_success_s")
    success = first_success is not None and first_success <= limit_s
    late = first_success is not None and not success
    summary = stats.summary()
    outcome = _episode_outcome(task["outcome"], success, late, episode["template"])
    if stop == "stall" and not success:     # the robot was put safe mid-episode: the machine's failure, said so
        outcome = {**outcome, "failure": STALL}
    return EpisodeResult(system, index, int(episode["seed"]), episode["template"], episode["instruction"], success,
                         float(first_success) if success else limit_s, limit_s, stats.plans,
                         _per_s(stats.plans, limit_s), summary["policy"]["decode_steps_mean"],
                         summary["control"]["achieved_hz"], summary["control"]["period_error_ms"]["p99"],
                         sum(t["reason"] != "exit" for t in stats.trips), stop,
                         outcome=outcome,
                         sim_lag_skips=int(task.get("sim_lag_skips", 0)))


def _episode_outcome(end: dict[str, Any], success: bool, late: bool, template: str) -> dict[str, Any]:
    """The end state of a simulator's task report as the episode's: no failure where the episode succeeded on the
    way (the state may have changed since); a success judged only after the time limit (`late`: the run's last
    judgement) is one; and a move_to whose predicate holds at the end but was never judged a success was over the
    block for less than the dwell (a push's predicate is a success the moment it holds)."""
    from edgeact.drivers.sim.task import dwell_failure

    if success:
        return {**end, "failure": None}
    if end["failure"] is not None:
        return end
    if late:
        return {**end, "failure": LATE}
    return {**end, "failure": dwell_failure()} if template == "move_to" else end


def episode_sheet_from_run(path: Path, task: dict[str, Any], plan, stats, result: EpisodeResult | None = None) -> Path:
    """The sheet of an episode the loop ran: the scene as reset (about the first plan's frame), plan, timing."""
    from edgeact.drivers.sim.task import Episode

    e = task["episode"]
    result = result or realtime_result("demo", 0, task, stats, "")
    episode = Episode(int(e["seed"]), e["template"], e["colour"], e["instruction"],
                      {body: np.asarray(p, dtype=float) for body, p in e["block_positions_m"].items()},
                      dict(e["block_yaws_rad"]), dict(e["arm_start_rad"]), float(e["time_limit_s"]))
    frame = _initial_frame(episode)
    return _sheet(Path(path), result, frame, plan, np.asarray(stats.period_s) * 1e3, np.asarray(stats.step_s) * 1e3)


class LockstepRunner:
    """Episodes in this process: the world waits while `policy.infer` runs (unless given, the system's bundle as
    realtime builds it from the config's policy section, every option included, but in this process)."""

    def __init__(self, base: dict[str, Any], system: EvalSystem, replan_every: int, source: str, policy=None,
                 trace: str = "model"):
        from edgeact.drivers.cameras.mujoco_camera import MujocoRgbdRenderer
        from edgeact.drivers.sim.expert import ActionExecutor, ExpertConfig
        from edgeact.drivers.sim.mujoco_robot import MujocoWorld
        from edgeact.runtime.loop import trace_follower
        from edgeact.runtime.policy import PolicyContext
        from edgeact.runtime.robot_config import robot_config_from_dict

        config = robot_config_from_dict(system_config_dict(base, system), source=source)
        self.system, self.replan_every, self.trace = system, replan_every, trace
        self.ensemble = config.plan.ensemble
        self.mapper = config.actions.make_mapper(list(config.robot.motors))
        self.expert = ExpertConfig(action_rate_hz=config.rates.action_rate_hz, control_hz=config.rates.control_hz)
        self._executor_type = ActionExecutor
        self.world = MujocoWorld()
        self.renderer = MujocoRgbdRenderer(self.world, config.camera.camera, *EVAL_CAMERA_PX)
        self.follower = trace_follower(config, self.mapper, self.renderer.intrinsics)  # plan.follow_trace, as the loop
        try:        # make_policy, not make_robot_policy: no child process, the world waits for this one
            self.policy = policy if policy is not None else config.policy.make_policy(PolicyContext(
                config.rates.action_rate_hz, tuple(config.robot.motors), config.config_dir, self.renderer.intrinsics))
        except BaseException:
            self.renderer.close()
            raise

    def episode(self, index: int, seed: int, template: str, sheet: Path | None) -> EpisodeResult:
        from edgeact.drivers.sim.task import SuccessJudge
        from edgeact.drivers.sim.task import evaluate as task_outcome
        from edgeact.drivers.sim.task import reset_world, sample_episode
        from edgeact.runtime.ensemble import ActionEnsemble
        from edgeact.runtime.policy import Plan

        episode = sample_episode(seed, template)
        reset_world(self.world, episode)
        if hasattr(self.policy, "forget_draft"):
            self.policy.forget_draft()         # the last episode's answers are of another scene
        if self.follower is not None:
            self.follower.forget()             # nor is its trace a path steered again
        executor = self._executor_type(self.world, self.mapper, self.expert)
        plan, steer = self._steering(episode, executor) if self.trace == "expert" else (None, None)
        limit = int(round(episode.time_limit_s * self.expert.action_rate_hz))
        done, plans, steps, step_s, first_plan, first_frame = 0, 0, [], [], None, None
        success_at: float | None = None
        judge = SuccessJudge.for_episode(episode)
        rate = self.expert.action_rate_hz
        ensemble = ActionEnsemble(rate) if self.ensemble else None
        while done < limit and success_at is None:
            rgb, depth_m = self.renderer.render()[:2]
            start = time.perf_counter()
            steering = {} if steer is None else {"trace": steer()}
            result = self.policy.infer(rgb, episode.instruction, depth_m=depth_m, **steering)
            step_s.append(time.perf_counter() - start)
            plans += 1
            steps.append(result.decode_steps)
            if first_plan is None:
                first_plan, first_frame = result, rgb
            # As the loop's planner: the trace followed from the joints at the frame, then the ensemble (the
            # simulator's clock: action k of the episode starts at k / rate).
            chunk = Plan(result.actions, result.actions_normalized, result.trace_px, None, done / rate, done / rate,
                         trace_forced=bool(getattr(result, "trace_forced", False)))
            if self.follower is not None:
                chunk = self.follower.apply(chunk, executor.commanded_rad)
            if ensemble is not None:
                chunk = ensemble.merge(chunk)
            for action in chunk.actions[:self.replan_every]:
                executor.execute(action)
                if plan is not None:
                    plan.observe(executor.commanded_pose().position_m)
                done += 1
                success_at = judge.update(done / rate, task_outcome(self.world, episode).success)
                if success_at is not None:
                    break
        out = EpisodeResult(self.system.name, index, seed, template, episode.instruction, success_at is not None,
                            success_at if success_at is not None else episode.time_limit_s, episode.time_limit_s,
                            plans, _per_s(plans, sum(step_s)), _mean(steps), None, None, stop="lockstep",
                            outcome=task_outcome(self.world, episode).to_dict(template,
                                                                              succeeded=success_at is not None))
        if sheet is not None and first_plan is not None:
            _draw_sheet(out, lambda: _sheet(sheet, out, first_frame, first_plan, np.zeros(0), np.asarray(step_s) * 1e3))
        return out

    def _steering(self, episode, executor) -> tuple[Any, Callable[[], list[list[int]]]]:
        """The expert's plan (to `observe` each executed action) and the trace of its next actions from the arm's
        current pose, in this camera's image, as the demonstrations record it (drivers/sim/demos.py)."""
        from edgeact.drivers.sim.demos import OPTICAL_SITE, DemoConfig, commanded_trace
        from edgeact.drivers.sim.expert import ExpertSteering

        plan, horizon = ExpertSteering(episode, self.expert), DemoConfig().trace_horizon_actions

        def trace() -> list[list[int]]:
            positions = plan.chunk(self.mapper, executor.commanded_rad, horizon)[0]
            camera = self.world.site_pose(OPTICAL_SITE)     # now's: pushes move the base a little
            return commanded_trace(self.world, positions, horizon, camera, self.renderer.intrinsics).tolist()
        return plan, trace

    def close(self) -> None:
        self.renderer.close()
        self.policy.close()


class FirstPlan(Subscriber):
    """A loop subscriber keeping the episode's first plan (for the sheet)."""

    plan = None

    def on_plan(self, event) -> None:
        if self.plan is None:
            self.plan = event.plan


def _initial_frame(episode) -> np.ndarray:
    """The camera's view of the episode's first moment (the first plan was made from about this frame)."""
    from edgeact.drivers.cameras.mujoco_camera import MujocoRgbdRenderer
    from edgeact.drivers.sim.mujoco_robot import MujocoWorld
    from edgeact.drivers.sim.task import reset_world

    world = MujocoWorld()
    reset_world(world, episode)
    renderer = MujocoRgbdRenderer(world, "front", *EVAL_CAMERA_PX)
    try:
        return renderer.render()[0]
    finally:
        renderer.close()


def _draw_sheet(result: EpisodeResult, draw: Callable[[], Path]) -> None:
    """Draw a finished episode's sheet into result.sheet; a Ctrl-C meanwhile keeps the episode (it finished)."""
    try:
        result.sheet = str(draw())
    except KeyboardInterrupt as exc:
        from edgeact.runtime.errors import Terminated

        sigterm = isinstance(exc, Terminated)
        raise InterruptedAfterEpisode(f"episode {result.index} finished; {'SIGTERM' if sigterm else 'Ctrl-C'} while "
                                      "its sheet was drawn", result, sigterm) from None


def _sheet(path: Path, result: EpisodeResult, frame: np.ndarray, plan, period_ms: np.ndarray,
           step_ms: np.ndarray) -> Path:
    from edgeact.runtime.eval_sheet import episode_sheet

    return episode_sheet(path, result, frame, plan, period_ms, step_ms)


def _slug(name: str) -> str:
    return "-".join("".join(c if c.isalnum() else " " for c in name).split())


def _per_s(count: int, seconds: float) -> float | None:
    return round(count / seconds, 4) if seconds > 0 else None


def _mean(values) -> float | None:
    kept = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return round(sum(kept) / len(kept), 4) if kept else None


def _per_plan(means_and_plans) -> float | None:
    """The mean per plan of per-episode means, each weighed by its episode's plans."""
    kept = [(float(m), n) for m, n in means_and_plans if m is not None and math.isfinite(float(m)) and n > 0]
    plans = sum(n for _, n in kept)
    return round(sum(m * n for m, n in kept) / plans, 4) if plans else None


def _max(values) -> float | None:
    kept = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return max(kept) if kept else None
