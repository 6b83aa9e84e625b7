"""The pipelined perception -> plan -> act loop: a planner thread, a paced control thread, a supervisor.

    camera thread   (Camera's own)   keeps the newest frame
    planner thread  newest frame + last joint read -> policy.step -> the current plan
    control thread  every 1/control_hz: read joints, follow the plan, send through the SafetyGuard
    supervisor      (the caller's thread) watches the control heartbeat, the e-stop, errors, Ctrl-C

The control thread never waits for the model: it follows whatever plan is newest (see
control.ChunkFollower). Every way out - the duration, Ctrl-C, an exception in any thread, a
subscriber failing, the e-stop, a stalled control thread - ends in the robot's safe state, and
every event reaches the subscribers (the StopEvent, then the trips of the teardown, come last).
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Callable

from edgeact.drivers.cameras.base import Camera, RGBDFrame
from edgeact.drivers.motors.safety import EStopLatchedError, SafetyGuard, StartRefusedError
from edgeact.runtime.control import ActionMapper, ChunkFollower
from edgeact.runtime.errors import ConfigError, OutputLostError, Terminated
from edgeact.runtime.ensemble import ActionEnsemble
from edgeact.runtime.loop_events import CommandEvent, EventHub, FrameEvent, OverrunEvent, PlanEvent, StopEvent
from edgeact.runtime.policy import Observation, Plan, Policy

if TYPE_CHECKING:
    from edgeact.runtime.robot_config import RobotConfig
    from edgeact.runtime.trace_follow import TraceFollower

log = logging.getLogger(__name__)

STOP_REASONS = ("duration", "interrupt", "stopped", "estop", "stall", "error")
CLEAN_REASONS = ("duration", "interrupt", "stopped")
JOIN_S = 2.0            # how long to wait for a thread to finish its step at the end
SAFE_STATE_WAIT_S = 3.0  # how long a stuck driver may delay the safe state before we say "cut power"
STALE_WARN_EVERY_S = 5.0  # frames too old to plan on: said at once, then at most this often


@dataclass(frozen=True)
class LoopSettings:
    control_hz: float = 100.0
    action_rate_hz: float = 10.0
    plan_max_age_s: float = 1.5
    max_frame_age_s: float = 0.25
    control_stall_s: float = 0.5
    instruction: str = ""
    supervise_s: float = 0.01           # how often the supervisor looks
    control_priority: int | None = None  # SCHED_FIFO priority asked for the control thread (best effort); None: don't
    ensemble: bool = False              # follow the mean of the plans' predictions per action slot (ensemble.py)

    def __post_init__(self) -> None:
        """Each field is checked on its own, here, before a run turns the torque on; a bad one is named with the fix."""
        def positive(name: str, what: str) -> float:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value)
                                                                                     and value > 0):
                raise ConfigError(f"LoopSettings.{name}: must be a finite number > 0 ({what}), got {value!r}")
            return value

        control_hz = positive("control_hz", "control ticks per second, e.g. 100")
        action_rate_hz = positive("action_rate_hz", "actions per second of the policy's chunks, e.g. 10")
        if action_rate_hz > control_hz:
            raise ConfigError(f"LoopSettings.action_rate_hz: {action_rate_hz:g} is above control_hz "
                              f"({control_hz:g}); each action must span at least one control tick: lower it to "
                              f"at most {control_hz:g}")
        plan_max_age_s = positive("plan_max_age_s", "hold once a plan's observation is older than this, e.g. 1.5")
        check_plan_max_age(plan_max_age_s, action_rate_hz, "LoopSettings.plan_max_age_s", "action_rate_hz")
        positive("max_frame_age_s", "the planner waits for a newer frame than this, e.g. 0.25")
        control_stall_s = positive("control_stall_s", "the control thread silent this long stops the run, e.g. 0.5")
        supervise_s = positive("supervise_s", "how often the supervisor looks, e.g. 0.01")
        if supervise_s >= control_stall_s:
            raise ConfigError(f"LoopSettings.supervise_s: {supervise_s:g} s is not under control_stall_s "
                              f"({control_stall_s:g} s): a stalled control thread would go unseen that long; "
                              f"lower it (e.g. 0.01)")


def check_plan_max_age(max_age_s: float, action_rate_hz: float, where: str, rate_name: str) -> None:
    """Refuse a plan age limit under one action period. A plan is held once its observation is older than the
    limit, and it arrives one inference after its observation: under one action period not even its first action
    runs to its end, and with a model's latency (longer than that) every plan is stale on arrival: the robot holds
    the whole run."""
    period_s = 1.0 / action_rate_hz
    if max_age_s < period_s:
        raise ConfigError(f"{where}: {max_age_s:g} s is under one action period ({period_s:.3f} s at {rate_name} "
                          f"{action_rate_hz:g}): every plan would be stale on arrival and the robot would hold the "
                          f"whole run; raise it to at least the policy's latency plus one action period (default 1.5)")


@dataclass(frozen=True)
class RunResult:
    reason: str                         # one of STOP_REASONS
    detail: str
    duration_s: float
    ticks: int
    plans: int
    overruns: int
    stale_frames: int
    error: BaseException | None = None
    control_scheduling: str = ""        # what the control thread ran under: "SCHED_FIFO 50", or normal and why
    peak_rss_bytes: dict[str, int] = field(default_factory=dict)   # process role ("control", "policy", "sim") -> VmHWM
    task: dict | None = None            # the simulated task's report at the end (sim_mujoco.TaskTracker); None: no task
    stale_plans: int = 0                # plans older than plan_max_age_s when they arrived: not followed (the robot held)
    teardown_error: BaseException | None = None     # taking the robot down failed after the run (e.g. torque off
                                                    # unconfirmed: motors without power); the run's numbers stand
    undelivered_events: int = 0         # events the subscribers never got (too far behind): their summary is incomplete
    interrupted_late: bool = False      # Ctrl-C / SIGTERM came during the teardown (deferred): the caller stops too
    late_signal: int | None = None      # the last of them (signal.SIGINT or signal.SIGTERM)
    motors_at_exit: str = ""            # what the run left the motors in (motors_at_exit()); "" where not known
    shadow_withheld: int | None = None  # a shadow run (nothing written to the motors): the writes withheld
    tick_span_s: float = math.nan       # from the first control tick's start to the last's (exact, as ticks is)

    @property
    def clean(self) -> bool:
        return self.reason in CLEAN_REASONS


class RobotLoop:
    """One run of the loop on a connected SafetyGuard and camera; the caller owns their life."""

    def __init__(self, robot: SafetyGuard, camera: Camera, policy: Policy, mapper: ActionMapper,
                 settings: LoopSettings, hub: EventHub, clock: Callable[[], float] = time.monotonic,
                 trace_follower: "TraceFollower | None" = None):
        """`trace_follower` (plan.follow_trace) moves each plan's translations onto its trace, in the planner's
        thread, from the joint positions the plan's observation carried; before the ensemble merges it."""
        self.robot, self.camera, self.policy, self.mapper = robot, camera, policy, mapper
        self.trace_follower = trace_follower
        self.settings, self.hub, self.clock = settings, hub, clock
        self.ticks = self.plans = self.overruns = self.stale_frames = self.stale_plans = 0
        self.first_tick_s = self.last_tick_s = math.nan
        self._stop = threading.Event()
        self._stale_warned_s: float | None = None
        self._ended: tuple[str, str, BaseException | None] | None = None    # the first reason to stop wins
        self._ended_lock = threading.Lock()
        self._plan: Plan | None = None          # swapped whole: readers never see half a plan
        self._proprio: dict[str, float] | None = None
        self._heartbeat_s = math.nan
        self.control_scheduling = "not started"
        self._started = self._finished = False
        self._frames_lock = threading.Lock()

    # -- the run ---------------------------------------------------------------------------------
    def run(self, duration_s: float | None = None, progress: Callable[[float], None] | None = None) -> RunResult:
        """Run until `duration_s` passes or something stops it; the robot ends in its safe state."""
        if self._started:
            raise RuntimeError("a RobotLoop runs once; build a new one for the next run")
        self._started = True
        self.camera.add_listener(self._on_frame)
        start_s = self.clock()
        threads: list[threading.Thread] = []
        try:        # from the torque on: a Ctrl-C or SIGTERM at any moment ends as "interrupt", in the safe state
            self.robot.enable_torque()      # first: it clears a Damiao motor's "communication lost" from a dead host
            initial = self.robot.read_state()
            self.robot.check_start_positions(initial.position_rad)     # before the first command; holding, not moving
            self._proprio = dict(initial.position_rad)
            follower = ChunkFollower(self.mapper, self.settings.action_rate_hz, self.settings.plan_max_age_s,
                                     initial.position_rad)
            self._heartbeat_s = self.clock()
            threads = [threading.Thread(target=self._guarded, args=(self._control, follower), name="loop-control",
                                        daemon=True),
                       threading.Thread(target=self._guarded, args=(self._planner,), name="loop-planner",
                                        daemon=True)]
            for thread in threads:
                thread.start()
            self._supervise(start_s, duration_s, progress)
        except KeyboardInterrupt as exc:
            self._end("interrupt", "SIGTERM" if isinstance(exc, Terminated) else "Ctrl-C")
        except EStopLatchedError as exc:       # e.g. pressed while the policy loaded: enable_torque refuses
            self._end("estop", _latched_detail(exc))
        except StartRefusedError as exc:    # a joint outside its limits: its message is the whole story
            # Nothing was commanded, and the person is told to move the joint by hand: torque off now, whatever
            # robot.disable_torque_on_exit keeps at the end.
            try:
                self.robot.disable_torque()
            except Exception:
                log.exception("turning torque off after the refused start failed")
            self._end("error", f"{type(exc).__name__}: {exc}", exc)
        except Exception as exc:    # the start (torque, first read), or the caller's progress callback: not clean
            log.exception("the loop failed")
            self._end("error", f"{type(exc).__name__}: {exc}", exc)
        finally:
            late: list[int] = []
            with interrupts_deferred(late):             # a second Ctrl-C must not lose the run's result
                self._end("stopped", "the loop was left")     # no-op unless nothing else ended it
                self._stop.set()
                # The control thread ends within a tick, and the robot goes to its safe state right after its last
                # command; only then is the planner waited for, which may be inside a policy step of seconds.
                # Waiting for it first left the motors uncommanded until the driver's watchdog tripped.
                self._join(threads[:1])
                reason, detail, error = self._ended
                if not self.robot.estopped:                 # a latched e-stop already applied the safe state
                    self._bounded(lambda: self.robot.go_safe("exit", f"loop ended: {reason} ({detail})"))
                self._join(threads[1:])
                with self._frames_lock:                     # no frame event after the stop event
                    self._finished = True
                    self.hub.publish(StopEvent(self.clock(), reason, detail))
        return RunResult(reason, detail, self.clock() - start_s, self.ticks, self.plans, self.overruns,
                         self.stale_frames, error, self.control_scheduling, stale_plans=self.stale_plans,
                         interrupted_late=bool(late), late_signal=late[-1] if late else None,
                         tick_span_s=self.last_tick_s - self.first_tick_s)

    @staticmethod
    def _join(threads: list[threading.Thread]) -> None:
        for thread in threads:
            if thread.ident is None:        # never started: a Ctrl-C or SIGTERM came between making and starting
                continue
            thread.join(JOIN_S)
            if thread.is_alive():
                log.error("thread %s still busy %.0f s after the stop; going on without it", thread.name, JOIN_S)

    def _supervise(self, start_s: float, duration_s: float | None, progress) -> None:
        stall_s = self.settings.control_stall_s
        while not self._stop.wait(self.settings.supervise_s):
            now = self.clock()
            if self.hub.error is not None:
                self._end("error", f"event subscriber failed: {self.hub.error}", self.hub.error)
            elif now - self._heartbeat_s > stall_s:
                detail = (f"control thread silent for {(now - self._heartbeat_s) * 1e3:.0f} ms "
                          f"(limit {stall_s * 1e3:.0f} ms): stalled in the driver or the step")
                self._bounded(lambda: self.robot.trigger_estop(detail))
                self._end("stall", detail)
            elif self.robot.estopped:       # worded as the control thread's EStopLatchedError: whichever ends first
                self._end("estop", _latched_words(self.robot.trips[-1].detail if self.robot.trips else None))
            elif duration_s is not None and now - start_s >= duration_s:
                self._end("duration", f"{duration_s:g} s elapsed")
            elif progress is not None:
                progress(now - start_s)

    def _end(self, reason: str, detail: str, error: BaseException | None = None) -> None:
        with self._ended_lock:
            if self._ended is None:
                self._ended = (reason, detail, error)
        self._stop.set()

    def _bounded(self, action: Callable[[], object]) -> None:
        """Run a safe-state action on its own thread: a driver stuck mid-exchange must not hang the stop."""
        done = threading.Event()

        def call() -> None:
            try:
                action()
            except Exception:       # logged: the caller still stops, and the bus exit turns torque off
                log.exception("reaching the safe state failed")
            finally:
                done.set()

        threading.Thread(target=call, name="loop-safe-state", daemon=True).start()
        if not done.wait(SAFE_STATE_WAIT_S):
            log.critical("the safe state was not confirmed within %.0f s: the motor driver is stuck; "
                         "CUT THE MOTOR POWER", SAFE_STATE_WAIT_S)

    def _guarded(self, body: Callable, *args) -> None:
        try:
            body(*args)
        except EStopLatchedError as exc:
            self._end("estop", _latched_detail(exc))
        except Exception as exc:    # the thread's boundary: hand it to the supervisor, stop everything
            if not self._stop.is_set():
                log.exception("%s failed", threading.current_thread().name)
            self._end("error", f"{threading.current_thread().name}: {type(exc).__name__}: {exc}", exc)

    # -- threads ---------------------------------------------------------------------------------
    def _warn_stale_frame(self, age_s: float, max_age_s: float) -> None:
        """Said at once, then at most every STALE_WARN_EVERY_S while it lasts (the planner's thread)."""
        now = self.clock()
        if self._stale_warned_s is None or now - self._stale_warned_s >= STALE_WARN_EVERY_S:
            self._stale_warned_s = now
            log.warning("%s (frames too old so far: %d)", _stale_frames_words(age_s, max_age_s), self.stale_frames)

    def _on_frame(self, frame: RGBDFrame) -> None:
        with self._frames_lock:                         # the camera outlives the run by a little
            if not self._finished:
                self.hub.publish(FrameEvent(self.clock(), frame.frame_number, frame.capture_monotonic_s))

    def _control(self, follower: ChunkFollower) -> None:
        self.control_scheduling = request_realtime(self.settings.control_priority)
        period_s = 1.0 / self.settings.control_hz
        next_s = self.clock()
        previous_s = math.nan
        while not self._stop.is_set():
            start_s = self.clock()
            measured = self.robot.read_state().position_rad         # observe
            if self._stop.is_set():     # a read that outlasted the stop: the robot may be in its exit safe state now
                break
            if self.ticks == 0:         # (only ticks that are counted: the span is the counted ticks')
                self.first_tick_s = start_s
            self.last_tick_s = start_s
            self._proprio = measured
            read_s = self.clock()
            plan = self._plan
            decision = follower.decide(read_s, plan)                # decide
            write_s = self.clock()
            sent = self.robot.send(decision.targets_rad)            # act
            done_s = self.clock()
            follower.record_sent(sent)
            self._heartbeat_s = done_s
            # A plan already too old when it arrived is not followed (the robot holds): no new plan's first
            # command, no frame -> command latency, no skipped actions; it is counted as a stale plan.
            stale_plan = decision.new_plan and decision.mode == "stale"
            new_plan = decision.new_plan and not stale_plan
            if stale_plan:
                self.stale_plans += 1
            self.hub.publish(CommandEvent(                          # notify
                start_s, self.ticks, start_s - previous_s, decision.mode, decision.targets_rad, sent, measured,
                decision.action_index, decision.skipped_actions if new_plan else 0, new_plan,
                done_s - plan.observation_time_s if new_plan else math.nan,
                read_s - start_s, done_s - write_s, done_s - start_s, stale_plan=stale_plan))
            self.ticks += 1
            previous_s = start_s
            next_s += period_s
            if done_s > next_s:     # overran the slot: count it, then start afresh (no burst of catch-up ticks)
                self.overruns += 1
                self.hub.publish(OverrunEvent(done_s, self.ticks - 1, done_s - next_s))
                next_s = done_s
            else:       # a plain sleep: woken by a real-time thread's timer it is ~0.05 ms late; a spin buys nothing
                self._stop.wait(next_s - done_s)

    def _planner(self) -> None:
        last_number: int | None = None
        last_stamp_s: float | None = None
        max_age_s = self.settings.max_frame_age_s
        ensemble = ActionEnsemble(self.settings.action_rate_hz, max_age_s=self.settings.plan_max_age_s) \
            if self.settings.ensemble else None
        while not self._stop.is_set():
            frame = self.camera.latest()
            if frame.frame_number == last_number or frame.age_s() > max_age_s:
                frame = self.camera.next_frame()        # bounded by the camera's timeout
                if frame.age_s() > max_age_s:           # this machine cannot keep up with the camera
                    self.stale_frames += 1
                    self._warn_stale_frame(frame.age_s(), max_age_s)
                    continue
            if last_stamp_s is not None and frame.capture_monotonic_s <= last_stamp_s:
                # Stamped no later than the frame last planned on (a host clock stepped under a camera's host-clock
                # stamps): its plan would replace a newer one and move the robot by an older view. Not planned on.
                last_number = frame.frame_number
                log.warning("camera frame %d is stamped %.1f ms before the frame last planned on; it is not planned "
                            "on (did the host clock step? RealSense frames are stamped by it with the global time "
                            "option on)", frame.frame_number, (last_stamp_s - frame.capture_monotonic_s) * 1000)
                continue
            taken_s = self.clock()
            obs = Observation(rgb=frame.color, depth_m=frame.depth_m, timestamp_s=frame.capture_monotonic_s,
                              proprio=self._proprio, instruction=self.settings.instruction,
                              frame_number=frame.frame_number, depth_from_camera=True)
            plan = self.policy.step(obs)
            if self._stop.is_set():
                return
            if self.trace_follower is not None:
                plan = self.trace_follower.apply(plan, obs.proprio)
            if ensemble is not None:
                plan = ensemble.merge(plan)
            done_s = self.clock()
            self._plan = plan
            self.hub.publish(PlanEvent(done_s, plan, self.plans, frame.frame_number,
                                       taken_s - frame.capture_monotonic_s, done_s - taken_s))
            self.plans += 1
            last_number, last_stamp_s = frame.frame_number, frame.capture_monotonic_s


