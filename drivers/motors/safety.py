"""The safety layer over any MotorsBus: joint limits, step and velocity limits, a latching e-stop, a watchdog.

    with SafetyGuard(bus, SafetyConfig(joint_limits_rad={"elbow": (-1.5, 1.5)}), estop=estop_event) as robot:
        robot.enable_torque()
        while running:
            sent = robot.send(goal)          # what really went to the motors, after every limit

`send` applies, in order: the joint's position limits (`joint_limits_rad` within the bus's calibrated
range), `max_step_rad` from the last sent (or, at first, measured) position, and `max_velocity_rad_s`
times the real time since the previous command. The first command after a (re)start (the first one,
enable_torque, a trip, reset_estop) counts its time from the reading of the joints, so it holds them
where they are, and motion starts at the velocity limit from the next command on. A joint found
outside its range walks back into it by these steps instead of jumping to the range's edge; a run
gives its first reading to `check_start_positions()` before its first command, which refuses to start
with a joint outside its limits (the walk back would be motion nobody planned).
`send` and `send_velocity` are refused until the guard is connected (`connect()` or the `with`
block), since that starts the watchdog and the e-stop polling.
When no command arrives for `watchdog_timeout_s`, or the e-stop input is set, the robot goes to
its safe state:
    "hold"        every joint holds its measured position (torque on); wheels get zero velocity
    "torque_off"  every motor's torque is turned off
    "stop"        wheels (velocity-mode motors) get zero velocity; joints keep their last command
A watchdog trip ends with the next command; an e-stop latches until `reset_estop()`. Leaving the
`with` block, by an exception or Ctrl-C too, puts the robot in its safe state and then disconnects
the bus (which turns torque off unless the bus was built with disable_torque_on_exit=False: then the
motors stay in the safe state).
"""
from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from edgeact.drivers.motors.bus import START_TOLERANCE_RAD, BusWrapper, MotorBusError, MotorsBus
from edgeact.drivers.motors.watchdog import Watchdog
from edgeact.runtime.errors import ConfigError

log = logging.getLogger(__name__)

SAFE_STATES = ("hold", "torque_off", "stop")
# The largest max_velocity_rad_s accepted on any bus: above the no-load speed of every serial servo in the model
# tables but one (xl330-m077, 39 rad/s, a gripper servo), and ~190 rpm for the Damiao models, whose table gives only
# their velocity field's range (8-280 rad/s). A robot config also refuses a limit above its own motors' top speed.
MAX_VELOCITY_LIMIT_RAD_S = 20.0


