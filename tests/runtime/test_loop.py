"""The loop on the simulated Feetech arm: pacing, latency skipping, events, and a safe stop on every way out.

The simulator runs in the test process and the loop drives it through the real serial driver,
so "torque off" is read from the simulated motors' own registers.
"""
import io
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from rich.console import Console

from edgeact.drivers.motors.bus import MotorBusError
from edgeact.drivers.motors.feetech import FeetechMotorsBus
from edgeact.drivers.motors.safety import SafetyError
from edgeact.drivers.motors.serial_bus import make_serial_bus
from edgeact.drivers.sim.servo_bus import SimServoBus
from edgeact.runtime import cli, commands_loop, errors
from edgeact.runtime import loop as loop_module
from edgeact.runtime.commands_loop import EXIT_ESTOP
from edgeact.runtime.errors import ConfigError
from edgeact.runtime.loop import LoopSettings, run_robot
from edgeact.runtime.loop_events import CommandEvent, FrameEvent, PlanEvent, StopEvent, Subscriber, TripEvent
from edgeact.runtime.policy import Observation, Plan, PolicyContext, ScriptedPolicy, ScriptedPolicyConfig, TimedPolicy
from edgeact.runtime.robot_config import load_robot_config, robot_config_from_dict
from edgeact.runtime.sim_robot import sim_robot_config_dict
from edgeact.runtime.recorder import CommandRecorder
from edgeact.runtime.telemetry import TimingStats

pytestmark = pytest.mark.timeout(60)

IDS = range(1, 7)
# Runs `edgeact` in a child process, with the loop's commands even before the CLI lists them.
CLI = ("import sys, edgeact.runtime.cli as cli\n"
       "m = 'edgeact.runtime.commands_loop'\n"
       "cli.COMMAND_MODULES += () if m in cli.COMMAND_MODULES else (m,)\n"
       "sys.exit(cli.main(sys.argv[1:]))\n")


@pytest.fixture
def sim():
    with SimServoBus("feetech", ids=IDS) as bus:
        yield bus


def config_data(sim, latency_s=0.02, **sections):
    """The sample robot on the test's simulator (bus "feetech" on its pty), with a fast scripted policy.

    The watchdogs are generous so a loaded test machine never trips them by accident."""
    data = sim_robot_config_dict()
    data["robot"] = {**data["robot"], "bus": "feetech", "port": sim.port, "options": {"timeout_s": 0.2}}
    data["policy"] = {"type": "scripted", "chunk_size": 8, "latency_s": latency_s}
    data["limits"]["watchdog_timeout_s"] = 2.0
    data["watchdog"]["control_stall_s"] = 1.5
    for name, fields in sections.items():
        data[name] = {**data[name], **fields}
    return data


def torque(sim):
    return [sim.register(i, "torque_enable") for i in IDS]


class Collect(Subscriber):
    """Keeps every event; `at_tick` calls a function on the hub thread when that control tick is reported."""

    def __init__(self, at_tick=None, action=None):
        self.events, self.at_tick, self.action = [], at_tick, action

    def _add(self, event):
        self.events.append(event)

    on_frame = on_plan = on_overrun = on_trip = on_stop = _add

    def on_command(self, event):
        self.events.append(event)
        if event.tick == self.at_tick:
            self.action()

    def of(self, kind):
        return [e for e in self.events if isinstance(e, kind)]


def observation(t):
    return Observation(rgb=np.zeros((4, 4, 3), np.uint8), depth_m=None, timestamp_s=t, proprio=None, instruction="x")


def test_scripted_plans_agree_where_they_overlap_and_are_scaled_to_robot_units():
    clock = iter(np.arange(0.0, 100.0, 0.01))
    policy = ScriptedPolicy(ScriptedPolicyConfig(chunk_size=8, latency_s=0.05), 10.0, sleep=lambda s: None,
                            clock=lambda: float(next(clock)))
    first, second = policy.step(observation(50.0)), policy.step(observation(50.3))
    assert first.actions.shape == (8, 7) and first.observation_time_s == 50.0
    # Action 3 of the first plan and action 0 of the second are meant for the same instant.
    np.testing.assert_allclose(first.actions_normalized[3:], second.actions_normalized[:5])
    np.testing.assert_allclose(first.actions[:, :6], first.actions_normalized[:, :6] * 0.01 * [1, 1, 1, 5, 5, 5])
    np.testing.assert_allclose(first.actions[:, 6], first.actions_normalized[:, 6])   # the gripper stays normalized
    assert np.abs(first.actions_normalized).max() <= 0.5 + 1e-12


def test_timed_policy_adds_the_step_time_and_what_the_stages_missed():
    ticks = iter([10.0, 10.5])

    class Inner:
        closed = False

        def step(self, obs):
            return Plan(np.zeros((1, 7)), np.zeros((1, 7)), None, None, obs.timestamp_s, 10.5, {"vision": 0.2})

        def close(self):
            self.closed = True

    inner = Inner()
    timed = TimedPolicy(inner, clock=lambda: next(ticks))
    plan = timed.step(observation(9.9))
    assert plan.stage_seconds == {"vision": 0.2, "policy_total": 0.5, "policy_other": pytest.approx(0.3)}
    assert plan.latency_s == pytest.approx(0.6)
    timed.close()
    assert inner.closed