def _stale_frames_words(age_s: float, max_age_s: float) -> str:
    return (f"frames arrive {age_s * 1000:.0f} ms old, over plan.max_frame_age_s ({max_age_s * 1000:.0f} ms): the "
            "policy is not asked with them and the robot holds; the camera's capture at this resolution and rate, or "
            "this computer, is too slow: lower the camera's resolution or rate, or raise plan.max_frame_age_s")


def _latched_detail(exc: EStopLatchedError) -> str:
    """A run's end by the e-stop in words: what latched it (the guard's own advice, reset_estop(), is for a caller
    that goes on; a run ends here, and what the motors are left in is told apart: RunResult.motors_at_exit)."""
    return _latched_words(exc.trip.detail) if exc.trip is not None else str(exc)


def _latched_words(trip_detail: str | None) -> str:
    return f"e-stop latched ({trip_detail})" if trip_detail else "e-stop latched"


# -- a whole run from a config ------------------------------------------------------------------

def run_robot(config: "RobotConfig", duration_s: float | None = None, subscribers: list | tuple = (),
              progress: Callable[[float], None] | None = None, estop: threading.Event | None = None,
              policy: Policy | None = None, shadow: bool = False) -> RunResult:
    """Build what `config` describes (starting the simulator for bus "sim"), run the loop, take it all down.

    `shadow`: the motors are read and never written (drivers/motors/shadow.py): the run goes on as it would, and
    the arm stays as it is.

    The policy runs in its own process when its config says so (`process`, see policy.py), and the
    simulator (its bus, its synthetic camera; the MuJoCo world with its bus and camera) in processes of
    its own (robot.sim_process): the control process then holds only what a robot computer runs, and
    its GIL serves the control thread. A simulator that judges a task (robot.task) reports it in `task`.

    Teardown runs in reverse on every way out: the SafetyGuard's exit (safe state, then the bus
    disconnect turns torque off unless robot.disable_torque_on_exit is false: `motors_at_exit` in the result
    says which), the policy's close, the camera, the simulator; then the
    subscribers get their last events and are closed (files flushed). Once the loop has ended the
    result is always returned: a failing teardown is in its `teardown_error`, events the subscribers
    never got in `undelivered_events`, and a further Ctrl-C is logged, not raised. `estop` is an extra
    e-stop input (the CLI's key listener sets it); `policy` replaces the configured one (tests).
    """
    # Here, not at the top: a robot's runtime imports neither the camera registry nor the simulator until it runs.
    from edgeact.runtime.policy import PolicyContext, TimedPolicy
    from edgeact.runtime.sim_robot import make_robot_camera, start_sim_bus

    settings = LoopSettings(control_hz=config.rates.control_hz, action_rate_hz=config.rates.action_rate_hz,
                            plan_max_age_s=config.plan.max_age_s, max_frame_age_s=config.plan.max_frame_age_s,
                            control_stall_s=config.watchdog.control_stall_s, instruction=config.instruction,
                            control_priority=config.rates.control_priority, ensemble=config.plan.ensemble)
    estop_input = estop_check(config, estop)
    hub = EventHub(list(subscribers)).start()
    teardown = ExitStack()      # entered once the loop has ended: Ctrl-C is deferred to the end of the teardown
    late: list[int] = []        # the signals it deferred
    result: RunResult | None = None
    try:
        if estop_input():
            raise ConfigError(f"the e-stop is active before the start ({_estop_source(config)}); release it to start")
        with ExitStack() as stack:
            sim = (stack.enter_context(start_sim_bus(config.robot, config.rates.control_priority))
                   if config.robot.bus == "sim" else None)
            bus = config.robot.make_bus(sim.port if sim is not None else None)
            if shadow:
                from edgeact.drivers.motors.shadow import ShadowBus

                bus = ShadowBus(bus)
            mapper = config.actions.make_mapper(list(bus.motors))
            camera = stack.enter_context(make_robot_camera(config))
            if policy is None:
                context = PolicyContext(config.rates.action_rate_hz, tuple(bus.motors), config.config_dir,
                                        camera.intrinsics)
                policy = config.policy.make_robot_policy(context)
            stack.callback(policy.close)
            mark_start = getattr(sim, "mark_episode_start", None)
            if mark_start is not None:      # a task's times count from here (the loop's start), not the reset
                mark_start()
            guard = stack.enter_context(SafetyGuard(bus, config.limits, estop=estop_input, on_trip=hub.trip))
            deferring: list = []

            def defer_interrupts() -> None:
                if not deferring:
                    deferring.append(teardown.enter_context(interrupts_deferred(late)))

            stack.callback(defer_interrupts)        # unwound first: before the guard's exit
            loop = RobotLoop(guard, camera, TimedPolicy(policy), mapper, settings, hub,
                             trace_follower=trace_follower(config, mapper, camera.intrinsics))
            result = loop.run(duration_s, progress)
            defer_interrupts()      # the run has ended: from here on its result must come back (a Ctrl-C waits)
            # Read while the children live: each process's peak resident memory (the simulator is not the robot's),
            # and the task's outcome as the simulator judged it.
            pids = {"control": os.getpid(), "policy": getattr(policy, "pid", None), "sim": getattr(sim, "pid", None),
                    "sim_camera": getattr(camera, "pid", None)}
            task_report = getattr(sim, "task_report", None)
            result = replace(result, peak_rss_bytes={role: rss for role, pid in pids.items()
                                                     if pid is not None and (rss := peak_rss_bytes(pid)) is not None},
                             task=task_report() if task_report is not None else None)
    except Exception as exc:
        if result is None:      # the run never ended (it never started): nothing to report but the error
            raise
        log.error("taking the robot down after the run failed: %s", exc)
        result = replace(result, teardown_error=exc)
    finally:
        with teardown:
            hub.close()
    if hub.error is not None and hub.error is not hub.close_error and result.error is None \
            and result.teardown_error is None:
        # A subscriber that failed on the run's last events (the stop, the exit trips, the backlog close() delivered):
        # after the supervisor's last look, so only here can the run say its output may lack its end.
        exc = hub.error
        result = replace(result, teardown_error=OutputLostError(
            f"a subscriber failed on the run's last events, so its output may lack its end: {type(exc).__name__}: "
            f"{exc}"))
    if hub.close_error is not None and result.teardown_error is None:
        # A recording whose last flush or sync failed (a failing SD card) may lack its end: the run says so.
        exc = hub.close_error
        result = replace(result, teardown_error=OutputLostError(
            f"closing an output failed, so it may lack its end (the storage?): {type(exc).__name__}: {exc}"))
    at_exit = (SHADOW_MOTORS_AT_EXIT if shadow else
               motors_at_exit(config, start_refused=isinstance(result.error, StartRefusedError)))
    return replace(result, undelivered_events=hub.undelivered, interrupted_late=result.interrupted_late or bool(late),
                   late_signal=late[-1] if late else result.late_signal,
                   motors_at_exit=at_exit, shadow_withheld=bus.withheld if shadow else None)


