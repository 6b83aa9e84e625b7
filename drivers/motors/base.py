"""A three-omni-wheel mobile base (LeKiwi layout) on the Feetech bus: kinematics, speed and acceleration limits,
watchdog, e-stop, stop.

Build it on the robot's SafetyGuard so that the guard's e-stop (and its watchdog) also stop the base:

    with SafetyGuard(bus, config, estop=estop) as robot, OmniBase(robot) as base:
        base.send(vx_m_s=0.1)       # refused once the e-stop is latched, until robot.reset_estop()
"""
from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from edgeact.drivers.motors.bus import MotorBusError, close_behind
from edgeact.drivers.motors.safety import EStopLatchedError, SafetyError, SafetyGuard
from edgeact.drivers.motors.serial_bus import SerialMotorsBus
from edgeact.drivers.motors.serial_types import MotorConfigError

log = logging.getLogger(__name__)

# A pause between commands counts as at most this long for the acceleration limit: the wheels follow a new goal as
# fast as the motors can, so after a pause a command may change them by at most max_wheel_accel_rad_s2 x this.
ACCEL_STEP_MAX_S = 0.1


@dataclass(frozen=True)
class BaseVelocity:
    """Body-frame velocity: x forward, y left, z up (counter-clockwise positive)."""

    vx_m_s: float = 0.0
    vy_m_s: float = 0.0
    wz_rad_s: float = 0.0


@dataclass
class OmniBaseConfig:
    wheels: tuple[str, str, str] = ("base_left_wheel", "base_back_wheel", "base_right_wheel")
    # Direction in which each wheel pushes the base, counter-clockwise from +x. LeKiwi's wheels sit
    # 120 deg apart, so their drive directions are too: left 150 deg, back 270 deg, right 30 deg.
    wheel_drive_angles_deg: tuple[float, float, float] = (150.0, 270.0, 30.0)
    wheel_radius_m: float = 0.05
    base_radius_m: float = 0.125            # centre of the base to each wheel's contact point
    max_wheel_speed_rad_s: float = 4.6      # STS3215: 3000 steps/s, LeKiwi's own cap
    watchdog_s: float = 0.5                 # no command for this long and the wheels stop
    max_wheel_accel_rad_s2: float = 10.0    # each wheel's speed changes at most this fast (0 to full in ~0.5 s);
                                            # stops (stop(), the watchdog, the e-stop) are immediate

    def __post_init__(self):
        if len(self.wheels) != 3 or len(set(self.wheels)) != 3:
            raise MotorConfigError(f"an omni base needs three distinct wheel motors, got {self.wheels}")
        if len(self.wheel_drive_angles_deg) != 3:
            raise MotorConfigError(f"give one drive angle per wheel, got {self.wheel_drive_angles_deg}")
        for name in ("wheel_radius_m", "base_radius_m", "max_wheel_speed_rad_s", "watchdog_s",
                     "max_wheel_accel_rad_s2"):
            if not getattr(self, name) > 0:
                raise MotorConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if not math.isfinite(self.max_wheel_accel_rad_s2):
            raise MotorConfigError(f"max_wheel_accel_rad_s2 must be a finite number of rad/s^2 (e.g. 10), "
                                   f"got {self.max_wheel_accel_rad_s2}")
        if abs(np.linalg.det(_wheel_matrix(self))) < 1e-9:
            raise MotorConfigError(f"wheel drive angles {self.wheel_drive_angles_deg} cannot steer the base in every "
                                   "direction; use three distinct directions such as (150, 270, 30)")


def _wheel_matrix(config: OmniBaseConfig) -> np.ndarray:
    """Rows map (vx, vy, wz) to one wheel's angular speed: (cos a, sin a, R) / r."""
    angles = np.radians(config.wheel_drive_angles_deg)
    rows = [[math.cos(a), math.sin(a), config.base_radius_m] for a in angles]
    return np.asarray(rows) / config.wheel_radius_m