def test_observation_and_plan_refuse_malformed_data():
    with pytest.raises(ValueError, match=r"rgb must be \(H, W, 3\) uint8"):
        Observation(rgb=np.zeros((4, 4), np.uint8), depth_m=None, timestamp_s=0.0, proprio=None, instruction="")
    with pytest.raises(ValueError, match="non-finite"):
        Plan(np.full((2, 7), np.nan), np.zeros((2, 7)), None, None, 0.0, 0.0)
    with pytest.raises(ValueError, match=r"must be \(n >= 1, 7\)"):
        Plan(np.zeros((2, 6)), np.zeros((2, 6)), None, None, 0.0, 0.0)


def test_run_paces_follows_plans_and_ends_with_torque_off(sim):
    config = robot_config_from_dict(config_data(sim, latency_s=0.12))
    events = Collect()
    result = run_robot(config, 1.5, [events])
    assert result.reason == "duration" and result.clean and result.error is None
    commands = events.of(CommandEvent)
    # Paced: never faster than 100 Hz (after an overrun it resyncs, no catch-up burst); loose below (loaded machine).
    assert 40 <= result.ticks == len(commands) <= 1.5 * 100 * 1.05 + 2
    assert result.plans >= 2 and len(events.of(PlanEvent)) == result.plans and events.of(FrameEvent)
    firsts = [c for c in commands if c.new_plan]
    assert firsts and all(c.skipped_actions >= 1 for c in firsts)  # 120 ms of inference > one 100 ms action
    assert all(c.frame_to_command_s >= 0.12 for c in firsts)
    pan = [c.sent_rad["shoulder_pan"] for c in commands if c.mode == "follow"]
    assert max(pan) - min(pan) > 0.01                                # the plans really moved the joint
    assert {c.mode for c in commands} <= {"wait", "follow", "done"}
    assert isinstance(events.events[-1], (StopEvent, TripEvent))
    assert [e.reason for e in events.of(StopEvent)] == ["duration"]
    assert {t.trip.reason for t in events.of(TripEvent)} == {"exit"}
    assert torque(sim) == [0] * 6


def test_an_interrupt_while_the_threads_start_ends_as_an_interrupt_in_the_safe_state(sim, monkeypatch):
    # SIGTERM can land between making the loop's threads and starting them: the end must not trip over a thread
    # that never started (it did: "cannot join thread before it is started", exit status 1 instead of 130).
    start = threading.Thread.start

    def interrupted(self):
        if self.name == "loop-planner":
            raise KeyboardInterrupt
        start(self)

    monkeypatch.setattr(threading.Thread, "start", interrupted)
    events = Collect()
    result = run_robot(robot_config_from_dict(config_data(sim)), 5.0, [events])
    assert (result.reason, result.error) == ("interrupt", None)
    assert [e.reason for e in events.of(StopEvent)] == ["interrupt"]
    assert torque(sim) == [0] * 6


def test_the_end_puts_the_robot_safe_at_once_while_a_long_policy_step_finishes(sim):
    # A policy step (1.2 s) longer than the driver's watchdog (0.5 s) is running when the duration ends: the exit
    # safe state follows the last command within a tick, and the watchdog never has to act.
    config = robot_config_from_dict(config_data(sim, latency_s=1.2, limits={"watchdog_timeout_s": 0.5}))
    events = Collect()
    result = run_robot(config, 1.6, [events])
    trips = [t.trip for t in events.of(TripEvent)]
    assert result.reason == "duration" and result.plans >= 1
    assert {t.reason for t in trips} == {"exit"}, [(t.reason, t.detail) for t in trips]   # the loop's, the guard's
    last_command = events.of(CommandEvent)[-1].time_s
    assert trips[0].time_s - last_command < 0.25
    assert torque(sim) == [0] * 6


def test_policy_exception_stops_safely_and_flushes_the_recording(sim, tmp_path):
    config = robot_config_from_dict(config_data(sim))
    scripted = ScriptedPolicyConfig(latency_s=0.02).make_policy(PolicyContext(10.0))

    class Failing:
        def step(self, obs):
            if scripted.steps == 3:
                raise RuntimeError("the model fell over")
            return scripted.step(obs)

        def close(self):
            pass

    record = tmp_path / "commands.jsonl"
    result = run_robot(config, 20.0, [CommandRecorder(record)], policy=Failing())
    assert result.reason == "error" and isinstance(result.error, RuntimeError)
    assert "loop-planner: RuntimeError: the model fell over" in result.detail
    assert result.duration_s < 10
    lines = [json.loads(line) for line in record.read_text().splitlines()]   # complete: every line parses
    assert sum(r["event"] == "plan" for r in lines) == 3
    stops = [r for r in lines if r["event"] == "stop"]
    assert len(stops) == 1 and stops[0]["reason"] == "error"
    assert any(r["event"] == "trip" and r["reason"] == "exit" for r in lines)
    assert torque(sim) == [0] * 6