@dataclass
class SafetyConfig:
    joint_limits_rad: dict[str, tuple[float, float]] = field(default_factory=dict)   # joints not listed: the bus's own range
    max_step_rad: float = 0.2
    max_velocity_rad_s: float = 3.0
    watchdog_timeout_s: float = 0.5
    safe_state: str = "hold"

    def __post_init__(self):
        for name in ("max_step_rad", "max_velocity_rad_s", "watchdog_timeout_s"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ConfigError(f"{name} must be > 0, got {value}")
        if self.max_velocity_rad_s > MAX_VELOCITY_LIMIT_RAD_S:
            raise ConfigError(f"max_velocity_rad_s {self.max_velocity_rad_s:g} is above {MAX_VELOCITY_LIMIT_RAD_S:g} "
                              "rad/s: a limit that never acts; use the speed the robot may really move at (default 3)")
        if self.safe_state not in SAFE_STATES:
            raise ConfigError(f"safe_state must be one of {', '.join(map(repr, SAFE_STATES))}, got {self.safe_state!r}")
        for joint, limits in self.joint_limits_rad.items():
            ok = len(limits) == 2 and all(math.isfinite(v) for v in limits) and limits[0] < limits[1]
            if not ok:
                raise ConfigError(f"joint_limits_rad[{joint!r}] must be (low, high) in rad with low < high, got {limits}")


class SafetyError(MotorBusError):
    """The safety layer refused a command."""


class StartRefusedError(SafetyError):
    """`check_start_positions` refused the start: a joint rests outside its limits, and nothing was commanded."""


class EStopLatchedError(SafetyError):
    """The e-stop is latched: commands are refused until `reset_estop()`."""

    def __init__(self, message: str, trip: "SafetyTrip | None" = None):
        super().__init__(message)
        self.trip = trip        # the trip that latched it, where known


@dataclass(frozen=True)
class SafetyTrip:
    """One time the robot was put in its safe state."""

    reason: str                 # "watchdog", "estop" or "exit"
    safe_state: str
    time_s: float               # time.monotonic()
    detail: str
    error: str | None = None    # set when reaching the safe state failed (e.g. a motor stopped answering)


def safe_state_problem(safe_state: str, has_wheels: bool, holder: str) -> str | None:
    """Why `safe_state` cannot act on a `holder` (a bus, a robot) with or without wheels, or None."""
    if safe_state == "stop" and not has_wheels:
        return f"'stop' stops wheels (velocity-mode motors) and this {holder} has none; use 'hold' or 'torque_off'"
    return None


class SafetyGuard(BusWrapper):
    """A MotorsBus that wraps another one and makes every command pass the safety limits."""

    def __init__(self, bus: MotorsBus, config: SafetyConfig, estop: threading.Event | Callable[[], bool] | None = None,
                 on_trip: Callable[[SafetyTrip], None] | None = None, clock: Callable[[], float] = time.monotonic):
        super().__init__(bus)
        unknown = sorted(set(config.joint_limits_rad) - set(bus.motors))
        if unknown:
            raise ConfigError(f"joint_limits_rad names unknown joints {unknown}; the bus has {sorted(bus.motors)}")
        wheels = [n for n, m in bus.motors.items() if m.mode == "velocity"]
        if wheels and not hasattr(bus, "send_velocity"):
            raise ConfigError(f"wheels {wheels} need a bus with send_velocity(); {type(bus).__name__} has none")
        problem = safe_state_problem(config.safe_state, bool(wheels), "bus")
        if problem:
            raise ConfigError(f"safe_state {problem}")
        # Each joint's limits: the configured ones within the bus's calibrated range. Applied here, before the
        # step limit, so the bus's own range clamp never has to move a joint (it would, at full speed).
        self._limits: dict[str, tuple[float, float]] = {}
        for name in (n for n, m in bus.motors.items() if m.mode != "velocity"):
            bus_low, bus_high = bus.position_limits_rad(name)
            low, high = config.joint_limits_rad.get(name, (-math.inf, math.inf))
            self._limits[name] = (max(low, bus_low), min(high, bus_high))
            if self._limits[name][0] >= self._limits[name][1]:
                raise ConfigError(f"joint_limits_rad[{name!r}] {(low, high)} lies outside the bus's calibrated range "
                                  f"({bus_low:.3f}, {bus_high:.3f}) rad; fix the limits or recalibrate the joint")
        self.bus, self.config, self.on_trip, self.clock = bus, config, on_trip, clock
        # Joints whose torque this guard turned off: "hold" writes them no goal (nothing to hold, and some servo
        # firmwares take a goal write as torque on).
        self._torque_off: set[str] = set()
        self._estop_input = (estop.is_set if hasattr(estop, "is_set") else estop) or (lambda: False)
        self.trips: list[SafetyTrip] = []
        self.watchdog_trips = 0
        self._latched: SafetyTrip | None = None
        self._reference_rad: dict[str, float] = {}     # last sent position per joint, the origin of the next step
        self._last_send_s: float | None = None
        self._lock = threading.RLock()
        self._watchdog = Watchdog(config.watchdog_timeout_s, self._on_watchdog, on_poll=self._poll_estop,
                                  name="safety-watchdog")

    # -- life ------------------------------------------------------------------------
    def connect(self) -> None:
        if not self.bus.is_connected:
            self.bus.connect()
        self._watchdog.start()

    def disconnect(self, disable_torque: bool | None = None) -> None:
        self._watchdog.stop()
        self.bus.disconnect(disable_torque)

    def __exit__(self, *exc) -> None:
        self._watchdog.stop()   # first, so it cannot act while the robot is put away
        try:
            if self.bus.is_connected:
                self.go_safe("exit", "leaving the safety block" + (f" on {exc[0].__name__}" if exc[0] else ""))
        finally:
            self.bus.__exit__(*exc)     # disconnects; a failure raises, or is logged behind an exception in flight

    @property
    def armed(self) -> bool:
        """Connected: the watchdog and the e-stop polling run, so commands are accepted."""
        return self._watchdog.is_running

    def _refuse_if_not_armed(self) -> None:
        # Refused rather than arming here: a guard that was never connected is also never left through its
        # `with` block, so nothing would put the robot in its safe state on the way out.
        if not self.armed:
            raise SafetyError("the safety guard is not connected, so no watchdog or e-stop polling runs; use "
                              "`with SafetyGuard(bus, config) as robot:` or call robot.connect() before sending")

    # -- the e-stop --------------------------------------------------------------------
    @property
    def estopped(self) -> bool:
        return self._latched is not None

    def trigger_estop(self, detail: str = "software e-stop") -> None:
        with self._lock:
            if self._latched is None:
                self._latched = self.go_safe("estop", detail)

    def reset_estop(self) -> None:
        """Accept commands again; the next command starts from the measured positions (after the
        'torque_off' safe state, call enable_torque() before sending)."""
        with self._lock:
            if self._estop_input():
                raise SafetyError("the e-stop input is still active; release it before reset_estop()")
            self._latched = None
            self._forget_reference()

    def _poll_estop(self) -> None:
        if self._latched is None and self._estop_input():
            self.trigger_estop("e-stop input set")

    def _refuse_if_estopped(self) -> None:
        self._poll_estop()
        if self._latched is not None:
            raise EStopLatchedError(f"e-stop latched ({self._latched.detail}); the robot is in its safe state "
                                    f"'{self._latched.safe_state}': release the e-stop and call reset_estop() to resume",
                                    self._latched)

    # -- the watchdog and the safe state -----------------------------------------------------
    def _on_watchdog(self, age_s: float) -> None:
        with self._lock:
            if self._watchdog.armed or self._latched is not None:
                return      # a command arrived while this trip waited for the lock, or the e-stop already acted
            self.watchdog_trips += 1
            self.go_safe("watchdog", f"no command for {age_s * 1000:.0f} ms (limit {self.config.watchdog_timeout_s * 1000:.0f} ms)")

    def go_safe(self, reason: str, detail: str) -> SafetyTrip:
        """Put the robot in the configured safe state now, report it, and return the report."""
        with self._lock:
            state, error = self.config.safe_state, None
            try:
                self._apply_safe_state(state)
            except MotorBusError as e:      # report it; the caller's own error path still disconnects
                error = str(e)
                log.error("could not reach safe state %r after %s: %s", state, reason, e)
            self._forget_reference()
            self._watchdog.disarm()     # safe now: the watchdog waits for the next command to re-arm it
            trip = SafetyTrip(reason, state, time.monotonic(), detail, error)
            self.trips.append(trip)
        if self.on_trip is not None:
            try:
                self.on_trip(trip)
            except Exception:       # a broken report hook must not undo the safe state
                log.exception("on_trip callback failed")
        return trip

    def _apply_safe_state(self, state: str) -> None:
        """Every part is attempted whatever another part raised (wheels stopped, then each joint held); the errors
        are raised together at the end."""
        if state == "torque_off":
            self.disable_torque()
            return
        wheels = [n for n, m in self.motors.items() if m.mode == "velocity"]
        joints = [n for n, m in self.motors.items() if m.mode != "velocity"]
        errors: list[MotorBusError] = []
        if wheels:      # first: a rolling base is the larger hazard
            try:
                self.bus.send_velocity({n: 0.0 for n in wheels})
            except MotorBusError as exc:
                errors.append(exc)
        joints = [n for n in joints if n not in self._torque_off]
        if state == "hold" and joints:
            try:
                self._hold(joints)
            except MotorBusError as exc:
                errors.append(exc)
        if errors:
            raise errors[0] if len(errors) == 1 else MotorBusError("; ".join(str(e) for e in errors))

    def _hold(self, joints: list[str]) -> None:
        """Hold each joint where it is, even outside its calibrated range (origin = the measured position lets the
        bus send it unclamped): a safe state must not move anything, and a joint that sagged or was pushed out of
        range hits nothing new by staying there, while clamping it back would jump it at full speed. The next
        command after the trip walks it back into range by limited steps. Where the group fails (one joint
        silent), each joint is held on its own, so the others still hold."""
        try:
            measured = self.bus.read_state(joints).position_rad
            self.bus.send(measured, origin_rad=measured)
            return
        except MotorBusError as exc:
            if len(joints) == 1:
                raise
            group_error = exc
        failed = []
        for name in joints:
            try:
                measured = self.bus.read_state([name]).position_rad
                self.bus.send(measured, origin_rad=measured)
            except MotorBusError as exc:
                failed.append(f"'{name}': {exc}")
        if failed:
            raise MotorBusError(f"could not hold {len(failed)} of {len(joints)} joints ({'; '.join(failed)}); the "
                                f"others hold") from group_error

    def check_start_positions(self, measured_rad: dict[str, float] | None = None) -> None:
        """Refuse to start (SafetyError) while a joint rests outside its limits; call it before the first command,
        with the joints' first reading (default: read them now).

        Mid-run a joint found outside (sagged, pushed) walks back in by limited steps; at the start that walk would
        be motion no plan asked for, at the velocity limit, and the reading itself is suspect (a wrong calibration
        reads a joint at rest far from where it is). The person decides: move the joint, or fix the limits."""
        joints = list(self._limits)
        if not joints:
            return
        measured = measured_rad if measured_rad is not None else self.bus.read_state(joints).position_rad
        outside = [f"'{n}' reads {measured[n]:+.3f} rad ({math.degrees(measured[n]):+.1f} deg) and its limits are "
                   f"[{lo:+.3f}, {hi:+.3f}] rad" for n, (lo, hi) in self._limits.items()
                   if not lo - START_TOLERANCE_RAD <= measured[n] <= hi + START_TOLERANCE_RAD]
        if outside:
            raise StartRefusedError(f"refusing to start with a joint outside its limits: {'; '.join(outside)}. Going on, the "
                              "safety layer would drive it back at the velocity limit before any plan. With torque "
                              "off, move it inside its limits by hand; or, if it rests where it should, correct "
                              "limits.joint_limits_rad or its robot.calibration (a wrong homing_offset or range shifts "
                              "the reading)")

    def _forget_reference(self) -> None:
        self._reference_rad.clear()
        self._last_send_s = None

    # -- commands ----------------------------------------------------------------------
    def send(self, goal_position_rad: dict[str, float], origin_rad: dict[str, float] | None = None) -> dict[str, float]:
        """Goals through every limit; returns what was sent. `origin_rad` is ignored: steps start from the
        guard's own reference (the last sent, or measured, position)."""
        with self._lock:
            self._refuse_if_not_armed()
            self._refuse_if_estopped()
            self._check_goal(goal_position_rad)
            self._refuse_if_torque_off(goal_position_rad)
            missing = [n for n in goal_position_rad if n not in self._reference_rad]
            if missing:
                self._reference_rad.update(self.bus.read_state(missing).position_rad)
            now = self.clock()
            # After a (re)start the previous "command" is the reading just made (the joints were there then), so
            # this first command may move them only max_velocity * ~0 s: it holds them where they are.
            last_s = now if self._last_send_s is None else self._last_send_s
            step = min(self.config.max_step_rad, self.config.max_velocity_rad_s * max(now - last_s, 0.0))
            limited = {}
            for name, goal in goal_position_rad.items():
                low, high = self._limits.get(name, (-math.inf, math.inf))
                ref = self._reference_rad[name]
                # range first, then the step: a joint outside its range moves toward it by at most `step`
                limited[name] = min(max(min(max(goal, low), high), ref - step), ref + step)
            sent = self.bus.send(limited, origin_rad={n: self._reference_rad[n] for n in limited})
            self._reference_rad.update(sent)
            self._last_send_s = now
            self._watchdog.feed()
            return sent

    def send_velocity(self, goal_velocity_rad_s: dict[str, float]) -> dict[str, float]:
        """Wheel velocities, each clamped to ±max_velocity_rad_s; feeds the watchdog like `send`."""
        if not hasattr(self.bus, "send_velocity"):
            raise ConfigError(f"{type(self.bus).__name__} has no send_velocity()")
        with self._lock:
            self._refuse_if_not_armed()
            self._refuse_if_estopped()
            self._check_goal(goal_velocity_rad_s)
            self._refuse_if_torque_off(goal_velocity_rad_s)
            joints = sorted(n for n in goal_velocity_rad_s if self.motors[n].mode != "velocity")
            if joints:      # a velocity would spin a joint past every position limit above
                raise SafetyError(f"{joints} are joints (position mode), not wheels; send_velocity would drive them "
                                  "past their position limits: command them with send")
            v_max = self.config.max_velocity_rad_s
            sent = self.bus.send_velocity({n: min(max(v, -v_max), v_max) for n, v in goal_velocity_rad_s.items()})
            self._watchdog.feed()
            return sent

    def _check_goal(self, goal: dict[str, float]) -> None:
        unknown = sorted(set(goal) - set(self.motors))
        if unknown:
            raise ConfigError(f"unknown joints {unknown}; the bus has {sorted(self.motors)}")
        bad = sorted(n for n, v in goal.items() if not math.isfinite(v))
        if bad:
            raise SafetyError(f"non-finite goal for {bad}; refusing to send it (check the policy's output)")

    def _refuse_if_torque_off(self, goal: dict[str, float]) -> None:
        """A goal for a motor whose torque this guard turned off (a 'torque_off' trip, disable_torque()) is refused
        until enable_torque(): it would not move the limp joint, the run would read as following its plan, and
        some servo firmwares take a goal write as torque on, at once and at full speed."""
        off = sorted(n for n in goal if n in self._torque_off)
        if off:
            last = self.trips[-1] if self.trips else None
            why = f" (the {last.reason} trip's safe state 'torque_off': {last.detail})" \
                if last is not None and last.safe_state == "torque_off" else ""
            raise SafetyError(f"torque is off on {off}{why}; refusing to command them: call enable_torque() first "
                              "(the arm may have sagged while limp: it then holds where it is read)")

    def enable_torque(self, motors: list[str] | None = None) -> None:
        with self._lock:
            self._refuse_if_estopped()
            self._forget_reference()    # the joints may have moved while torque was off
            self.bus.enable_torque(motors)
            self._torque_off -= set(motors or self.motors)

    def disable_torque(self, motors: list[str] | None = None) -> None:
        try:
            self.bus.disable_torque(motors)
        finally:    # a motor that did not confirm: the others went limp all the same, and "hold" must not wake them
            self._torque_off |= set(motors or self.motors)

    def write(self, register: str, motor: str, value: int) -> None:
        """A register write, refused while the e-stop is latched unless it turns torque off: a raw write of a goal
        or of torque on would move the arm past every limit here."""
        with self._lock:
            self._refuse_latched_write(register, [value])
            self.bus.write(register, motor, value)

    def sync_write(self, register: str, values: dict[str, int]) -> None:
        with self._lock:
            self._refuse_latched_write(register, list(values.values()))
            self.bus.sync_write(register, values)

    def _refuse_latched_write(self, register: str, values: list[int]) -> None:
        if not (register == "torque_enable" and not any(values)):
            self._refuse_if_estopped()

    def position_limits_rad(self, name: str) -> tuple[float, float]:
        """The limits `send` applies: the configured ones within the bus's calibrated range (wheels: none)."""
        return self._limits.get(name, (-math.inf, math.inf))