def trace_follower(config: "RobotConfig", mapper: ActionMapper, intrinsics) -> "TraceFollower | None":
    """The config's plan.follow_trace as a TraceFollower on this camera's intrinsics; None for "never"."""
    plan = config.plan
    if plan.follow_trace == "never":
        return None
    from edgeact.runtime.trace_follow import TraceFollower

    return TraceFollower(mapper, intrinsics, plan.trace_camera_frame, plan.trace_horizon_actions, plan.follow_trace,
                         plan.trace_camera_pose)


SHADOW_MOTORS_AT_EXIT = "as they were: a shadow run writes nothing to the motors (no goal, no torque change)"


def motors_at_exit(config: "RobotConfig", start_refused: bool = False) -> str:
    """What a run on `config` leaves the motors in once it has ended, in words for the operator."""
    robot, safe_state = config.robot, config.limits.safe_state
    if start_refused:
        return "torque off on every motor (the start was refused before any command): move the joint by hand"
    if robot.disable_torque_on_exit or safe_state == "torque_off":
        why = "the bus disconnect" if robot.disable_torque_on_exit else "limits.safe_state 'torque_off'"
        text = f"torque off on every motor ({why}): a joint under gravity falls"
        if robot.disable_torque_on_exit and safe_state != "torque_off":
            text += (f"; set robot.disable_torque_on_exit to false to leave them in the safe state "
                     f"'{safe_state}' instead")
        return text
    text = ("torque ON, joints holding where they stopped and wheels stopped (limits.safe_state 'hold', "
            "robot.disable_torque_on_exit false)" if safe_state == "hold" else
            "torque ON, wheels stopped and joints at their last command (limits.safe_state 'stop', "
            "robot.disable_torque_on_exit false)")
    watchdog_s = robot.options.get("bus_watchdog_s")
    if watchdog_s and robot.bus == "damiao-can":
        text += (f"; the motors' own watchdog (robot.options.bus_watchdog_s) turns their torque off "
                 f"{watchdog_s:g} s after the last command, so the hold lasts only that long")
    elif watchdog_s:
        text += (f"; the motors' bus watchdog (robot.options.bus_watchdog_s) trips {watchdog_s:g} s after the last "
                 "command: they stop where they are, torque still on")
    return text + "; turn torque off or cut the motor power to release them"