def test_estop_file_latches_the_safe_state_and_ends_the_run(sim, tmp_path):
    stop_file = tmp_path / "estop"
    config = robot_config_from_dict(config_data(sim, estop={"file": str(stop_file)}))
    events = Collect(at_tick=20, action=stop_file.touch)
    result = run_robot(config, 20.0, [events])
    assert result.reason == "estop" and not result.clean and result.duration_s < 10
    estops = [t.trip for t in events.of(TripEvent) if t.trip.reason == "estop"]
    assert len(estops) == 1 and estops[0].safe_state == "hold" and estops[0].error is None
    assert torque(sim) == [0] * 6
    # Still there: the next start refuses, before touching the motors.
    with pytest.raises(ConfigError, match=r"e-stop is active before the start \(e-stop file .* exists\)"):
        run_robot(config, 1.0)


def test_estop_input_event_ends_the_run(sim):
    config = robot_config_from_dict(config_data(sim))
    estop = threading.Event()
    result = run_robot(config, 20.0, [Collect(at_tick=10, action=estop.set)], estop=estop)
    assert result.reason == "estop" and result.duration_s < 10
    assert torque(sim) == [0] * 6


class StallingBus(FeetechMotorsBus):
    """The real driver, except that once `stall` is set, the control thread's next read hangs for `stall_s`."""

    stall = None
    stall_s = 2.5

    def read_state(self, motors=None):
        if self.stall.is_set():
            self.stall.clear()
            time.sleep(self.stall_s)
        return super().read_state(motors)


def test_a_watchdog_trip_into_torque_off_ends_the_run_instead_of_commanding_a_limp_arm(sim):
    """A pause shorter than the control-stall limit but longer than the safety watchdog's: torque goes off, and the
    next goal is refused (it would not move the limp arm, and the run would read as clean)."""
    config = robot_config_from_dict(config_data(sim, limits={"safe_state": "torque_off", "watchdog_timeout_s": 0.2}))
    real = make_serial_bus("feetech", sim.port, config.robot.motor_objects(), config.robot.calibration, timeout_s=0.2)
    bus = StallingBus(real.config, real.motors, real.calibration)
    bus.stall, bus.stall_s = threading.Event(), 0.6
    config.robot.make_bus = lambda port=None: bus
    events = Collect(at_tick=20, action=bus.stall.set)
    result = run_robot(config, 20.0, [events])
    assert result.reason == "error" and not result.clean and result.duration_s < 10
    assert "torque is off on" in str(result.error) and "call enable_torque() first" in str(result.error)
    first = events.of(TripEvent)[0].trip
    assert first.reason == "watchdog" and first.safe_state == "torque_off"
    assert torque(sim) == [0] * 6


def test_stalled_driver_trips_the_control_watchdog_into_the_safe_state(sim):
    config = robot_config_from_dict(config_data(sim, limits={"safe_state": "torque_off", "watchdog_timeout_s": 2.0},
                                                watchdog={"control_stall_s": 0.5}))
    real = make_serial_bus("feetech", sim.port, config.robot.motor_objects(), config.robot.calibration, timeout_s=0.2)
    stall = threading.Event()
    bus = StallingBus(real.config, real.motors, real.calibration)
    bus.stall = stall
    config.robot.make_bus = lambda port=None: bus
    events = Collect(at_tick=20, action=stall.set)
    result = run_robot(config, 20.0, [events])
    assert result.reason == "stall" and "control thread silent" in result.detail and result.duration_s < 10
    first = events.of(TripEvent)[0].trip        # the watchdog acted first, before the exit
    assert first.reason == "estop" and first.safe_state == "torque_off" and first.error is None
    assert "control thread silent" in first.detail
    assert torque(sim) == [0] * 6


def wait_until_running(proc, running, timeout_s: float = 30.0) -> None:
    """Until `running()` (the subprocess `edgeact run` commanding the arm); it must not have ended meanwhile."""
    deadline = time.monotonic() + timeout_s
    while not running():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "edgeact run did not start commanding the simulated arm"
        time.sleep(0.05)