class OmniBase:
    """Drives the wheels of `bus` (velocity-mode motors); the bus stays the caller's to connect.

    `bus` is best the robot's SafetyGuard: commands then pass its e-stop and limits (and are refused
    while it is not connected or its e-stop is latched). On a bare bus, `estop` (a callable, true
    while the e-stop is active) is checked by every send() and by the watchdog.

    Life: `start()` (torque on, watchdog running) ... `close()` (wheels stopped, torque off),
    or a `with` block, which also stops the wheels on an exception or Ctrl-C. send() is refused
    before start(): without the watchdog a stalled caller would leave the base driving.
    """

    def __init__(self, bus: SerialMotorsBus | SafetyGuard, config: OmniBaseConfig | None = None,
                 estop: Callable[[], bool] | None = None):
        self.bus = bus
        self.guard = bus if isinstance(bus, SafetyGuard) else None
        self._raw = bus.bus if self.guard is not None else bus     # stops go straight to the motors
        self.config = config or OmniBaseConfig()
        self._estop_input = estop
        self._max_speed_rad_s = self.config.max_wheel_speed_rad_s
        if self.guard is not None:      # the guard clamps each wheel on its own, which would bend the heading
            self._max_speed_rad_s = min(self._max_speed_rad_s, self.guard.config.max_velocity_rad_s)
        for wheel in self.config.wheels:
            motor = bus.motors.get(wheel)
            if motor is None or motor.mode != "velocity":
                raise MotorConfigError(f"wheel '{wheel}' must be a velocity-mode motor on the bus; "
                                       f"bus motors: {', '.join(bus.motors)}")
            spec = self._raw.MODELS[motor.model]
            top_rad_s = spec.max_velocity_raw * spec.velocity_unit_rad_s
            if self.config.max_wheel_speed_rad_s > top_rad_s:
                raise MotorConfigError(f"max_wheel_speed_rad_s {self.config.max_wheel_speed_rad_s} exceeds what "
                                       f"{spec.name} can do ({top_rad_s:.2f} rad/s)")
        self._to_wheels = _wheel_matrix(self.config)
        self._to_body = np.linalg.inv(self._to_wheels)
        self._lock = threading.Lock()       # one command at a time: the caller's or the watchdog's stop
        self._last_command_s = time.monotonic()
        self._sent_rad_s = dict.fromkeys(self.config.wheels, 0.0)    # the last wheel speeds sent: the ramp's origin
        self._guard_trips = len(self.guard.trips) if self.guard is not None else 0   # at the last send
        self._moving = False
        self._stop_watch = threading.Event()
        self._watchdog: threading.Thread | None = None
        self.watchdog_stops = 0

    # -- kinematics --------------------------------------------------------------------------
    def wheel_speeds(self, velocity: BaseVelocity) -> dict[str, float]:
        """Inverse kinematics: wheel angular speeds (rad/s) for a body velocity."""
        speeds = self._to_wheels @ np.array([velocity.vx_m_s, velocity.vy_m_s, velocity.wz_rad_s])
        return {w: float(s) for w, s in zip(self.config.wheels, speeds, strict=True)}

    def body_velocity(self, wheel_rad_s: dict[str, float]) -> BaseVelocity:
        """Forward kinematics: the body velocity those wheel speeds produce."""
        vx, vy, wz = self._to_body @ np.array([wheel_rad_s[w] for w in self.config.wheels])
        return BaseVelocity(float(vx), float(vy), float(wz))

    def limit(self, wheel_rad_s: dict[str, float]) -> dict[str, float]:
        """Scale all wheels by one factor so the fastest stays within the cap: the heading is kept."""
        fastest = max(abs(s) for s in wheel_rad_s.values())
        scale = min(1.0, self._max_speed_rad_s / fastest) if fastest > 0 else 1.0
        return {w: s * scale for w, s in wheel_rad_s.items()}

    def ramp(self, wheel_rad_s: dict[str, float], elapsed_s: float) -> dict[str, float]:
        """Move from the last sent wheel speeds toward `wheel_rad_s` by at most max_wheel_accel_rad_s2 x elapsed_s
        (at most ACCEL_STEP_MAX_S of it) per wheel, every wheel's change scaled by one factor: the change keeps its
        direction."""
        step = self.config.max_wheel_accel_rad_s2 * min(max(elapsed_s, 0.0), ACCEL_STEP_MAX_S)
        change = {w: s - self._sent_rad_s[w] for w, s in wheel_rad_s.items()}
        largest = max(abs(c) for c in change.values())
        scale = min(1.0, step / largest) if largest > 0 else 1.0
        return {w: self._sent_rad_s[w] + c * scale for w, c in change.items()}

    # -- commands ------------------------------------------------------------------------------
    def send(self, vx_m_s: float = 0.0, vy_m_s: float = 0.0, wz_rad_s: float = 0.0) -> BaseVelocity:
        """Drive at a body velocity; returns the velocity really sent after the speed and acceleration limits."""
        if not all(math.isfinite(v) for v in (vx_m_s, vy_m_s, wz_rad_s)):
            raise MotorBusError(f"base velocity ({vx_m_s}, {vy_m_s}, {wz_rad_s}) is not finite; refusing to send it")
        wheels = self.limit(self.wheel_speeds(BaseVelocity(vx_m_s, vy_m_s, wz_rad_s)))
        with self._lock:
            if self._watchdog is None or not self._watchdog.is_alive():
                raise SafetyError("the base is not started, so no watchdog would stop it if commands stopped: use "
                                  "`with OmniBase(bus) as base:` or call base.start() before send()")
            if self._estopped():
                self._stop_wheels()
                raise EStopLatchedError("the e-stop is active: the base does not drive; release the e-stop (on a "
                                        "SafetyGuard also call reset_estop()) before sending again")
            now = time.monotonic()
            bus_watchdog_s = getattr(getattr(self._raw, "config", None), "bus_watchdog_s", None)
            if (self.guard is not None and len(self.guard.trips) != self._guard_trips) or \
                    (bus_watchdog_s and now - self._last_command_s >= bus_watchdog_s):
                # The guard stopped the wheels itself meanwhile (its watchdog, go_safe), or the motors' own bus
                # watchdog did (a Dynamixel's, shorter than ours): ramp up from standstill.
                self._sent_rad_s = dict.fromkeys(self.config.wheels, 0.0)
            sent = self.bus.send_velocity(self.ramp(wheels, now - self._last_command_s))
            self._last_command_s = now
            self._sent_rad_s = dict(sent)
            self._guard_trips = len(self.guard.trips) if self.guard is not None else 0
            self._moving = any(sent.values())
        return self.body_velocity(sent)

    def stop(self) -> None:
        with self._lock:
            self._stop_wheels()

    def _stop_wheels(self) -> None:
        """Zero speed on the bus itself, not through the guard: stopping is allowed in every state (e-stop too)."""
        self._raw.send_velocity(dict.fromkeys(self.config.wheels, 0.0))
        self._sent_rad_s = dict.fromkeys(self.config.wheels, 0.0)
        self._moving = False

    def _estopped(self) -> bool:
        return ((self.guard is not None and self.guard.estopped)
                or (self._estop_input is not None and bool(self._estop_input())))

    def read(self) -> BaseVelocity:
        """The body velocity the wheels report (forward kinematics of the measured wheel speeds)."""
        return self.body_velocity(self.bus.read_state(list(self.config.wheels)).velocity_rad_s)

    @property
    def moving(self) -> bool:
        return self._moving

    # -- life ----------------------------------------------------------------------------------
    def start(self) -> None:
        if self._watchdog is not None:
            raise MotorBusError("the base is already started")
        self.bus.enable_torque(list(self.config.wheels))
        self._last_command_s = time.monotonic()
        self._sent_rad_s = dict.fromkeys(self.config.wheels, 0.0)
        self._stop_watch.clear()
        self._watchdog = threading.Thread(target=self._watch, name="base-watchdog", daemon=True)
        self._watchdog.start()

    def close(self) -> None:
        """Stop the watchdog, stop the wheels, turn their torque off."""
        watchdog, self._watchdog = self._watchdog, None
        if watchdog is not None:
            self._stop_watch.set()
            watchdog.join(timeout=5.0)
        if self.bus.is_connected:
            self.stop()
            self.bus.disable_torque(list(self.config.wheels))

    def __enter__(self) -> "OmniBase":
        self.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        close_behind(self.close, exc_type, "stopping the base")

    def _watch(self) -> None:
        """Stop the wheels when commands stop coming (a stalled planner must not leave the base driving), or at once
        when the e-stop is active."""
        while not self._stop_watch.wait(self.config.watchdog_s / 4):
            with self._lock:
                idle_s = time.monotonic() - self._last_command_s
                try:
                    estopped = self._moving and self._estopped()
                except Exception:   # an e-stop input that cannot be read counts as pressed: the watchdog lives on
                    log.exception("base: reading the e-stop input failed; stopping the wheels as if it were set")
                    estopped = self._moving
                if not self._moving or (idle_s <= self.config.watchdog_s and not estopped):
                    continue
                try:
                    self._stop_wheels()
                except Exception as exc:   # keep watching: the next period tries again
                    log.error("base watchdog could not stop the wheels: %s", exc)
                    continue
                if not estopped:
                    self.watchdog_stops += 1
            if estopped:
                log.warning("base: e-stop active; wheels stopped")
            else:
                log.warning("base: no command for %.2f s; wheels stopped", idle_s)
