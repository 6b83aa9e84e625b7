"""The motor-bus interface: one life and one vocabulary whether bytes go over serial or CAN."""
from __future__ import annotations

import abc
import logging
import math
from dataclasses import dataclass, field

from edgeact.runtime.errors import ConfigError, EdgeactError

log = logging.getLogger(__name__)


# A joint read this far outside its limits at the start still starts: one resting on its end stop may read a tick or
# two past the calibrated end (0.0015 rad a tick on 12-bit servos); the first commands walk it back in. The safety
# layer's start check and a serial bus's torque-on (a motor's own limit registers) both allow it.
START_TOLERANCE_RAD = 0.02

class MotorBusError(EdgeactError):
    """A bus or motor failure, translated at the boundary into words that name the fix."""


class MotorTimeoutError(MotorBusError):
    """A motor did not answer within the bounded timeout (after the bounded retries)."""


class MotorProtocolError(MotorBusError):
    """Garbage, a bad checksum, or a malformed packet on the wire."""


class MotorHardwareError(MotorBusError):
    """A motor reported error bits (overload, overheat, voltage ...)."""


@dataclass
class Motor:
    id: int
    model: str                      # key into the vendor's model table, e.g. "sts3215", "xl430-w250", "dm4310"
    mode: str = "position"          # "position" (joints) or "velocity" (wheels)


class _Unset(int):
    """A calibration default nobody wrote: the same int, but a bus can tell it was not given (see `unset_fields`)."""


def close_behind(close, exc_type: type[BaseException] | None, what: str) -> None:
    """Run `close()` on the way out of a `with` block. Its MotorBusError propagates when the block ended
    cleanly; behind an exception in flight, which says what went wrong first, it is logged instead."""
    try:
        close()
    except MotorBusError as secondary:
        if exc_type is None:
            raise
        log.error("%s after %s: %s", what, exc_type.__name__, secondary)


def bus_watchdog_units(value, unit_s: float, most_units: int, error: type[ConfigError] = ConfigError,
                       off: str = "off", steps: str = "") -> int:
    """A `bus_watchdog_s` setting (the motors' own timeout on a silent host) in its register's units:
    0 for None or 0, else 0.02 s up to what the register holds; anything else raises `error` with the fix."""
    if value is None or (not isinstance(value, bool) and isinstance(value, (int, float)) and value == 0):
        return 0
    most_s = most_units * unit_s
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.02 <= value <= most_s:
        raise error(f"bus_watchdog_s {value!r} out of range; use None or 0 ({off}), or 0.02 to {most_s:g} "
                    f"seconds{steps}, a few control periods above the loop's worst pause (e.g. 0.1-0.2 at 100 Hz)")
    return min(most_units, max(1, round(value / unit_s)))


@dataclass
class MotorCalibration:
    """Maps raw encoder units to radians: rad = sign * (raw - homing_offset) * rad_per_tick.

    The defaults are a 12-bit serial servo's (4096 ticks per turn); a bus whose raw unit differs
    (Damiao's 16-bit MIT field) refuses a calibration that leaves them out (`unset_fields`)."""

    homing_offset: int = _Unset(0)          # raw reading at the joint's zero
    range_min: int = _Unset(0)              # raw limits found by moving the joint through its range
    range_max: int = _Unset(4095)
    drive_mode: int = _Unset(0)             # 0: raw increases with the joint angle, 1: inverted

    def unset_fields(self) -> list[str]:
        """The fields left at their (serial-servo) defaults rather than given."""
        return [f for f in ("homing_offset", "range_min", "range_max", "drive_mode") if isinstance(getattr(self, f), _Unset)]

    def to_dict(self) -> dict:
        return {"homing_offset": self.homing_offset, "range_min": self.range_min,
                "range_max": self.range_max, "drive_mode": self.drive_mode}


@dataclass
class MotorState:
    """One synchronous read: every motor's position and velocity at (nearly) one instant."""

    position_rad: dict[str, float] = field(default_factory=dict)
    velocity_rad_s: dict[str, float] = field(default_factory=dict)
    timestamp_s: float = math.nan   # time.monotonic() when the read completed