def test_sigterm_to_the_whole_process_group_still_ends_in_the_safe_state(tmp_path):
    """systemd stops a service with SIGTERM to its whole process group: the simulated motors' process (a robot's
    motors, here) died first and the run could not reach its safe state. Children ignore it; the run stops them."""
    data = sim_robot_config_dict()
    data["policy"] = {"type": "scripted", "chunk_size": 8, "latency_s": 0.02, "process": True}
    path = tmp_path / "robot.json"
    path.write_text(json.dumps(data))
    record = tmp_path / "commands.jsonl"
    proc = subprocess.Popen([sys.executable, "-c", CLI, "run", str(path), "--seconds", "60", "--record", str(record)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_until_running(proc, lambda: record.exists() and record.read_text().count('"event": "command"') >= 100,
                           40.0)
        os.killpg(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=40)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 143, (out, err)
    assert "stopped: interrupt (SIGTERM)" in out and "motors now: torque off on every motor" in out, (out, err)
    assert "teardown after the run failed" not in out and "could not reach safe state" not in err, (out, err)


def test_sigint_to_edgeact_run_ends_in_the_safe_state(sim, tmp_path):
    path = tmp_path / "robot.json"
    path.write_text(json.dumps(config_data(sim)))
    record = tmp_path / "commands.jsonl"
    proc = subprocess.Popen([sys.executable, "-c", CLI, "run", str(path), "--record", str(record)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until_running(proc, lambda: torque(sim) == [1] * 6 and len(sim.received) >= 100)  # commands flowing
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "stopped: interrupt (Ctrl-C)" in out and "achieved frequency" in out
    assert torque(sim) == [0] * 6
    lines = [json.loads(line) for line in record.read_text().splitlines()]
    assert any(r["event"] == "command" for r in lines)
    assert [r["reason"] for r in lines if r["event"] == "stop"] == ["interrupt"]


def test_sigterm_is_handled_like_ctrl_c(sim, tmp_path):
    path = tmp_path / "robot.json"
    path.write_text(json.dumps(config_data(sim)))
    proc = subprocess.Popen([sys.executable, "-c", CLI, "run", str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_until_running(proc, lambda: torque(sim) == [1] * 6)
        os.kill(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143, err                  # 128 + SIGTERM, as a shell or systemd reads it
    assert "stopped: interrupt (SIGTERM)" in out        # systemd or `kill`, not a Ctrl-C at the terminal
    assert torque(sim) == [0] * 6


# -- the config's relative e-stop file, the settings, the start, the stale plans ------------------------------------

def test_a_relative_estop_file_is_beside_the_config_wherever_the_robot_is_started(sim, tmp_path, monkeypatch):
    config_dir, elsewhere = tmp_path / "robot", tmp_path / "elsewhere"
    config_dir.mkdir()
    elsewhere.mkdir()
    path = config_dir / "robot.json"
    path.write_text(json.dumps(config_data(sim, estop={"file": "robot.estop"})))
    monkeypatch.chdir(elsewhere)
    (elsewhere / "robot.estop").touch()        # a file of that name in the working directory is not the e-stop
    config = load_robot_config(path)
    events = Collect(at_tick=20, action=(config_dir / "robot.estop").touch)     # the operator, beside the config
    result = run_robot(config, 20.0, [events])
    assert result.reason == "estop" and result.duration_s < 10
    assert config.estop_path == config_dir.resolve() / "robot.estop"
    assert [t.trip.reason for t in events.of(TripEvent)][0] == "estop"
    assert torque(sim) == [0] * 6


@pytest.mark.parametrize("fields, expected", [
    ({"control_hz": math.inf}, "LoopSettings.control_hz: must be a finite number > 0 (control ticks per second, "
                               "e.g. 100), got inf"),
    ({"control_hz": -1}, "LoopSettings.control_hz: must be a finite number > 0"),
    ({"supervise_s": 0.0}, "LoopSettings.supervise_s: must be a finite number > 0 (how often the supervisor looks, "
                           "e.g. 0.01), got 0.0"),
    ({"supervise_s": 1.0}, "LoopSettings.supervise_s: 1 s is not under control_stall_s (0.5 s)"),
    ({"max_frame_age_s": -1.0}, "LoopSettings.max_frame_age_s: must be a finite number > 0"),
    ({"plan_max_age_s": math.nan}, "LoopSettings.plan_max_age_s: must be a finite number > 0 (hold once a plan's "
                                   "observation is older than this, e.g. 1.5), got nan"),
    ({"plan_max_age_s": 0.05}, "LoopSettings.plan_max_age_s: 0.05 s is under one action period (0.100 s at "
                               "action_rate_hz 10): every plan would be stale on arrival"),
    ({"action_rate_hz": 200.0}, "LoopSettings.action_rate_hz: 200 is above control_hz (100)"),
    ({"control_stall_s": math.inf}, "LoopSettings.control_stall_s: must be a finite number > 0"),
])
def test_loop_settings_refuse_each_bad_field_by_name_at_construction(fields, expected):
    with pytest.raises(ConfigError) as info:
        LoopSettings(**fields)
    assert str(info.value).startswith(expected)
    assert LoopSettings().control_hz == 100.0       # the defaults are valid


def test_an_estop_pressed_while_the_policy_loads_ends_as_estop_and_the_cli_exits_3(sim, tmp_path, monkeypatch,
                                                                                   capsys):
    stop_file = tmp_path / "estop"
    path = tmp_path / "robot.json"
    path.write_text(json.dumps(config_data(sim, estop={"file": str(stop_file)})))
    load = ScriptedPolicyConfig.make_robot_policy

    def slow_load(self, context):   # the operator hits the e-stop after the start's check, while the model loads
        stop_file.touch()
        return load(self, context)

    monkeypatch.setattr(ScriptedPolicyConfig, "make_robot_policy", slow_load)
    events = Collect()
    result = run_robot(load_robot_config(path), 5.0, [events])
    assert (result.reason, result.error) == ("estop", None) and "e-stop latched" in result.detail
    assert [e.reason for e in events.of(StopEvent)] == ["estop"] and result.ticks == 0
    assert torque(sim) == [0] * 6
    stop_file.unlink()
    monkeypatch.setattr(ScriptedPolicyConfig, "make_robot_policy", slow_load)
    assert cli.main(["run", str(path), "--seconds", "5"]) == EXIT_ESTOP == 3
    assert "stopped: estop (e-stop latched" in capsys.readouterr().out
    assert torque(sim) == [0] * 6


class FailingFirstReadBus(FeetechMotorsBus):
    """The real driver, except that the first joint read after the torque goes on fails (a cable, a motor fault)."""

    fail_next_read = False

    def enable_torque(self, motors=None):
        super().enable_torque(motors)
        self.fail_next_read = True

    def read_state(self, motors=None):
        if self.fail_next_read:
            self.fail_next_read = False
            raise MotorBusError("motor 3 did not answer")
        return super().read_state(motors)


def test_a_failing_first_joint_read_ends_as_an_error_in_the_safe_state(sim):
    config = robot_config_from_dict(config_data(sim))
    real = make_serial_bus("feetech", sim.port, config.robot.motor_objects(), config.robot.calibration, timeout_s=0.2)
    bus = FailingFirstReadBus(real.config, real.motors, real.calibration)
    config.robot.make_bus = lambda port=None: bus
    events = Collect()
    result = run_robot(config, 5.0, [events])
    assert result.reason == "error" and not result.clean and isinstance(result.error, MotorBusError)
    assert result.detail == "MotorBusError: motor 3 did not answer" and result.ticks == 0
    assert [e.reason for e in events.of(StopEvent)] == ["error"]
    assert [t.trip.reason for t in events.of(TripEvent)][0] == "exit"     # the loop's own safe state
    assert torque(sim) == [0] * 6


def test_a_failing_progress_callback_ends_as_an_error_not_a_clean_stop(sim):
    def progress(elapsed_s):
        if elapsed_s > 0.3:
            raise RuntimeError("progress bar broke")

    events = Collect()
    result = run_robot(robot_config_from_dict(config_data(sim)), 20.0, [events], progress=progress)
    assert result.reason == "error" and isinstance(result.error, RuntimeError) and result.duration_s < 10
    assert result.detail == "RuntimeError: progress bar broke"
    assert [e.reason for e in events.of(StopEvent)] == ["error"]
    assert torque(sim) == [0] * 6


def test_plans_stale_on_arrival_are_counted_apart_and_not_as_latency_or_skips(sim):
    # 300 ms of inference against a 200 ms plan age limit: every plan is too old when it arrives; the robot holds.
    config = robot_config_from_dict(config_data(sim, latency_s=0.3, plan={"max_age_s": 0.2}))
    events, stats = Collect(), TimingStats(config.rates.control_hz)
    result = run_robot(config, 1.5, [events, stats])
    assert result.reason == "duration" and result.plans >= 2
    commands = events.of(CommandEvent)
    stale = [c for c in commands if c.stale_plan]
    assert len(stale) == result.stale_plans == stats.stale_plans >= 2
    assert all(c.mode == "stale" and c.skipped_actions == 0 and math.isnan(c.frame_to_command_s) for c in stale)
    assert not any(c.new_plan for c in commands)      # no command followed any of them
    assert {c.mode for c in commands} <= {"wait", "stale"}
    summary = stats.summary()
    assert summary["policy"]["stale_plans"] == result.stale_plans
    assert summary["frame_to_command_ms"]["n"] == 0 and summary["policy"]["skipped_actions_mean"] is None
    assert torque(sim) == [0] * 6


# -- a failed teardown, a second Ctrl-C, the e-stop key, the outputs: the run's result is never lost ------------------

def cut_power(sim):
    """A motor goes silent (its power cut, a loose cable); one, so that the teardown's retries take no long."""
    with sim.lock:
        sim.servo(3).powered = False


def test_a_motor_losing_power_mid_run_ends_as_an_error_and_the_failed_teardown_is_returned_not_raised(sim):
    events = Collect(at_tick=30, action=lambda: cut_power(sim))
    result = run_robot(robot_config_from_dict(config_data(sim)), 20.0, [events])
    assert result.reason == "error" and isinstance(result.error, MotorBusError) and result.ticks >= 30
    assert isinstance(result.teardown_error, MotorBusError)        # the torque off could not be confirmed
    assert "could not confirm torque off (motor 'elbow_flex' (id 3)" in str(result.teardown_error)
    assert [e.reason for e in events.of(StopEvent)] == ["error"]
    assert torque(sim) == [0, 0, 1, 0, 0, 0]                        # the others are off; the silent one is unknown


def test_edgeact_run_writes_the_json_and_the_table_when_a_motor_loses_power(sim, tmp_path, capsys):
    path, summary = tmp_path / "robot.json", tmp_path / "run.json"
    path.write_text(json.dumps(config_data(sim)))

    def cut_when_running():
        deadline = time.monotonic() + 30
        while len(sim.received) < 100 and time.monotonic() < deadline:
            time.sleep(0.02)
        cut_power(sim)

    threading.Thread(target=cut_when_running, daemon=True).start()
    assert cli.main(["run", str(path), "--seconds", "20", "--json", str(summary)]) == 2
    captured = capsys.readouterr()
    assert "achieved frequency" in captured.out and "stopped: error" in captured.out
    assert "the teardown after the run failed: " in captured.out and "could not confirm torque off" in captured.out
    data = json.loads(summary.read_text())
    assert data["stop"]["reason"] == "error" and data["control"]["ticks"] > 0
    assert "could not confirm torque off" in data["teardown_error"] and data["incomplete"] is False


def test_a_second_ctrl_c_while_the_teardown_waits_for_the_planner_still_returns_the_result(sim, caplog):
    # The first Ctrl-C (SIGTERM here, as `kill` sends it) stops the run; the second comes while the loop waits for a
    # policy step of 1.5 s to end (the robot already safe): it is logged, and the run's result is still returned.
    config = robot_config_from_dict(config_data(sim, latency_s=1.5))

    class SecondCtrlC(Collect):
        def on_trip(self, event):
            self._add(event)
            if event.trip.detail.startswith("loop ended"):
                os.kill(os.getpid(), signal.SIGTERM)

    events = SecondCtrlC(at_tick=30, action=lambda: os.kill(os.getpid(), signal.SIGTERM))
    try:
        with commands_loop.sigterm_as_interrupt():
            result = run_robot(config, 20.0, [events])
    except KeyboardInterrupt:
        pytest.fail("the second Ctrl-C escaped run_robot: the run's result (JSON, table, the record's end) was lost")
    assert (result.reason, result.error) == ("interrupt", None)
    assert "SIGTERM: already stopping (the robot is in its safe state)" in caplog.text
    assert [e.reason for e in events.of(StopEvent)] == ["interrupt"]
    assert torque(sim) == [0] * 6
    assert result.interrupted_late


def test_a_ctrl_c_during_the_teardown_of_a_finished_run_is_reported_not_dropped(sim, caplog):
    # The run ended by its duration; the operator's Ctrl-C comes while it is taken down: the result still comes back,
    # and says so, so that a caller running episodes one after another (edgeact eval) stops too.
    class CtrlCAtClose(Collect):
        def close(self):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)

    result = run_robot(robot_config_from_dict(config_data(sim)), 0.5, [CtrlCAtClose()])
    assert result.reason == "duration" and result.interrupted_late
    assert "SIGINT: already stopping" in caplog.text
    assert commands_loop._finish(result, Console(file=io.StringIO())) == errors.EXIT_INTERRUPTED


def test_a_ctrl_c_right_after_the_loop_ends_does_not_lose_the_result(sim, monkeypatch, caplog):
    """Between the loop's end and the teardown the run reads each process's peak memory and the task's outcome; a
    Ctrl-C there is deferred like one in the teardown, not raised (which lost the whole run's JSON and tables)."""
    real = loop_module.peak_rss_bytes

    def ctrl_c_while_reading(pid):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)                            # the handler runs here, in the main thread
        return real(pid)

    monkeypatch.setattr(loop_module, "peak_rss_bytes", ctrl_c_while_reading)
    result = run_robot(robot_config_from_dict(config_data(sim)), 0.5, [])
    assert result.reason == "duration" and result.interrupted_late and result.peak_rss_bytes
    assert "SIGINT: already stopping" in caplog.text


def test_a_real_robot_whose_estop_key_cannot_be_pressed_does_not_start(sim, tmp_path, monkeypatch, capsys):
    path = tmp_path / "robot.json"
    path.write_text(json.dumps(config_data(sim, estop={"key": "q"})))
    with open(os.devnull) as not_a_terminal:
        monkeypatch.setattr(sys, "stdin", not_a_terminal)
        assert cli.main(["run", str(path), "--seconds", "1"]) == 2
    err = capsys.readouterr().err
    assert "the e-stop key 'q' needs a terminal on stdin" in err and "`ssh -t`" in err and "estop.file" in err
    assert not sim.received and torque(sim) == [0] * 6              # refused before the motors heard anything
    path.write_text(json.dumps(config_data(sim, estop={"key": "q", "file": str(tmp_path / "estop")})))
    with open(os.devnull) as not_a_terminal:                       # another e-stop is there: the key is only off
        monkeypatch.setattr(sys, "stdin", not_a_terminal)
        assert cli.main(["run", str(path), "--seconds", "0.5"]) == 0


def test_edgeact_run_refuses_bad_output_paths_before_the_run(sim, tmp_path, monkeypatch, capsys):
    path, same = tmp_path / "robot.json", tmp_path / "same.out"
    path.write_text(json.dumps(config_data(sim)))
    monkeypatch.setattr("edgeact.runtime.loop.run_robot", lambda *a, **k: pytest.fail("the run started"))
    assert cli.main(["run", str(path), "--record", str(same), "--json", str(same)]) == 2
    assert f"--record and --json name the same file {same}" in capsys.readouterr().err and not same.exists()
    (tmp_path / "afile").write_text("not a folder")
    assert cli.main(["run", str(path), "--json", str(tmp_path / "afile" / "run.json")]) == 2
    assert f"--json {tmp_path / 'afile' / 'run.json'}: cannot make the folder" in capsys.readouterr().err
    assert cli.main(["run", str(path), "--record", str(tmp_path)]) == 2
    assert f"--record {tmp_path} is a folder; give a file path" in capsys.readouterr().err


def test_an_output_path_under_a_file_is_one_clear_error_not_a_traceback(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    code = cli.main(["demo", "--write-config", str(afile / "robot.json")])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("edgeact demo: error: ") and "Traceback" not in err and str(afile) in err


# -- the start with a joint outside its limits, what the motors are left in, a real robot without an e-stop ----------

@pytest.mark.parametrize("torque_off_at_exit", [True, False])
def test_a_joint_resting_outside_its_limits_refuses_the_start_and_nothing_moves(sim, torque_off_at_exit,
                                                                                monkeypatch):
    from edgeact.drivers.sim.servo_motor import SimServo

    plain, goal = SimServo.write_bytes, sim.servo(1).spec.register("goal_position").address
    torque_address = sim.servo(1).spec.register("torque_enable").address

    def goal_turns_torque_on(self, address, data):      # what some servo firmwares may do: no goal after torque off
        plain(self, address, data)
        if address == goal and self.get("torque_enable") == 0:
            plain(self, torque_address, b"\x01")

    sim.servo(3).position_ticks = 3300      # elbow_flex folded past its limit: +1.92 rad against [-1.4, 1.4]
    monkeypatch.setattr(SimServo, "write_bytes", goal_turns_torque_on)
    # Torque off after the refusal whatever the exit setting: the person is told to move the joint by hand.
    config = robot_config_from_dict(config_data(sim, robot={"disable_torque_on_exit": torque_off_at_exit}))
    events = Collect()
    result = run_robot(config, 2.0, [events])
    assert result.reason == "error" and isinstance(result.error, SafetyError) and result.ticks == 0
    assert re.search(r"refusing to start with a joint outside its limits: 'elbow_flex' reads \+1\.921 rad "
                     r"\(\+110\.0 deg\) and its limits are \[-1\.400, \+1\.400\] rad", result.detail), result.detail
    assert "move it inside its limits by hand" in result.detail and "robot.calibration" in result.detail
    time.sleep(0.2)                         # a walk back at 2 rad/s would have moved it ~100 ticks by now
    sim.wait_idle()
    assert round(sim.servo(3).position_ticks) == 3300 and torque(sim) == [0] * 6
    assert not events.of(CommandEvent)
    assert result.motors_at_exit.startswith("torque off on every motor (the start was refused before any command)")


def test_hold_at_exit_keeps_the_torque_on_only_when_asked_and_the_end_says_what_the_motors_are_in(sim):
    estop = threading.Event()
    config = robot_config_from_dict(config_data(sim, robot={"disable_torque_on_exit": False}))
    result = run_robot(config, 20.0, [Collect(at_tick=10, action=estop.set)], estop=estop)
    assert result.reason == "estop" and config.limits.safe_state == "hold"
    assert torque(sim) == [1] * 6                                   # held after the run, as the config asked
    out = io.StringIO()
    assert commands_loop._finish(result, Console(file=out, width=300)) == EXIT_ESTOP
    text = out.getvalue()
    assert "stopped: estop (e-stop latched (e-stop input set))" in text and "reset_estop" not in text
    assert "motors now: torque ON, joints holding where they stopped" in text
    estop.clear()
    result = run_robot(robot_config_from_dict(config_data(sim)), 0.3)      # the default: torque off at the end
    assert torque(sim) == [0] * 6
    assert result.motors_at_exit.startswith("torque off on every motor (the bus disconnect)")
    assert "set robot.disable_torque_on_exit to false" in result.motors_at_exit


def test_the_supervisor_words_a_latched_estop_as_the_control_thread_does():
    # Two threads can end a run on a latched e-stop: the control thread (EStopLatchedError) and the supervisor
    # (robot.estopped). Whichever comes first, the run's detail reads the same (on a loaded machine the
    # supervisor's came first now and then, and the end said only the trip's words).
    from types import SimpleNamespace

    from edgeact.runtime.loop import RobotLoop

    ended = []
    stop = threading.Event()
    fake = SimpleNamespace(
        _stop=stop, clock=time.monotonic, _heartbeat_s=time.monotonic() + 60.0, hub=SimpleNamespace(error=None),
        settings=SimpleNamespace(supervise_s=0.001, control_stall_s=10.0),
        robot=SimpleNamespace(estopped=True, trips=[SimpleNamespace(detail="e-stop input set")]),
        _end=lambda reason, detail, error=None: (ended.append((reason, detail)), stop.set()))
    RobotLoop._supervise(fake, time.monotonic(), None, None)
    assert ended == [("estop", "e-stop latched (e-stop input set)")]


def test_motors_at_exit_names_a_bus_watchdog_that_ends_the_hold():
    from edgeact.runtime.loop import motors_at_exit

    data = sim_robot_config_dict()
    data["robot"] = {"bus": "damiao-can", "motors": {"elbow": {"id": 1, "model": "dm4310"}},
                     "options": {"interface": "virtual", "bus_watchdog_s": 0.2}, "disable_torque_on_exit": False}
    data["actions"] = {"type": "joint_delta", "joints": ["elbow"], "gains": [1.0]}
    data["limits"] = {"safe_state": "hold"}
    text = motors_at_exit(robot_config_from_dict(data))
    assert text.startswith("torque ON, joints holding") and "turns their torque off 0.2 s after the last command" in text
    data["limits"] = {"safe_state": "torque_off"}
    assert motors_at_exit(robot_config_from_dict(data)).startswith("torque off on every motor (limits.safe_state")


def test_a_real_robot_without_an_estop_starts_with_a_loud_warning(sim, tmp_path, caplog):
    path = tmp_path / "robot.json"
    path.write_text(json.dumps(config_data(sim)))           # estop.file and estop.key both null
    assert cli.main(["run", str(path), "--seconds", "0.3"]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "no e-stop" in r.getMessage()]
    assert len(warnings) == 1 and "Set estop.file" in warnings[0] and "estop.key" in warnings[0]
    caplog.clear()
    path.write_text(json.dumps(config_data(sim, estop={"file": str(tmp_path / "estop")})))
    assert cli.main(["run", str(path), "--seconds", "0.3"]) == 0
    commands_loop.warn_without_estop(robot_config_from_dict(sim_robot_config_dict()))    # the simulated robot
    assert "no e-stop" not in caplog.text


def test_a_control_thread_that_outlives_the_stop_never_commands_after_the_exit_safe_state(sim, monkeypatch):
    """A driver read stuck past the join's patience, returning just after the loop put the robot in its exit safe
    state: the control thread must not command the motors again, nor publish after the StopEvent."""
    from edgeact.drivers.motors.safety import SafetyGuard

    start, exit_safe, stuck, late_sends = time.monotonic(), threading.Event(), [], []
    real_read, real_send, real_go_safe = SafetyGuard.read_state, SafetyGuard.send, SafetyGuard.go_safe

    def go_safe(self, reason, detail):
        trip = real_go_safe(self, reason, detail)
        if detail.startswith("loop ended"):
            exit_safe.set()
        return trip

    def read_state(self, motors=None):
        if threading.current_thread().name == "loop-control" and not stuck and time.monotonic() - start > 0.5:
            stuck.append(True)
            exit_safe.wait(5.0)         # returns just after the exit safe state
        return real_read(self, motors)

    def send(self, goal, origin_rad=None):
        if exit_safe.is_set():
            late_sends.append(threading.current_thread().name)
        return real_send(self, goal, origin_rad)
    monkeypatch.setattr(SafetyGuard, "go_safe", go_safe)
    monkeypatch.setattr(SafetyGuard, "read_state", read_state)
    monkeypatch.setattr(SafetyGuard, "send", send)
    events = Collect()
    result = run_robot(robot_config_from_dict(config_data(sim)), 0.7, [events])
    assert stuck and exit_safe.is_set() and result.reason == "duration"
    assert late_sends == []
    kinds = [type(e).__name__ for e in events.events if not isinstance(e, FrameEvent)]
    assert "CommandEvent" not in kinds[kinds.index("StopEvent"):]


def test_a_subscriber_failing_on_the_last_events_is_said_as_a_lost_output(sim):
    """The stop event reaches subscribers after the supervisor's last look: a failure there (a full disk under the
    recording) must still be said (the CLI raises it after the tables), not pass unnoticed."""
    from edgeact.runtime.errors import OutputLostError

    class FailsAtEnd(Collect):
        def on_stop(self, event):
            raise OSError(28, "No space left on device")

    result = run_robot(robot_config_from_dict(config_data(sim)), 0.3, [FailsAtEnd()])
    assert result.reason == "duration" and result.error is None and isinstance(result.teardown_error, OutputLostError)
    assert "a subscriber failed on the run's last events" in str(result.teardown_error)
    assert "No space left on device" in str(result.teardown_error)