@contextlib.contextmanager
def interrupts_deferred(heard: list[int]):
    """Ctrl-C and SIGTERM are logged and appended to `heard`, not raised, in this block (the main thread's; elsewhere
    a no-op): once the loop ends the robot is already in its safe state, and an interrupt in its teardown would lose
    the result. The caller stops after it (RunResult.interrupted_late)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def later(signum, frame):
        log.warning("%s: already stopping (the robot is in its safe state); finishing the teardown first",
                    signal.Signals(signum).name)
        heard.append(signum)

    previous = {sig: signal.signal(sig, later) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def terminated(result: RunResult) -> bool:
    """Whether SIGTERM (a service manager's stop, `kill`) ended the run or came in its teardown, not Ctrl-C."""
    late = result.late_signal == signal.SIGTERM and result.reason != "interrupt"
    return (result.reason == "interrupt" and result.detail == "SIGTERM") or late


def request_realtime(priority: int | None) -> str:
    """Ask for SCHED_FIFO at `priority` for the calling thread (Linux: pid 0 is the thread); say what it got.

    Best effort: a refusal leaves normal scheduling, which works, with wake-ups that are as late as
    the machine is busy (measured on a loaded 2-core machine: p99 2.7-10 ms late, against 0.05 ms).
    """
    if priority is None:
        return "normal (no real-time priority asked)"
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
    except (OSError, AttributeError) as exc:      # no permission, or not Linux
        log.warning("control thread stays at normal priority: SCHED_FIFO %d refused (%s); grant it with an rtprio "
                    "limit (`ulimit -r %d`, /etc/security/limits.conf) or CAP_SYS_NICE", priority, exc, priority)
        return f"normal (SCHED_FIFO {priority} refused: {exc})"
    return f"SCHED_FIFO {priority}"


def peak_rss_bytes(pid: int) -> int | None:
    """A process's peak resident memory (VmHWM), or None where /proc does not say (not Linux, process gone)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def estop_check(config: "RobotConfig", event: threading.Event | None = None) -> Callable[[], bool]:
    """The e-stop input the SafetyGuard polls: the config's e-stop file exists, or `event` is set.

    A relative e-stop file is beside the config file (RobotConfig.estop_path), not in the working directory:
    an operator who touches the file next to the config stops the robot wherever it was started from."""
    path = config.estop_path

    def active() -> bool:
        return (event is not None and event.is_set()) or (path is not None and os.path.exists(path))

    return active


def _estop_source(config: "RobotConfig") -> str:
    return f"e-stop file {config.estop_path} exists" if config.estop.file else "the e-stop input is set"