class MotorsBus(abc.ABC):
    """A set of named motors on one bus.

    Life: `connect()` ... `disconnect()` or a `with` block; leaving the block, including by
    an exception or Ctrl-C, turns torque off unless `disable_torque_on_exit=False`.
    """

    def __init__(self, motors: dict[str, Motor], calibration: dict[str, MotorCalibration] | None = None,
                 disable_torque_on_exit: bool = True):
        self.motors = dict(motors)
        self.calibration = dict(calibration or {})
        self.disable_torque_on_exit = disable_torque_on_exit

    # -- life ------------------------------------------------------------------------
    @abc.abstractmethod
    def connect(self) -> None: ...

    def connect_read_only(self) -> list[str]:
        """Connect writing nothing to the motors (a shadow run, `edgeact check`); returns what `connect` would have
        changed or warns of, in words (a serial motor in another operating mode than the config's; its position limit
        registers narrower than its calibrated range). This default is for buses whose connect writes nothing."""
        self.connect()
        return []

    @abc.abstractmethod
    def disconnect(self, disable_torque: bool | None = None) -> None:
        """Close the bus; with torque on, first turn it off (default: disable_torque_on_exit)."""

    @property
    @abc.abstractmethod
    def is_connected(self) -> bool: ...

    def __enter__(self) -> "MotorsBus":
        self.connect()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        close_behind(self.disconnect, exc_type, "leaving the bus")

    # -- discovery -------------------------------------------------------------------
    @abc.abstractmethod
    def ping(self, motor_id: int) -> int | None:
        """Model number of the motor at `motor_id`, or None when nothing answers."""

    @abc.abstractmethod
    def scan(self, ids: range | list[int] | None = None) -> dict[int, int]:
        """{id: model number} of every motor that answers."""

    # -- registers by name, from the model's table ------------------------------------
    @abc.abstractmethod
    def read(self, register: str, motor: str) -> int: ...

    @abc.abstractmethod
    def write(self, register: str, motor: str, value: int) -> None: ...

    @abc.abstractmethod
    def sync_read(self, register: str, motors: list[str] | None = None) -> dict[str, int]: ...

    @abc.abstractmethod
    def sync_write(self, register: str, values: dict[str, int]) -> None: ...

    # -- torque and motion -----------------------------------------------------------
    @abc.abstractmethod
    def enable_torque(self, motors: list[str] | None = None) -> None: ...

    @abc.abstractmethod
    def disable_torque(self, motors: list[str] | None = None) -> None: ...

    @abc.abstractmethod
    def read_state(self, motors: list[str] | None = None) -> MotorState:
        """Positions and velocities of many motors in one transaction, in rad and rad/s."""

    @abc.abstractmethod
    def send(self, goal_position_rad: dict[str, float], origin_rad: dict[str, float] | None = None) -> dict[str, float]:
        """Write goal positions in one transaction; return what was really sent after the
        calibrated range limits were applied (in rad).

        `origin_rad` (per joint, optional): where the motion starts (the measured or last-sent position).
        A joint found outside its calibrated range may then be sent anywhere between its origin and the
        range, so a caller that limits steps (SafetyGuard) walks it back instead of it jumping to the
        range's edge; it can never be sent further out than its origin."""

    def position_limits_rad(self, name: str) -> tuple[float, float]:
        """(low, high) joint angle `send` clamps to: the calibrated range; unbounded when the bus has none."""
        return -math.inf, math.inf

    def torque_enabled(self, motors: list[str] | None = None) -> dict[str, bool]:
        """{motor: whether it holds (torque on)}, as the motors report it: their torque_enable register here; a
        bus whose motors report it otherwise (Damiao: the enable flag of every feedback frame) overrides this."""
        return {n: bool(v) for n, v in self.sync_read("torque_enable", motors).items()}

    def read_state_torque_free(self, motors: list[str] | None = None) -> MotorState:
        """read_state for what never turns torque on (a shadow run, calibration): a fault that only means the motor
        went torque-free by itself is read through, not refused (Damiao's "communication lost" overrides this); here
        the same as read_state."""
        return self.read_state(motors)


class BusWrapper(MotorsBus):
    """A MotorsBus around another one (`self.bus`): every call goes through to it unless the subclass takes it
    (SafetyGuard: the limits, the e-stop and the watchdog; ShadowBus: every write withheld)."""

    def __init__(self, bus: MotorsBus, disable_torque_on_exit: bool | None = None):
        super().__init__(bus.motors, bus.calibration,
                         bus.disable_torque_on_exit if disable_torque_on_exit is None else disable_torque_on_exit)
        self.bus = bus

    def connect(self) -> None:
        self.bus.connect()

    def connect_read_only(self) -> list[str]:
        return self.bus.connect_read_only()

    def disconnect(self, disable_torque: bool | None = None) -> None:
        self.bus.disconnect(disable_torque)

    @property
    def is_connected(self) -> bool:
        return self.bus.is_connected

    def position_limits_rad(self, name: str) -> tuple[float, float]:
        return self.bus.position_limits_rad(name)

    def ping(self, motor_id: int) -> int | None:
        return self.bus.ping(motor_id)

    def scan(self, ids: range | list[int] | None = None) -> dict[int, int]:
        return self.bus.scan(ids)

    def read(self, register: str, motor: str) -> int:
        return self.bus.read(register, motor)

    def write(self, register: str, motor: str, value: int) -> None:
        self.bus.write(register, motor, value)

    def sync_read(self, register: str, motors: list[str] | None = None) -> dict[str, int]:
        return self.bus.sync_read(register, motors)

    def sync_write(self, register: str, values: dict[str, int]) -> None:
        self.bus.sync_write(register, values)

    def enable_torque(self, motors: list[str] | None = None) -> None:
        self.bus.enable_torque(motors)

    def disable_torque(self, motors: list[str] | None = None) -> None:
        self.bus.disable_torque(motors)

    def torque_enabled(self, motors: list[str] | None = None) -> dict[str, bool]:
        return self.bus.torque_enabled(motors)

    def read_state(self, motors: list[str] | None = None) -> MotorState:
        return self.bus.read_state(motors)

    def read_state_torque_free(self, motors: list[str] | None = None) -> MotorState:
        return self.bus.read_state_torque_free(motors)

    def send(self, goal_position_rad: dict[str, float], origin_rad: dict[str, float] | None = None) -> dict[str, float]:
        return self.bus.send(goal_position_rad, origin_rad)
